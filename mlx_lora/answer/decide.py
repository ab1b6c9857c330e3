"""The answer decider: each question's final answer and source from rules, route, answerability and the model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from mlx_lora.answer.rules import MAX_QUESTION_CHARS, Rule, match_rules
from mlx_lora.data.grounded import parse_citation
from mlx_lora.data.similarity import REFUSAL, LabelIndex

SOURCES = ("RULE_OVERRIDE", "KB_RETRIEVAL", "KB_MATCH", "REFUSAL", "MODEL_GENERATED")


@dataclass
class Decision:
    answer: str | None
    source: str
    detail: dict = field(default_factory=dict)


def _rule_detail(found: list[tuple[Rule, str]]) -> dict:
    rule, why = found[0]
    return {
        "rule": rule.id,
        **({"doc_id": rule.doc_id} if rule.doc_id else {}),
        "matched": why,
        "priority": rule.priority,
        "also_matched": [other.id for other, _ in found[1:]],
    }


def _r(x: float) -> float:
    return round(float(x), 4)


def _note_cut(decision: Decision, length: int) -> Decision:
    """Say in the detail that only the start of an over-long question was read."""
    if length <= MAX_QUESTION_CHARS:
        return decision
    cut = f"the question has {length} characters; only the first {MAX_QUESTION_CHARS} were read"
    return Decision(decision.answer, decision.source, {**decision.detail, "question_cut": cut})


class Decider:
    """Final answer and source for each question, from keyword rules, the semantic route and the model's answer.

    Order: the route refuses (REFUSAL) when confident the KB cannot answer, even where a keyword rule matches;
    else a matching rule (highest priority) overrides the model unless the model's answer already reproduces the
    rule's doc (≥ kb_match_threshold similar: KB_MATCH); else the route retrieves (KB_RETRIEVAL) when confident;
    else the model's answer is checked: nearest the refusal → REFUSAL; ≥ kb_match_threshold similar to a doc →
    KB_MATCH with that doc's KB answer (so a near-miss never keeps a wrong number); about the doc the route also
    voted for, but not that similar → that doc's KB answer (KB_RETRIEVAL, "route and model agree"); otherwise
    MODEL_GENERATED as written.

    Why an on-topic answer does not stop a rule: a small tuned model answers the right topic with invented
    details ("the VPN gateway is 10.8.0.1"); the KB text is on the same topic and right, so it wins unless the
    model already says what the KB says.

    Last, any KB answer (rule, route or matched model answer) whose doc the route's answerability model says
    does not answer the question (score below the calibrated answer_floor) becomes the refusal.

    With model_first (grounded models, which read the retrieved passages and cite one), a model answer that
    cites a doc and reproduces its text, or that is the refusal, is the answer (KB_MATCH / REFUSAL, by the model)
    unless a guard overrules it: a refuse or override rule, the route's confident refusal, the answerability
    check. The route's retrieval no longer pre-empts it: the model saw the passages, the classifier only the
    question. Nor does the route's refusal overrule a citation of a doc no training question asks about (a doc
    added after training): the classifier never saw that doc's questions, so to it they look unanswerable (with
    4 docs held out of training it overruled 12 of the model's answers about them, wrongly 8 times, rightly none).

    Rule actions: override (above) and refuse compete by priority; a refuse rule is obeyed even against the
    route (it is the author's explicit choice, and a refusal invents nothing). An append rule changes no
    decision: the answer decided without it gets the rule's KB text added, unless it already is that text.
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        doc_answers: dict[str, str],
        index: LabelIndex,
        refusal: str,
        kb_match_threshold: float = 0.8,
        route=None,
        model_first: bool = False,
    ):
        self.rules, self.doc_answers, self.index = list(rules), doc_answers, index
        self.refusal, self.threshold, self.route = refusal, kb_match_threshold, route
        self.model_first = model_first
        # KB docs the route cannot judge (no training question asks about them): its refusal yields to a model
        # that cites one of them.
        self.unasked = set(doc_answers) - route.asked_docs() if route is not None else set()

    def cited(self, answer: str | None) -> tuple[str | None, str | None]:
        """(the doc id a model answer cites, if it is a KB doc; the answer without the citation)."""
        if answer is None:
            return None, None
        doc_id, text = parse_citation(answer)
        return (doc_id, text) if doc_id in self.doc_answers else (None, answer)

    def _model_verdict(self, scores, cited: str | None) -> str | None:
        """What the model's answer commits to: a doc id (it reproduces that doc's answer; the one it cites when it
        cites one), REFUSAL, or None (neither: a paraphrase or an invention)."""
        j = int(scores.argmax())
        label, score = self.index.labels[j], float(scores[j])
        if cited is not None:
            return cited if self._reproduces(scores, cited) else None
        if label == REFUSAL:
            return REFUSAL
        return label if score >= self.threshold else None

    def _reproduces(self, scores, doc_id: str) -> bool:
        """The model's answer says what doc_id's KB answer says: ≥ threshold similar to it."""
        return (
            max((scores[j] for j, lab in enumerate(self.index.labels) if lab == doc_id), default=0.0) >= self.threshold
        )

    def _model_first(self, answer: str, verdict: str, cited: str | None, r, route_refuses: bool) -> Decision:
        """The model committed to a doc or to the refusal; only the route's confident refusal overrules a doc."""
        detail = {"by": "model", **({"cited": cited} if cited else {})}
        if r is not None:
            detail |= {"route": r.kind, "vote": r.label, "confidence": _r(r.confidence)}
        if verdict == REFUSAL:
            return Decision(self.refusal, "REFUSAL", detail)
        if route_refuses and verdict in self.unasked:
            detail["route_refusal_set_aside"] = "no training question asks about the cited doc"
        elif route_refuses:
            why = {"low": self.route.low} if r.kind == "refuse" else {"refuse_at": self.route.refuse_at}
            return Decision(
                self.refusal,
                "REFUSAL",
                {
                    **detail,
                    "by": "route",
                    "instead_of": "KB_MATCH",
                    "model_doc": verdict,
                    "model_answer": answer,
                    **why,
                },
            )
        return Decision(self.doc_answers[verdict], "KB_MATCH", {**detail, "doc_id": verdict})

    def _check_model(self, answer: str, scores, detail: dict, vote: str | None = None) -> Decision:
        j = int(scores.argmax())
        label, score = self.index.labels[j], float(scores[j])
        detail = {**detail, "nearest": label, "score": _r(score)}
        if label == REFUSAL:
            return Decision(self.refusal if score >= self.threshold else answer, "REFUSAL", {**detail, "by": "model"})
        if score >= self.threshold:
            return Decision(
                self.doc_answers[label], "KB_MATCH", {**detail, "doc_id": label, "model_answer": answer, "by": "model"}
            )
        if label == vote:  # two independent signals name the same doc: its KB text beats the model's paraphrase
            return Decision(
                self.doc_answers[label],
                "KB_RETRIEVAL",
                {**detail, "doc_id": label, "by": "route and model agree", "model_answer": answer},
            )
        return Decision(answer, "MODEL_GENERATED", {**detail, "by": "model"})

    def settled(self, questions: Sequence[str]) -> list[Decision | None]:
        """Per question, its final decision when no model answer could change its answer or source, else None
        (the model must answer first): a refuse rule and the route's refusal answer with the refusal whatever the
        model says, and the route's confident retrieval reads the question only (unless model_first, where a
        model's cited answer comes before it). decide() with the model's answer gives the same answer and source;
        only the detail differs (with model_first a refusal the model also gives is "by": "model" there)."""
        pending = [None] * len(questions)
        return [d if self._settles(d) else None for d in self.decide(questions, pending)]

    def _settles(self, decision: Decision) -> bool:
        """Decided (with no model answer given) by a refuse rule or the route's refusal; or, unless model_first,
        by the route's branch (its retrieval, and the answerability check of it, read the question only). With
        model_first and a KB doc the route cannot judge, its refusal waits: the model may cite that doc."""
        detail = decision.detail
        if decision.source == "REFUSAL" and detail.get("by") == "rule":
            return True
        if decision.source == "REFUSAL" and detail.get("by") == "route":
            return not (self.model_first and self.unasked)
        return not self.model_first and detail.get("route") in ("refuse", "retrieve")

    def decide(self, questions: Sequence[str], model_answers: Sequence[str | None]) -> list[Decision]:
        lengths = [len(q) for q in questions]
        # Rules, route and answerability read a question's first MAX_QUESTION_CHARS: a question is a sentence or two.
        questions = [q[:MAX_QUESTION_CHARS] for q in questions]
        return [_note_cut(d, n) for d, n in zip(self._decide(questions, model_answers), lengths)]

    def _decide(self, questions: Sequence[str], model_answers: Sequence[str | None]) -> list[Decision]:
        citations = [self.cited(a) for a in model_answers]
        model_answers = [text for _, text in citations]
        given = [i for i, a in enumerate(model_answers) if a is not None]
        matrix = self.index.scores([model_answers[i] for i in given]) if given else None
        scores = {i: matrix[k] for k, i in enumerate(given)}
        routed = self.route.decide(list(questions)) if self.route is not None else [None] * len(questions)
        decisions, appending = [], []
        for i, question in enumerate(questions):
            found = match_rules(self.rules, question)
            deciding = [(rule, why) for rule, why in found if rule.action != "append"]
            decisions.append(self._decide_one(model_answers[i], scores.get(i), routed[i], deciding, citations[i][0]))
            appending.append([(rule, why) for rule, why in found if rule.action == "append"])
        decisions = self._check_answerable(list(questions), decisions)
        return [self._append(d, a) if a else d for d, a in zip(decisions, appending)]

    def _check_answerable(self, questions: list[str], decisions: list[Decision]) -> list[Decision]:
        """A KB answer (from a keyword rule, the route or a model answer that matched it) whose doc, by the
        route's answerability model, does not answer the question becomes the refusal: a topic word is not an
        answer ("can the printer print in colour?" is about the printer doc, which does not say)."""
        floor = getattr(self.route, "answer_floor", None)
        checked = [
            i
            for i, d in enumerate(decisions)
            if d.source in ("RULE_OVERRIDE", "KB_RETRIEVAL", "KB_MATCH") and d.detail.get("doc_id")
        ]
        if floor is None or not checked:
            return decisions
        scores = self.route.answer_scores(
            [questions[i] for i in checked], [decisions[i].detail["doc_id"] for i in checked]
        )
        for i, score in zip(checked, scores):
            if score is not None and score < floor:
                d = decisions[i]
                decisions[i] = Decision(
                    self.refusal,
                    "REFUSAL",
                    {
                        **d.detail,
                        "by": "answerability",
                        "instead_of": d.source,
                        "answerability": _r(score),
                        "answer_floor": _r(floor),
                    },
                )
        return decisions

    def _append(self, decision: Decision, found: list[tuple[Rule, str]]) -> Decision:
        """The highest-priority append rule adds its KB text after the decided answer (once, never to itself)."""
        rule, why = found[0]
        text = self.doc_answers[rule.doc_id]
        added = decision.answer is not None and decision.answer.strip() != text.strip()
        detail = {**decision.detail, "append": {"rule": rule.id, "doc_id": rule.doc_id, "matched": why, "added": added}}
        return Decision(f"{decision.answer}\n{text}" if added else decision.answer, decision.source, detail)

    def _decide_one(
        self, answer: str | None, scores, r, found: list[tuple[Rule, str]], cited: str | None = None
    ) -> Decision:
        """One question's decision from its model answer (and its similarity to each KB answer), route decision
        and matching override/refuse rules, in the order the class docstring gives."""
        detail: dict = {}
        if found and found[0][0].action == "refuse":
            return Decision(self.refusal, "REFUSAL", {**_rule_detail(found), "by": "rule"})
        # A keyword names a topic, not an answerable question ("can the printer print in colour?" hits the
        # printer rule, but the KB does not say): when the route is confident the KB cannot answer, it wins.
        route_refuses = r is not None and (r.kind == "refuse" or (r.kind == "retrieve" and r.label == REFUSAL))
        verdict = self._model_verdict(scores, cited) if answer is not None and self.model_first else None
        if verdict is not None and not (found and not route_refuses):
            return self._model_first(answer, verdict, cited, r, route_refuses)
        if found and not route_refuses:
            rule = found[0][0]
            detail = _rule_detail(found)
            if answer is None or not self._reproduces(scores, rule.doc_id):
                if answer is not None:
                    j = int(scores.argmax())
                    detail.update(model_topic=self.index.labels[j], model_score=_r(scores[j]))
                return Decision(self.doc_answers[rule.doc_id], "RULE_OVERRIDE", detail)
            detail = {"rule_checked": rule.id}  # the model already says what the doc says: KB_MATCH below
        elif r is not None and r.kind != "model":
            n = r.neighbour
            detail = {
                "route": r.kind,
                "neighbour": n.text,
                "neighbour_kind": n.kind,
                "score": _r(r.score),
                "vote": r.label,
                "confidence": _r(r.confidence),
            }
            if found:
                detail["overrules"] = found[0][0].id
            if r.kind == "refuse":
                return Decision(self.refusal, "REFUSAL", {**detail, "by": "route", "low": self.route.low})
            if r.label == REFUSAL:
                return Decision(self.refusal, "REFUSAL", {**detail, "by": "route", "refuse_at": self.route.refuse_at})
            return Decision(self.doc_answers[r.label], "KB_RETRIEVAL", {**detail, "doc_id": r.label})
        elif r is not None:
            detail = {"route": "model", "route_score": _r(r.score), "vote": r.label, "confidence": _r(r.confidence)}
        if answer is None:
            return Decision(None, "NO_ANSWER", {**detail, "why": "no rule or route decision; the model would answer"})
        return self._check_model(answer, scores, detail, r.label if r is not None else None)
