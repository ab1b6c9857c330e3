"""Train refusals beyond the question bank's: general off-topic questions in place of repeated unanswerable ones."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from mlx_lora.core.textnorm import compact
from mlx_lora.data.retrieval import clauses
from mlx_lora.data.similarity import closest_ratio

POOL = Path(__file__).with_name("off_topic.txt")
STYLE = "off_topic"
# A pool question is kept only when it is further from the KB than nearly every answerable question is from its
# KB's texts: its best embedding similarity to any KB text, clause or answerable train question must stay below
# this percentile of the answerable train questions' best similarity to the KB texts and clauses. A general
# question on a topic the KB covers (a tax question for a payroll KB) must not teach refusing. USE embedder, 182
# pool questions: kept 83 for the sample KB, 71 for benchmarks/kb2, 136 for benchmarks/kb3.
KB_PERCENTILE = 5


def pool_questions(path: Path = POOL) -> list[str]:
    """The packaged pool: one question per line; # starts a comment line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def usable(pool, kb_texts, answerable, held, scorer, near_duplicate: float) -> list[str]:
    """The pool questions far from the KB (KB_PERCENTILE) and not near-duplicates (character ratio ≥
    near_duplicate) of any held-out (valid or test) question, in pool order."""
    held_keys = [compact(q) for q in held]
    kept = [q for q in pool if closest_ratio(compact(q), held_keys) < near_duplicate]
    if not kept or not answerable:
        return []
    texts = list(kb_texts) + [part for text in kb_texts for part in clauses(text)]
    floor = float(np.percentile(scorer.matrix(list(answerable), texts).max(axis=1), KB_PERCENTILE))
    best = scorer.matrix(kept, texts + list(answerable)).max(axis=1)
    return [q for q, score in zip(kept, best) if score < floor]


def repeated(train) -> list[int]:
    """Places of the unanswerable train rows whose question an earlier row already asks."""
    seen, out = set(), []
    for i, item in enumerate(train):
        if item.doc_id is None:
            key = compact(item.question)
            if key in seen:
                out.append(i)
            seen.add(key)
    return out


def fill_repeats(splits: dict, kb_texts: dict[str, str], scorer, seed: int, near_duplicate: float, make) -> int:
    """Replace train's repeated unanswerable rows (second and later rows of one question: the bank had fewer
    unique ones than the refusal share needs) by rows of unused pool questions, in place; returns how many.

    Same count in the same places, so every other row and its seeded draws stay as they were. make(question)
    builds a refusal row."""
    train = splits["train"]
    repeats = repeated(train)
    if not repeats:
        return 0
    seen = {compact(item.question) for item in train if item.doc_id is None}
    answerable = [item.question for item in train if item.doc_id is not None]
    held = [item.question for name in ("valid", "test") for item in splits[name]]
    pool = [q for q in pool_questions() if compact(q) not in seen]
    pool = usable(pool, list(kb_texts.values()), answerable, held, scorer, near_duplicate)
    random.Random(seed + 3).shuffle(pool)
    for i, question in zip(repeats, pool):
        train[i] = make(question)
    return min(len(repeats), len(pool))
