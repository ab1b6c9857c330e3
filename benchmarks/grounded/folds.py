"""Out-of-fold question sets for judging the cite-or-refuse decision on more rows than valid holds.

    python benchmarks/grounded/folds.py DATA_DIR OUT_ROOT [--folds 5]

DATA_DIR holds a built grounded split (`mlx-lora data build`; test.jsonl is never read). Fold f gets
OUT_ROOT/fold-f/ with train.jsonl (every train row but the fold's), valid.jsonl (unchanged: it picks nothing here
but the trainer reads it) and held.jsonl (the fold's rows: train row i is in fold i % folds, except that every row
of a question asked more than once — an unanswerable one repeated to fill the refusal share — goes with its first
row, and is held once: else a held question would also be trained on; rows of the built-in off-topic pool are in
every fold's train and never held). Then

    mlx-lora train --data OUT_ROOT/fold-f ...;  mlx-lora eval --adapter RUN --data OUT_ROOT/fold-f/held.jsonl

scores the held questions as a user's: `eval` rebuilds their prompts from the fold's own train questions (the held
ones are not in the index), and a held row that was a hard negative at build time (its gold passage taken away,
the refusal its answer) expects its doc's answer again, as any answerable question does.
The rows' passages were retrieved with all train questions in the index, so a held question may have shaped the
passages a fold's train row shows: a small leak towards the held rows' neighbours, the same for every recipe.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from mlx_lora.core.config import DataConfig  # noqa: E402
from mlx_lora.data.formats import parse_row  # noqa: E402
from mlx_lora.data.grounded import cited_answer, own_citation_removed  # noqa: E402
from mlx_lora.data.off_topic import STYLE as OFF_TOPIC  # noqa: E402


def doc_answers(rows: list[dict]) -> dict[str, str]:
    """Each doc's answer (without citation), from the rows that cite their own doc."""
    out = {}
    for line, row in enumerate(rows, 1):
        example = parse_row(row, "train.jsonl", line)
        meta = example.meta or {}
        text = own_citation_removed(example)
        plain = "+" not in meta.get("style", "")  # a row shaped for training (a cut passage…) is not the doc's answer
        if meta.get("answerable") and meta.get("gold_in_passages") and plain and text != example.answer:
            out.setdefault(meta["doc_id"], text)
    return out


def held_row(row: dict, answers: dict[str, str], cfg: DataConfig) -> dict:
    """A train row as a question to score: an answerable row taught to refuse (a hard negative, a near-miss made
    from it) expects its doc's answer again."""
    meta = row.get("meta") or {}
    if not meta.get("answerable") or "+" not in meta.get("style", ""):
        return row
    answer = cited_answer(meta["doc_id"], answers[meta["doc_id"]], meta.get("passages") or [], cfg)
    messages = [dict(m) for m in row["messages"]]
    messages[-1]["content"] = answer
    return {**row, "messages": messages, "meta": {**meta, "style": meta["style"].split("+")[0]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    lines = (args.data / "train.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    cfg = DataConfig(cite=(rows[0].get("meta") or {}).get("cite", "number"))
    answers = doc_answers(rows)
    keys = [(r.get("meta") or {}).get("question") or str(i) for i, r in enumerate(rows)]
    first: dict[str, int] = {}
    fold_of = [first.setdefault(key, i) % args.folds for i, key in enumerate(keys)]
    # A row of the built-in off-topic pool is no question of this KB's bank: trained on in every fold, never held.
    fold_of = [-1 if (r.get("meta") or {}).get("style") == OFF_TOPIC else k for r, k in zip(rows, fold_of)]
    for f in range(args.folds):
        folder = args.out / f"fold-{f}"
        folder.mkdir(parents=True, exist_ok=True)
        train = [r for r, k in zip(rows, fold_of) if k != f]
        mine = [r for i, (r, k) in enumerate(zip(rows, fold_of)) if k == f and first[keys[i]] == i]
        held = [held_row(r, answers, cfg) for r in mine]
        for name, part in (("train.jsonl", train), ("held.jsonl", held)):
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
            (folder / name).write_text(text, encoding="utf-8")
        shutil.copy(args.data / "valid.jsonl", folder / "valid.jsonl")
        restored = sum(h is not r for h, r in zip(held, mine))
        taught = f"{restored} answerable rows taught to refuse expect their answer"
        print(f"fold {f}: {len(train)} train rows, {len(held)} held ({taught})")


if __name__ == "__main__":
    main()
