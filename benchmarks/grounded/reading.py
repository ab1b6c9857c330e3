"""Does a grounded adapter read its passages, or cite the first one? Every answerable row of a data file whose gold
passage was retrieved is asked again with the gold passage moved to each place (the others keep their order), and
the citation the adapter starts its answer with is checked.

    python benchmarks/grounded/reading.py --adapter RUN --data DIR/valid.jsonl [--kb KB] [--out FILE.json]

Only the citation is generated (a few tokens), so a run takes a minute or two on 2 cores. Retrieval puts the
gold passage first for most questions, and a model that learnt "cite [1]" scores well on such a split while
failing every question whose gold comes second or third: this probe measures that case directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from mlx_lora.backends.loading import load_for_generation
from mlx_lora.core.config import Config, GenerateConfig
from mlx_lora.data.formats import Example, read_examples
from mlx_lora.data.grounded import labels, parse_citation, user_turn
from mlx_lora.data.kb import load_kb
from mlx_lora.evaluation.run import generate_answers

CITATION_TOKENS = 6  # enough for "[2] " or a short doc id; a refusal shows in its first words


def moved(order: list[str], gold: str, place: int) -> list[str]:
    """The doc ids in `order` with `gold` moved to index `place` and the others in their order."""
    rest = [d for d in order if d != gold]
    return rest[:place] + [gold] + rest[place:]


def probes(rows: list[Example], texts: dict[str, str], data_cfg) -> list[tuple[Example, int, str]]:
    """(prompt row, gold place, gold label) for every answerable row with its gold passage shown, at every place."""
    out = []
    for row in rows:
        gold, shown = row.meta.get("doc_id"), row.meta.get("passages") or []
        if not gold or gold not in shown:
            continue
        for place in range(len(shown)):
            ids = moved(shown, gold, place)
            turn = user_turn(row.question, [(d, texts[d]) for d in ids], data_cfg)
            messages = [dict(m) for m in row.prompt_messages()]
            messages[-1]["content"] = turn
            out.append((Example(messages=messages, meta=row.meta), place + 1, labels(ids, data_cfg)[place]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--data", required=True, help="a built grounded split (valid.jsonl)")
    parser.add_argument("--kb", default="data/kb.jsonl")
    parser.add_argument("--out")
    args = parser.parse_args()
    cfg = Config()
    cfg.generate = GenerateConfig(max_new_tokens=CITATION_TOKENS, batch_size=64)
    backend, loaded, tokenizer, system_prompt = load_for_generation(None, args.adapter, cfg, progress=False)
    texts = {d: doc.text for d, doc in load_kb(args.kb).items()}
    asked = probes(read_examples(args.data), texts, cfg.data)
    answers = generate_answers(backend, loaded, tokenizer, [row for row, _, _ in asked], cfg, system_prompt)
    tally: dict[int, Counter] = {}
    for (_, place, label), answer in zip(asked, answers):
        cited, _ = parse_citation(answer)
        outcome = "gold" if cited == label else ("refused" if cited is None else "other")
        tally.setdefault(place, Counter())[outcome] += 1
    result = {
        "adapter": args.adapter,
        "data": args.data,
        "by_gold_place": {p: dict(c) | {"gold_rate": round(c["gold"] / sum(c.values()), 3)} for p, c in tally.items()},
    }
    text = json.dumps(result, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
