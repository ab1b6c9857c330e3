"""The semantic route: a topic classifier (KB docs + refusal) on train questions picks KB answer, refusal or model."""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlx_lora.answer.answerability import AnswerabilityModel
from mlx_lora.core.textnorm import compact, normalize
from mlx_lora.core.threads import one_thread
from mlx_lora.data.similarity import REFUSAL, LabelIndex, example_labels

# The share of held-out questions the model is assumed to answer right when the route leaves them to it. The 0.5B
# LoRA model's topic accuracy on reworded questions measured 25–67% (48.1% on the 40 test rows of README.md's
# measured section): 0.5 is a middle estimate.
MODEL_ACCURACY = 0.5
# Out-of-fold, the answerability floor may refuse at most this share of answerable questions.
ANSWER_FLOOR_BUDGET = 0.01
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


def kb_clauses(text: str) -> list[str]:
    """A KB text cut at clause punctuation: question-sized pieces, each still saying something about its doc."""
    parts = [p.strip() for p in re.split(r"[；;，,。！!？?\n]", text)]
    return [p for p in parts if len(compact(p)) >= 4]


def training_texts(neighbours: Sequence[Neighbour]) -> tuple[list[str], list[str]]:
    """The classifier's examples: every neighbour, plus each KB text's clauses labelled with its doc."""
    texts, labels = [n.text for n in neighbours], [n.label for n in neighbours]
    for n in neighbours:
        if n.kind == "kb":
            clauses = kb_clauses(n.text)
            texts += clauses
            labels += [n.label] * len(clauses)
    return texts, labels


class TopicClassifier:
    """Char n-gram TF-IDF ⊕ sentence embeddings → multinomial logistic regression over doc ids and REFUSAL.

    Character 1–3-grams (analyzer char_wb on normalised text) suit Chinese, where a word is one to three
    characters and nothing separates words; the embedder adds meaning across rewordings and languages. The
    embedding block is scaled by `embedding_weight` so it is not drowned by thousands of sparse n-gram columns.
    class_weight "balanced": the refusal class has several times more examples than any doc, which would
    otherwise pull answerable questions towards refusing. C 10, weight 2, n-grams (1, 3): the best of a small
    grid by 5-fold cross-validation on the sample train split (no valid or test row used): 0.85–0.87 accuracy
    over three fold seeds, 0.88–0.89 with each KB text's clauses as extra examples of its doc (training_texts).
    A scorer without `embed` (the character fallback) gives n-gram features only.
    """

    def __init__(self, scorer=None, ngram_range=(1, 3), embedding_weight: float = 2.0, C: float = 10.0):
        self.scorer, self.ngram_range, self.embedding_weight, self.C = scorer, ngram_range, embedding_weight, C
        self.classes: list[str] = []

    def _features(self, texts: Sequence[str]):
        from scipy.sparse import csr_matrix, hstack

        grams = self._vectorizer.transform(list(texts))
        if self.scorer is None or not hasattr(self.scorer, "embed"):
            return grams
        return hstack([grams, csr_matrix(self.scorer.embed(list(texts)) * self.embedding_weight)]).tocsr()

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> TopicClassifier:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        if len(set(labels)) < 2:
            raise ValueError("the topic classifier needs at least two classes")
        self._vectorizer = TfidfVectorizer(
            analyzer="char_wb", ngram_range=self.ngram_range, preprocessor=normalize, sublinear_tf=True
        )
        self._vectorizer.fit(list(texts))
        with one_thread():
            self._model = LogisticRegression(C=self.C, class_weight="balanced", max_iter=2000)
            self._model.fit(self._features(texts), list(labels))
        self.classes = [str(c) for c in self._model.classes_]
        return self

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Probabilities, one row per text, columns in `self.classes` order."""
        if not len(texts):
            return np.zeros((0, len(self.classes)))
        with one_thread():
            return self._model.predict_proba(self._features(texts))


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
