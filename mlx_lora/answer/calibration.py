"""Route calibration: the thresholds (low, refuse_at, high) and the answerability floor from out-of-fold decisions."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import numpy as np

from mlx_lora.answer.route import NEVER, Neighbour, RouteDecision, SemanticRoute, neighbours_from
from mlx_lora.data.similarity import REFUSAL, LabelIndex

# The share of held-out questions the model is assumed to answer right when the route leaves them to it. The 0.5B
# LoRA model's topic accuracy on reworded questions measured 25–67% (48.1% on the 40 test rows of README.md's
# measured section): 0.5 is a middle estimate.
MODEL_ACCURACY = 0.5
# Out-of-fold, the answerability floor may refuse at most this share of answerable questions.
ANSWER_FLOOR_BUDGET = 0.01


def _cuts(values: np.ndarray) -> list[float]:
    """Candidate thresholds for `value ≥ t`: each distinct value's midpoint to the one below (the lowest value
    itself), then NEVER; unseen values between two valid ones are thus not decided by a tie."""
    v = np.unique(values)
    return [float(v[0]) for _ in v[:1]] + [float((a + b) / 2) for a, b in itertools.pairwise(v)] + [NEVER]


def calibrate(
    confidence: Sequence[float],
    correct: Sequence[bool],
    scores: Sequence[float],
    answerable: Sequence[bool],
    precision: float = 0.95,
    model_accuracy: float = MODEL_ACCURACY,
    refusal_p: Sequence[float] | None = None,
    refusal_budget: int | None = None,
) -> dict:
    """Pick low, refuse_at and high from the route's classification of held-out labelled questions.

    Per row: nearest similarity (`scores`), the best doc's probability (`confidence`) and whether that doc is the
    expected one (`correct`), P(REFUSAL) (`refusal_p`; None: no refusal class) and whether the row is answerable.
      - low = the highest similarity t such that, of the rows scoring < t, at least `precision` are unanswerable:
        refusing there is right that often. None → 0 (never refuse by similarity).
      - refuse_at, high: on the rows left, the pair that maximises the expected number of right answers. A row
        refused (P(REFUSAL) ≥ refuse_at) counts 1 when unanswerable; a row retrieved (else doc probability ≥ high)
        counts 1 when the doc is right; every other row counts `model_accuracy` (the model answers it). So the
        route answers alone exactly where, on held-out questions, it beat the model's expected accuracy. Pairs that
        refuse
        more answerable rows (with those below low) than `refusal_budget` (the retrieval baseline's count on
        the same rows) are not eligible. Ties: the higher refuse_at (refuse less), then the lower high
        (a KB answer is verbatim and auditable). NEVER (1.01) is a candidate for both.
    """
    conf, s = np.asarray(confidence, dtype=float), np.asarray(scores, dtype=float)
    ok, ans = np.asarray(correct, dtype=bool), np.asarray(answerable, dtype=bool)
    rp = np.zeros(len(s)) if refusal_p is None else np.asarray(refusal_p, dtype=float)
    low, values = 0.0, np.unique(s)
    for k in range(len(values) - 1, 0, -1):  # refuse the rows scoring below values[k]
        if (~ans[s < values[k]]).mean() >= precision:
            low = float((values[k] + values[k - 1]) / 2)
            break
    kept = s >= low
    budget = np.inf if refusal_budget is None else refusal_budget - int((~kept & ans).sum())
    best = None
    for refuse_at in (_cuts(rp[kept]) if refusal_p is not None else [NEVER])[::-1]:  # high → low: ties refuse less
        refused = kept & (rp >= refuse_at)
        if (refused & ans).sum() > budget:
            continue
        for high in _cuts(conf[kept]):  # low → high: ties retrieve more
            routed = kept & ~refused & (conf >= high)
            gain = (refused & ~ans).sum() + (routed & ok).sum() + model_accuracy * (kept & ~refused & ~routed).sum()
            if best is None or gain > best[0] + 1e-9:
                best = (gain, refuse_at, high)
    _, refuse_at, high = best if best is not None else (0, NEVER, NEVER)
    refused, routed = kept & (rp >= refuse_at), kept & (rp < refuse_at) & (conf >= high)
    return {
        "high": high,
        "low": low,
        "refuse_at": refuse_at,  # not rounded: the lowest valid value may be one
        "precision_target": precision,
        "model_accuracy_assumed": model_accuracy,
        "rows": len(s),
        "refusal_budget": refusal_budget,
        "retrieved": int(routed.sum()),
        "refused": int((refused | ~kept).sum()),
        "to_model": int((kept & ~refused & ~routed).sum()),
        "retrieved_correct": int((routed & ok).sum()),
        "refused_unanswerable": int(((refused | ~kept) & ~ans).sum()),
    }


def calibrate_route(
    route: SemanticRoute,
    examples,
    index: LabelIndex,
    folds: int = 5,
    seed: int = 0,
    precision: float = 0.95,
    model_accuracy: float = MODEL_ACCURACY,
) -> dict:
    """Set route.high / route.low / route.refuse_at from out-of-fold decisions on labelled questions (see calibrate).

    `examples` are the train and valid rows. Their distinct questions are cut into `folds` folds; each fold is
    classified by a route trained on the other folds' questions plus the KB texts (about as much data as the final
    route, which is trained on the train split), so every question gets a prediction it did not train on. The
    refusal budget is what a nearest-neighbour lookup in the other folds refuses of the answerable questions.

    Why not calibrate on the valid split alone, on the rows no keyword rule claims: the sample valid split has
    ~64 rows, and rules written from the training questions claim nearly every answerable one, so the rows left
    were ~20, almost all unanswerable — that taught the route to refuse at P(REFUSAL) 0.07 and it refused 10% of
    the answerable test questions. Out-of-fold over all ~500 questions gives thresholds for the route as a whole.
    """
    questions = neighbours_from(examples, {}, index)
    kb = [n for n in route.neighbours if n.kind == "kb"]
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    folds = max(2, min(folds, len(questions)))
    rows: list[tuple[Neighbour, RouteDecision, Neighbour]] = []
    answer_scores: list[float | None] = []
    for k in range(folds):
        held = set(order[k::folds])
        rest = [q for i, q in enumerate(questions) if i not in held]
        if not held or not rest:  # too few questions to hold any out
            continue
        fold_route = SemanticRoute(route.scorer, rest + kb)
        asked = [questions[i] for i in sorted(held)]
        texts = [q.text for q in asked]
        nearest = fold_route.nearest(texts, kinds=("question",))
        decided = fold_route.classify(texts)
        rows += [(q, d, n) for q, d, (n, _) in zip(asked, decided, nearest)]
        answer_scores += fold_route.answer_scores(texts, [d.label for d in decided])
    answerable = [q.label != REFUSAL for q, _, _ in rows]
    budget = sum(a and n.label == REFUSAL for a, (_, _, n) in zip(answerable, rows))
    has_refusal = route.classifier is not None and REFUSAL in route.classifier.classes
    info = calibrate(
        [d.confidence for _, d, _ in rows],
        [d.label == q.label for q, d, _ in rows],
        [d.score for _, d, _ in rows],
        answerable,
        precision,
        model_accuracy,
        [d.refusal_p for _, d, _ in rows] if has_refusal else None,
        budget,
    )
    if route.classifier is None:  # no probabilities to trust: only the similarity floor is calibrated
        info["high"] = info["refuse_at"] = NEVER
    info["method"] = f"{folds}-fold out-of-fold decisions on {len(rows)} distinct train+valid questions"
    route.high, route.low, route.refuse_at = info["high"], info["low"], info["refuse_at"]
    if route.answerability is not None:
        info.update(calibrate_answer_floor(answer_scores, answerable))
        route.answer_floor = info["answer_floor"]
    return info


def calibrate_answer_floor(
    scores: Sequence[float | None], answerable: Sequence[bool], budget: float = ANSWER_FLOOR_BUDGET
) -> dict:
    """The answerability score below which the layer refuses a doc answer, from out-of-fold scores of each
    question against the doc the classifier named: the highest cut that refuses at most `budget` of the answerable
    questions — kept only if it refuses more unanswerable than answerable ones (else None: the check stays off)."""
    pairs = [(s, a) for s, a in zip(scores, answerable) if s is not None]
    ok = np.sort([s for s, a in pairs if a])
    bad = np.array([s for s, a in pairs if not a])
    floor = None
    if len(ok) and len(bad):
        allowed = int(budget * len(ok))
        cut = float(ok[allowed])  # exactly `allowed` answerable scores lie below it
        caught = int((bad < cut).sum())
        floor = cut if caught > allowed else None
    refused_ok = int((ok < floor).sum()) if floor is not None else 0
    refused_bad = int((bad < floor).sum()) if floor is not None else 0
    return {
        "answer_floor": floor,
        "answer_floor_budget": budget,
        "answer_floor_refused_answerable": refused_ok,
        "answer_floor_refused_unanswerable": refused_bad,
    }
