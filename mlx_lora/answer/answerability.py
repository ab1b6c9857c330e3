"""Does this KB doc answer this question? A pairwise classifier trained on on-topic hard negatives.

The topic classifier (route.py) sees topic words, so "can the printer print in colour?" looks like the printer
doc. This model is trained on (question, doc) pairs instead: positives are training questions with their own doc;
negatives are the same questions with the one or two most similar *other* docs (on topic, wrong doc) and the
unanswerable training questions with their nearest doc. Features: the two sentence embeddings' element-wise
product and absolute difference, plus how close the question is to the doc text and to the doc's other training
questions, and how many of its characters/bigrams occur in them. Logistic regression; `score` is its decision
value (below 0 leans "not answered"). The threshold that turns a score into a refusal is calibrated out-of-fold
(calibration.calibrate_route), never on the test split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mlx_lora.core.textnorm import compact
from mlx_lora.core.threads import one_thread
from mlx_lora.data.similarity import REFUSAL

HARD_NEGATIVES = 2  # other docs paired with each answerable training question
SCALAR_WEIGHT = 5.0  # the few scalar features against 1,024 embedding columns


def _grams(text: str) -> set[str]:
    key = compact(text)
    return set(key) | {key[i : i + 2] for i in range(len(key) - 1)}


class AnswerabilityModel:
    """fit() on labelled training questions and the KB texts; score() (question, doc id) pairs."""

    def __init__(self, scorer, C: float = 1.0):
        if not hasattr(scorer, "embed"):
            raise ValueError("the answerability model needs a sentence embedder (eval.embedder use or a model)")
        self.scorer, self.C = scorer, C

    def _features(self, question: str, doc_id: str) -> np.ndarray:
        # The scorer caches embeddings by text, so these lookups embed each text once per process.
        eq, ed = self.scorer.embed([question, self.kb[doc_id]])
        others = [q for q in self.by_doc.get(doc_id, []) if q != question]  # never the question itself
        sims = sorted((self.scorer.embed(others) @ eq).tolist(), reverse=True) if others else [0.0]
        asked, doc = _grams(question), _grams(self.kb[doc_id])
        known = doc.union(*(self._grams_of[q] for q in others))
        scalars = [
            float(eq @ ed),
            sims[0],
            float(np.mean(sims[:3])),
            len(asked & doc) / max(len(asked), 1),
            len(asked & known) / max(len(asked), 1),
        ]
        return np.concatenate([eq * ed, np.abs(eq - ed), np.array(scalars) * SCALAR_WEIGHT])

    def fit(self, questions: Sequence[tuple[str, str]], kb_texts: dict[str, str]) -> AnswerabilityModel:
        """`questions`: (text, doc id or REFUSAL) training questions."""
        from sklearn.linear_model import LogisticRegression

        self.kb = dict(kb_texts)
        docs = list(self.kb)
        self.by_doc: dict[str, list[str]] = {d: [] for d in docs}
        for text, label in questions:
            if label in self.by_doc:
                self.by_doc[label].append(text)
        self._grams_of = {text: _grams(text) for text, _ in questions}
        doc_matrix = self.scorer.embed([self.kb[d] for d in docs])
        features, targets = [], []
        for text, label in questions:
            if label != REFUSAL and label not in self.kb:  # a doc without KB text: nothing to pair it with
                continue
            by_similarity = [docs[j] for j in np.argsort(-(doc_matrix @ self.scorer.embed([text])[0]))]
            if label == REFUSAL:
                pairs = [(by_similarity[0], 0)]
            else:
                pairs = [(label, 1)] + [(d, 0) for d in [d for d in by_similarity if d != label][:HARD_NEGATIVES]]
            for doc_id, target in pairs:
                features.append(self._features(text, doc_id))
                targets.append(target)
        if len(set(targets)) < 2:
            raise ValueError("the answerability model needs answerable and unanswerable pairs")
        with one_thread():
            self._model = LogisticRegression(C=self.C, class_weight="balanced", max_iter=3000)
            self._model.fit(np.array(features), targets)
        return self

    def score(self, questions: Sequence[str], doc_ids: Sequence[str]) -> np.ndarray:
        """Decision values, one per (question, doc id); lower means the doc is less likely to answer it."""
        if not len(questions):
            return np.zeros(0)
        for question in questions:
            self._grams_of.setdefault(question, _grams(question))
        with one_thread():
            return self._model.decision_function(np.array([self._features(q, d) for q, d in zip(questions, doc_ids)]))
