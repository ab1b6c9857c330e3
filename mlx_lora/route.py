"""The semantic route: KB answer when a question is close to a known one, refusal when close to nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .similarity import REFUSAL, LabelIndex, example_labels
from .textnorm import compact


@dataclass(frozen=True)
class Neighbour:
    text: str
    label: str  # a doc id, or REFUSAL for a training question the KB cannot answer
    kind: str  # "question" (a training question) or "kb" (a KB doc's text)


@dataclass
class RouteDecision:
    kind: str  # "refuse" (score < low) | "retrieve" (else confidence ≥ high) | "model" (otherwise)
    score: float  # similarity of the nearest neighbour of any label
    neighbour: Neighbour  # the nearest neighbour carrying `label`
    label: str  # the label the k nearest neighbours vote for
    confidence: float  # that label's share of the similarity-weighted vote


def neighbours_from(train_examples, kb_texts: dict[str, str], index: LabelIndex) -> list[Neighbour]:
    """Each distinct training question with its label, then each KB doc's own text."""
    seen, out = set(), []
    for example, label in zip(train_examples, example_labels(train_examples, index)):
        key = compact(example.question)
        if key and key not in seen:
            seen.add(key)
            out.append(Neighbour(example.question, label, "question"))
    return out + [Neighbour(text, doc_id, "kb") for doc_id, text in kb_texts.items()]


class SemanticRoute:
    """The k nearest neighbours of a question among training questions and KB texts vote for a label.

    Each neighbour votes for its label (a doc, or REFUSAL for a known unanswerable question) with its
    similarity; `confidence` is the winning label's share of the vote. On the sample valid split this share
    separates right from wrong retrievals far better than the top similarity (ROC AUC 0.83 vs 0.70).
      - nearest similarity < low → the question resembles nothing known: refuse (even when its far-away
        neighbours happen to agree);
      - else confidence ≥ high → the winning label's answer (the KB answer, or the refusal);
      - else the model answers.
    high is a share (0–1); low is in the scorer's units (cosine 0–1 for embedders).
    """

    def __init__(self, scorer, neighbours: Sequence[Neighbour], high: float | None = None,
                 low: float | None = None, k: int = 5):
        if not neighbours:
            raise ValueError("the semantic route needs at least one neighbour")
        self.scorer, self.neighbours, self.k = scorer, list(neighbours), k
        self.high = 1.01 if high is None else high  # uncalibrated: never retrieve, never refuse
        self.low = 0.0 if low is None else low

    def nearest(self, questions: Sequence[str], kinds=("question", "kb")) -> list[tuple[Neighbour, float]]:
        pool = [n for n in self.neighbours if n.kind in kinds]
        scores = self.scorer.matrix(list(questions), [n.text for n in pool])
        best = scores.argmax(axis=1)
        return [(pool[int(j)], float(scores[i, j])) for i, j in enumerate(best)]

    def vote(self, questions: Sequence[str]) -> list[RouteDecision]:
        """Label, confidence, nearest score and neighbour per question (kind left to decide())."""
        scores = self.scorer.matrix(list(questions), [n.text for n in self.neighbours])
        out = []
        for row in scores:
            top = np.argsort(-row, kind="stable")[: self.k]
            votes: dict[str, float] = {}
            for j in top:
                votes[self.neighbours[j].label] = votes.get(self.neighbours[j].label, 0.0) + float(row[j])
            label = max(votes, key=votes.get)  # ties: the label met first, i.e. the nearer one
            total = sum(votes.values())
            near = next(self.neighbours[j] for j in top if self.neighbours[j].label == label)
            out.append(RouteDecision("model", float(row[top[0]]), near, label, votes[label] / total if total else 0.0))
        return out

    def decide(self, questions: Sequence[str]) -> list[RouteDecision]:
        out = self.vote(questions)
        for d in out:
            d.kind = "refuse" if d.score < self.low else "retrieve" if d.confidence >= self.high else "model"
        return out

    def describe(self) -> dict:
        kinds = [n.kind for n in self.neighbours]
        return {"high": round(self.high, 4), "low": round(self.low, 4), "k": self.k,
                "training_questions": kinds.count("question"), "kb_texts": kinds.count("kb")}


def _midpoint(values: np.ndarray, k: int) -> float:
    return float(values[k] if k == 0 else (values[k] + values[k - 1]) / 2)


def calibrate(confidence: Sequence[float], correct: Sequence[bool], scores: Sequence[float],
              answerable: Sequence[bool], precision: float = 0.95) -> dict:
    """Pick (low, high) on the valid split from the route's vote for each valid question.

    For every valid row we know the nearest similarity, the vote's confidence, whether the voted label is the
    right one (`correct`: the expected doc, or REFUSAL for an unanswerable question) and whether the question
    is answerable at all.
      - low = the highest similarity t such that, of the valid rows scoring < t, at least `precision` are
        unanswerable: refusing there is right that often. None → 0 (the route never refuses).
      - high = among the rows left (score ≥ low), the lowest confidence t such that, of those with
        confidence ≥ t, at least `precision` get the right answer from the vote: the route answers alone
        only where that was reliable. None → 1.01 (never retrieve: always ask the model).
    Each threshold sits midway between the two valid values it separates, so unseen values between them
    are not decided by a tie.
    """
    conf, s = np.asarray(confidence, dtype=float), np.asarray(scores, dtype=float)
    ok, ans = np.asarray(correct, dtype=bool), np.asarray(answerable, dtype=bool)
    low, values = 0.0, np.unique(s)
    for k in range(len(values) - 1, 0, -1):  # refuse the rows scoring below values[k]
        if (~ans[s < values[k]]).mean() >= precision:
            low = _midpoint(values, k)
            break
    kept = s >= low
    high, levels = 1.01, np.unique(conf[kept])
    for k, t in enumerate(levels):
        if ok[kept & (conf >= t)].mean() >= precision:
            high = _midpoint(levels, k)
            break
    retrieved, refused = kept & (conf >= high), ~kept
    return {
        "high": round(high, 4), "low": round(low, 4), "precision_target": precision, "valid_rows": len(s),
        "retrieved": int(retrieved.sum()), "refused": int(refused.sum()),
        "to_model": int(len(s) - retrieved.sum() - refused.sum()),
        "retrieved_correct": int((retrieved & ok).sum()), "refused_unanswerable": int((refused & ~ans).sum()),
    }


def calibrate_route(route: SemanticRoute, valid_examples, index: LabelIndex, precision: float = 0.95) -> dict:
    """Vote on the valid split and set route.high / route.low (see calibrate)."""
    labels = example_labels(valid_examples, index)
    votes = route.vote([e.question for e in valid_examples])
    info = calibrate([v.confidence for v in votes], [v.label == lab for v, lab in zip(votes, labels)],
                     [v.score for v in votes], [lab != REFUSAL for lab in labels], precision)
    route.high, route.low = info["high"], info["low"]
    return info
