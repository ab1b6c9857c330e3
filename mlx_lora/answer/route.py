"""The semantic route: a topic classifier (KB docs + refusal) on train questions picks KB answer, refusal or model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlx_lora.answer.answerability import AnswerabilityModel
from mlx_lora.core.textnorm import compact
from mlx_lora.data.classifier import TopicClassifier
from mlx_lora.data.retrieval import clauses
from mlx_lora.data.similarity import REFUSAL, LabelIndex, example_labels

NEVER = 1.01  # a probability threshold no probability reaches: the uncalibrated route never retrieves or refuses


@dataclass(frozen=True)
class Neighbour:
    text: str
    label: str  # a doc id, or REFUSAL for a training question the KB cannot answer
    kind: str  # "question" (a training question) or "kb" (a KB doc's text)


@dataclass
class RouteDecision:
    kind: str  # "refuse" (score < low) | "retrieve" (refusal_p ≥ refuse_at, or confidence ≥ high) | "model"
    score: float  # similarity of the nearest neighbour of any label
    neighbour: Neighbour  # the nearest training question (else KB text) carrying `label`
    label: str  # the most probable doc id; REFUSAL when decide() refuses by P(REFUSAL)
    confidence: float  # the classifier's probability of `label`
    refusal_p: float = 0.0  # the classifier's probability of REFUSAL


def neighbours_from(train_examples, kb_texts: dict[str, str], index: LabelIndex) -> list[Neighbour]:
    """Each distinct training question with its label, then each KB doc's own text."""
    seen, out = set(), []
    for example, label in zip(train_examples, example_labels(train_examples, index)):
        key = compact(example.question)
        if key and key not in seen:
            seen.add(key)
            out.append(Neighbour(example.question, label, "question"))
    return out + [Neighbour(text, doc_id, "kb") for doc_id, text in kb_texts.items()]


def training_texts(neighbours: Sequence[Neighbour]) -> tuple[list[str], list[str]]:
    """The classifier's examples: every neighbour, plus each KB text's clauses labelled with its doc."""
    texts, labels = [n.text for n in neighbours], [n.label for n in neighbours]
    for n in neighbours:
        if n.kind == "kb":
            parts = clauses(n.text)
            texts += parts
            labels += [n.label] * len(parts)
    return texts, labels


class SemanticRoute:
    """A classifier trained on the train split names each question's class (a doc, or REFUSAL) with a probability.

      - similarity to the nearest training question or KB text < low → the question resembles nothing known:
        refuse, whatever the classifier says (kind "refuse");
      - else P(REFUSAL) ≥ refuse_at → the refusal (kind "retrieve", label REFUSAL);
      - else the most probable doc's probability ≥ high → that doc's KB answer (kind "retrieve");
      - else the model answers (kind "model": checked by KB_MATCH and the keyword rules in the answer decider).
    high and refuse_at are probabilities (0–1); low is in the scorer's units (cosine 0–1 for embedders).
    Uncalibrated (None) thresholds never retrieve and never refuse. `nearest()` (the retrieval baseline's
    nearest training question) never uses the classifier. Without scikit-learn the route can only refuse below
    `low`; `missing` says why. Beside the classifier the route fits an AnswerabilityModel (answerability.py) on the
    same questions; the answer decider (decide.py) asks it (`answer_scores`) whether the doc it is about to answer
    with answers the question, and refuses below `answer_floor` (None, the default until calibrated: never).
    """

    def __init__(
        self,
        scorer,
        neighbours: Sequence[Neighbour],
        high: float | None = None,
        low: float | None = None,
        refuse_at: float | None = None,
        classifier: TopicClassifier | None = None,
    ):
        if not neighbours:
            raise ValueError("the semantic route needs at least one neighbour")
        self.scorer, self.neighbours = scorer, list(neighbours)
        self.high = NEVER if high is None else high
        self.low = 0.0 if low is None else low
        self.refuse_at = NEVER if refuse_at is None else refuse_at
        self.missing: str | None = None
        self.classifier = classifier
        self.answerability, self.answer_floor = None, None  # floor None: the answerability check is off
        if classifier is None:
            try:
                self.classifier = TopicClassifier(scorer).fit(*training_texts(self.neighbours))
            except ImportError:
                self.missing = "scikit-learn is not installed (pip install -e '.[eval]'): no topic classifier"
            except ValueError as exc:  # one class only (e.g. no unanswerable training question and one doc)
                self.missing = str(exc)
            if self.classifier is not None and hasattr(scorer, "embed"):
                try:
                    self.answerability = AnswerabilityModel(scorer).fit(
                        [(n.text, n.label) for n in self.neighbours if n.kind == "question"],
                        {n.label: n.text for n in self.neighbours if n.kind == "kb"},
                    )
                except ValueError:  # no unanswerable or no answerable training question: nothing to learn
                    self.answerability = None

    def nearest(self, questions: Sequence[str], kinds=("question", "kb")) -> list[tuple[Neighbour, float]]:
        pool = [n for n in self.neighbours if n.kind in kinds]
        scores = self.scorer.matrix(list(questions), [n.text for n in pool])
        best = scores.argmax(axis=1)
        return [(pool[int(j)], float(scores[i, j])) for i, j in enumerate(best)]

    def classify(self, questions: Sequence[str]) -> list[RouteDecision]:
        """Per question: the most probable doc and its probability, P(REFUSAL), nearest score and neighbour.

        `label`/`confidence` are the best *doc* (not REFUSAL) and its probability; decide() turns the label into
        REFUSAL when refusal_p reaches refuse_at. Without a classifier: the nearest neighbour's label, probability 0.
        """
        return self._classify(list(questions))[0]

    def _classify(self, questions: list[str]) -> tuple[list[RouteDecision], np.ndarray, np.ndarray]:
        """classify(), plus the question × neighbour similarities and the neighbours' labels it used."""
        scores = self.scorer.matrix(questions, [n.text for n in self.neighbours])
        labels = np.array([n.label for n in self.neighbours])
        proba = self.classifier.predict_proba(questions) if self.classifier is not None else None
        classes = self.classifier.classes if self.classifier is not None else []
        docs = [k for k, c in enumerate(classes) if c != REFUSAL]
        out = []
        for i, row in enumerate(scores):
            if proba is not None and docs:
                k = max(docs, key=lambda j: proba[i, j])
                label, confidence = classes[k], float(proba[i, k])
                refusal_p = float(proba[i, classes.index(REFUSAL)]) if REFUSAL in classes else 0.0
            else:
                label, confidence, refusal_p = str(labels[int(row.argmax())]), 0.0, 0.0
            out.append(
                RouteDecision(
                    "model", float(row.max()), self._neighbour(row, labels, label), label, confidence, refusal_p
                )
            )
        return out, scores, labels

    def _neighbour(self, row: np.ndarray, labels: np.ndarray, label: str) -> Neighbour:
        """The class's nearest training question (a KB text only when the class has none), for the audit detail."""
        rank = np.array([0.0 if n.kind == "question" else -2.0 for n in self.neighbours])
        mine = np.where(labels == label, row + rank, -np.inf)
        return self.neighbours[int(mine.argmax())] if np.isfinite(mine.max()) else self.neighbours[int(row.argmax())]

    def decide(self, questions: Sequence[str]) -> list[RouteDecision]:
        out, scores, labels = self._classify(list(questions))
        for i, d in enumerate(out):
            if d.score < self.low:
                d.kind = "refuse"
            elif d.refusal_p >= self.refuse_at:
                d.kind, d.label, d.confidence = "retrieve", REFUSAL, d.refusal_p
                d.neighbour = self._neighbour(scores[i], labels, REFUSAL)
            elif d.confidence >= self.high:
                d.kind = "retrieve"
        return out

    def asked_docs(self) -> set[str]:
        """Docs some training question asks about: the only docs the classifier has learned to tell apart from the
        refusal. A doc added to the KB after training is not among them."""
        return {n.label for n in self.neighbours if n.kind == "question" and n.label != REFUSAL}

    def answer_scores(self, questions: Sequence[str], doc_ids: Sequence[str]) -> list[float | None]:
        """Answerability of each (question, doc) pair; None where there is no model, no such KB doc, or no training
        question about the doc. Half the model's evidence is how close the question is to the doc's training
        questions, so a doc nobody asked about yet (one added to the KB after training) always scored low: behind
        the check, a grounded model's correct citations of 4 added docs were refused 28 times in 80 questions."""
        model = self.answerability
        if model is None:
            return [None] * len(questions)
        known = [i for i, d in enumerate(doc_ids) if d in model.kb and model.by_doc.get(d)]
        scores = model.score([questions[i] for i in known], [doc_ids[i] for i in known])
        out: list[float | None] = [None] * len(questions)
        for i, score in zip(known, scores):
            out[i] = float(score)
        return out

    def describe(self) -> dict:
        kinds = [n.kind for n in self.neighbours]
        c = self.classifier
        floor = None if self.answer_floor is None else round(self.answer_floor, 4)
        return {
            "high": round(self.high, 4),
            "low": round(self.low, 4),
            "refuse_at": round(self.refuse_at, 4),
            "answer_floor": floor,
            "classifier": None
            if c is None
            else (
                f"logistic regression on char {c.ngram_range[0]}–"
                f"{c.ngram_range[1]}-gram TF-IDF" + (" + embeddings" if hasattr(self.scorer, "embed") else "")
            ),
            "classes": len(c.classes) if c is not None else 0,
            "missing": self.missing,
            "training_questions": kinds.count("question"),
            "kb_texts": kinds.count("kb"),
        }
