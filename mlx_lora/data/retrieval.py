"""The passage retriever: KB docs ranked for a question by their text, clauses, questions asked of them and topic."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from mlx_lora.core.textnorm import compact, normalize

# Weight of the lexical score (character uni/bigram TF-IDF cosine against the doc's text) added to the best
# embedding similarity. Chosen on the sample KB's train and valid splits only (test untouched), USE embedder:
# gold passage in the top 3 for valid questions 91.7% (embeddings of texts + train questions) → 95.8% (+ clauses,
# + lexical 0.7), and for a doc nobody asked about yet (leave one doc out of the train questions, its train
# questions as queries) 47.6% → 81.5%. Weights 0.3–1.0 were within one valid question of each other.
LEXICAL_WEIGHT = 0.7
# A training question's similarity counts this share of a KB text's: a question like the query is weaker evidence
# than the doc's own words, and only docs with training questions have such entries. At full weight they push a
# doc nobody asked about yet (one added after training) out of the top: leave one doc out of the train questions
# (its train questions as queries), it came first for 66.2% of them and in the top 3 for 81.5%; at 0.8, 77.6% and
# 89.7%, while valid questions found their doc first 93.8% (89.6% at full weight), top 3 95.8% (unchanged).
# Without question entries: 81.2% / 92.9% left out, but valid's top 3 falls to 91.7%. 0.6-0.75 traded one valid
# question for ~2 points left out. Chosen on train (left out) and valid only, USE embedder.
QUESTION_WEIGHT = 0.8
# Weight of the topic classifier's probability of a doc (logistic regression on the same entries: the index's
# questions, the KB texts and their clauses; data/classifier.py) added to a doc's score. A nearest entry only sees
# its own neighbour; the classifier learns which words tell one doc's questions from another's. Chosen without
# training, on the sample KB's train questions scored out of fold (5 folds: the fold's questions out of the index
# and of the classifier) and valid, USE embedder, test untouched: first place 84.4% → 91.8% out of fold (93.8% →
# 95.8% on valid; top 3 96.5% → 98.2%); weights 0.25-2 were within 1.5 points of each other. A doc with no
# questions (one added after training) is given the row's highest probability, so it competes on its text alone:
# leave one doc's questions out and its questions found it first 77.6% → 80.9% (top 3 89.7% → 97.1%), and the
# other docs' questions, with it in the KB, 86.3% → 92.9%. Taking its own low probability instead cost the added
# doc (72.1% first). Through this index (own question left out, as training rows are built; today's clause cut):
# train first 85.6% → 92.6%, a left-out doc 78.2% → 82.9% (benchmarks/grounded/ranking.py prints these).
TOPIC_WEIGHT = 0.5
TOPIC_FOLDS = 5
MIN_CLAUSE_CHARS = 4
# Clause boundaries: CJK and ASCII sentence and clause punctuation, and an ASCII colon unless it sits between two
# digits (9:30 is a time, not a boundary: cut there, "8:00–10:00" became the clauses "可於 8" and "00–10").
# One character or a colon with a one-character look-around: linear, cannot hang.
_CLAUSE_END = re.compile(r"[；;。，,：、！？!?\n]|(?<!\d):|:(?!\d)")


def clauses(text: str) -> list[str]:
    """The clauses of a KB text worth using on their own (a short question matches one clause better than the
    whole policy): the retriever indexes them, the route's classifier learns from them. None when the text is a
    single clause; pieces under MIN_CLAUSE_CHARS characters (spaces not counted) say too little."""
    parts = [p.strip() for p in _CLAUSE_END.split(text)]
    parts = [p for p in parts if len(compact(p)) >= MIN_CLAUSE_CHARS]
    return parts if len(parts) > 1 else []


class PassageIndex:
    """Each KB doc is found through its own text, each of its clauses and the training questions known to ask for
    it; a doc's score for a query is its best entry's embedding similarity (the route's and the evaluation's
    embedder; a question entry's times QUESTION_WEIGHT) plus LEXICAL_WEIGHT × the character TF-IDF cosine of the
    query and the doc's text.

    Questions help because users word questions like other users, not like the policy text. Clauses and the
    lexical score are what find a doc no training question asks about (one added to the KB after training).
    With scikit-learn, TOPIC_WEIGHT × the topic classifier's probability of the doc is added; a training question
    looking for its own passages (leave_out_own) gets the probability of a classifier that never saw it."""

    def __init__(self, scorer, kb_texts: dict[str, str], questions: Iterable[tuple[str, str]] = ()):
        self.scorer, self.kb_texts = scorer, dict(kb_texts)
        entries = [(text, doc_id) for doc_id, text in self.kb_texts.items()]
        entries += [(part, doc_id) for doc_id, text in self.kb_texts.items() for part in clauses(text)]
        self._first_question = len(entries)
        seen = set()
        for question, doc_id in questions:
            key = compact(question)
            if doc_id in self.kb_texts and key and key not in seen:
                seen.add(key)
                entries.append((question, doc_id))
        self.texts = [t for t, _ in entries]
        self.labels = [d for _, d in entries]
        self.asked = frozenset(self.labels[self._first_question :])  # docs some training question asks for
        self._keys = [compact(t) for t in self.texts]
        self._docs = list(self.kb_texts)
        self._column = {d: i for i, d in enumerate(self._docs)}
        self._lexical, self._topics, self.missing = None, None, None
        if self._docs:
            try:
                self._lexical = _Lexical([self.kb_texts[d] for d in self._docs])
                self._topics = _Topics(scorer, self.texts, self.labels, self._first_question, self._docs)
            except ImportError:  # the eval extra is missing: still a retriever, by embeddings alone
                self.missing = (
                    "scikit-learn is not installed (pip install -e '.[eval]'): passages ranked by embeddings only"
                )

    @classmethod
    def from_examples(cls, scorer, kb_texts: dict[str, str], examples) -> PassageIndex:
        """The index inference uses: the KB texts and the answerable questions of built rows (a train split)."""
        asked = [(e.question, e.meta.get("doc_id")) for e in examples if (e.meta or {}).get("answerable")]
        return cls(scorer, kb_texts, asked)

    def doc_scores(self, queries: Sequence[str], leave_out_own: bool = False) -> np.ndarray:
        """(queries × docs) scores. leave_out_own drops question entries whose text is the query itself: a training
        row must not find its own question, or it learns from a neighbour no user question has."""
        sims = self.scorer.matrix(list(queries), self.texts)
        sims[:, self._first_question :] *= QUESTION_WEIGHT
        if leave_out_own:
            own = {k: i for i, k in enumerate(self._keys)}
            for q, query in enumerate(queries):
                i = own.get(compact(query))
                if i is not None and i >= self._first_question:  # a question entry, never the KB's own text
                    sims[q, i] = -1.0
        out = np.full((len(queries), len(self._docs)), -1.0)
        for i, doc_id in enumerate(self.labels):
            col = self._column[doc_id]
            out[:, col] = np.maximum(out[:, col], sims[:, i])
        if self._lexical is not None and len(queries):
            out += LEXICAL_WEIGHT * self._lexical.scores(list(queries))
        if self._topics is not None and len(queries):
            out += TOPIC_WEIGHT * self._topics.probabilities(list(queries), leave_out_own)
        return out

    def search(self, queries: Sequence[str], k: int, leave_out_own: bool = False) -> list[list[tuple[str, float]]]:
        """The k best docs per query as (doc_id, score), best first; ties keep KB order."""
        scores = self.doc_scores(queries, leave_out_own)
        out = []
        for row in scores:
            order = np.argsort(-row, kind="stable")[:k]
            out.append([(self._docs[j], float(row[j])) for j in order])
        return out


class _Topics:
    """The topic classifier over the index's entries, as (queries × docs) probabilities.

    Docs without question entries get each row's highest probability: the classifier learnt them from their text
    alone and would rank them below every doc users have asked about. Out-of-fold probabilities for the index's
    own questions are computed once, on first need (TOPIC_FOLDS fits, questions dealt to folds in entry order)."""

    def __init__(self, scorer, texts: list[str], labels: list[str], first_question: int, docs: list[str]):
        """texts/labels: the index's entries (KB texts and clauses first, questions from first_question on)."""
        self._scorer, self._texts, self._labels, self._first_question = scorer, texts, labels, first_question
        self._docs, self._column = docs, {d: i for i, d in enumerate(docs)}
        self._all = self._fit(range(len(texts))) if len(set(labels)) > 1 else None
        self._out_of_fold: dict[str, np.ndarray] | None = None

    def _fit(self, keep):
        """A classifier on the kept entries, and the docs none of the kept questions asks for."""
        from mlx_lora.data.classifier import TopicClassifier

        keep = list(keep)
        model = TopicClassifier(self._scorer).fit([self._texts[i] for i in keep], [self._labels[i] for i in keep])
        asked = {self._labels[i] for i in keep if i >= self._first_question}
        return model, [j for j, d in enumerate(self._docs) if d not in asked]

    def _columns(self, fitted, queries: list[str]) -> np.ndarray:
        model, unasked = fitted
        probs = model.predict_proba(queries)
        out = np.zeros((len(queries), len(self._docs)))
        for c, doc_id in enumerate(model.classes):
            out[:, self._column[doc_id]] = probs[:, c]
        if unasked:
            out[:, unasked] = out.max(axis=1, keepdims=True)
        return out

    def _own(self) -> dict[str, np.ndarray]:
        """Each question entry's probabilities from a classifier fitted without its fold."""
        if self._out_of_fold is None:
            self._out_of_fold = {}
            questions = list(range(self._first_question, len(self._texts)))
            for fold in range(TOPIC_FOLDS):
                held = questions[fold::TOPIC_FOLDS]
                if not held:
                    continue
                kept = sorted(set(range(len(self._texts))) - set(held))  # every KB text stays: every doc a class
                probs = self._columns(self._fit(kept), [self._texts[i] for i in held])
                self._out_of_fold.update({compact(self._texts[i]): row for i, row in zip(held, probs)})
        return self._out_of_fold

    def probabilities(self, queries: list[str], leave_out_own: bool) -> np.ndarray:
        """(queries × docs); with leave_out_own, a query that is one of the index's questions gets its fold's row."""
        if self._all is None:  # one doc: nothing to tell apart
            return np.zeros((len(queries), len(self._docs)))
        out = self._columns(self._all, queries)
        if leave_out_own:
            own = self._own()
            for q, query in enumerate(queries):
                row = own.get(compact(query))
                if row is not None:
                    out[q] = row
        return out


class _Lexical:
    """Character uni/bigram TF-IDF of the KB texts (IDF from the KB alone), cosine with a query."""

    def __init__(self, docs: list[str]):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self._vectorizer = TfidfVectorizer(
            analyzer="char_wb", ngram_range=(1, 2), preprocessor=normalize, sublinear_tf=True
        )
        self._docs = self._vectorizer.fit_transform(docs)

    def scores(self, queries: list[str]) -> np.ndarray:
        return (self._vectorizer.transform(queries) @ self._docs.T).toarray()
