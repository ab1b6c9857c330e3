"""YAML keyword/regex rules → KB docs, answer attribution (sources with detail) and the JSONL audit log."""

from __future__ import annotations

import json
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import re2
import yaml

from mlx_lora.core.errors import UserError, located
from mlx_lora.data.similarity import REFUSAL, LabelIndex
from mlx_lora.core.textnorm import compact
from mlx_lora.core.userfiles import load_yaml

SOURCES = ("RULE_OVERRIDE", "KB_RETRIEVAL", "KB_MATCH", "REFUSAL", "MODEL_GENERATED")
# override: answer with doc_id's KB text; refuse: answer with the refusal (no doc_id); append: answer as if the rule
# were absent, then add doc_id's KB text as the related policy.
ACTIONS = ("override", "refuse", "append")
RULE_KEYS = ("id", "doc_id", "keywords", "regex", "unless", "action", "priority", "note")
MAX_PATTERN_CHARS = 300
_RE2_MAX_MEM = 8 << 20  # bytes of compiled program per pattern; a pattern that needs more is rejected at load


@dataclass
class Rule:
    id: str
    doc_id: str | None  # None only for refuse rules
    keywords: list[str]
    regex: list[tuple[str, object]]  # (source text, compiled re2 pattern)
    unless: list[str] = field(default_factory=list)
    action: str = "override"
    priority: int = 0
    line: int | None = None

    def match(self, question: str) -> str | None:
        """What made the rule match ("keyword: VPN" / "regex: …"), or None."""
        key = compact(question)
        if any(compact(word) in key for word in self.unless):
            return None
        for word in self.keywords:
            if compact(word) in key:
                return f"keyword: {word}"
        text = regex_text(question)
        for source, pattern in self.regex:
            if pattern.search(text):
                return f"regex: {source}"
        return None


@dataclass
class Decision:
    answer: str | None
    source: str
    detail: dict = field(default_factory=dict)


def regex_text(question: str) -> str:
    """What regexes see: full-width → half-width (NFKC), lower case, runs of whitespace as one space."""
    return " ".join(unicodedata.normalize("NFKC", question).lower().split())


def _options():
    options = re2.Options()
    options.log_errors = False  # the error is reported once, with file:line, by us
    options.case_sensitive = False
    options.max_mem = _RE2_MAX_MEM
    return options


def compile_pattern(source: str, path, line):
    """re2 (linear time: no catastrophic backtracking) or a file:line error saying what to change."""
    if len(source) > MAX_PATTERN_CHARS:
        raise located(path, line, f"regex is {len(source)} characters; keep it under {MAX_PATTERN_CHARS}")
    try:
        pattern = re2.compile(source, _options())
    except re2.error as exc:
        why = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise located(path, line, f"regex {source!r} is not supported ({why}); re2 syntax has no look-around "
                                  "or back-references") from None
    if pattern.search("") is not None:
        raise located(path, line, f"regex {source!r} matches an empty question, i.e. every question; make it specific")
    return pattern


def _strings(node, value, path, what: str) -> list[tuple[str, int]]:
    """A YAML list of non-empty strings (or one string) with each item's line."""
    if value is None:
        return []
    if isinstance(value, str):
        value, items = [value], [node]
    elif isinstance(value, list) and isinstance(node, yaml.SequenceNode):
        items = node.value
    else:
        raise located(path, node.start_mark.line + 1, f"{what} must be a list of strings")
    out = []
    for item, item_node in zip(value, items):
        line = item_node.start_mark.line + 1
        if not isinstance(item, (str, int, float)) or isinstance(item, bool) or not str(item).strip():
            raise located(path, line, f"{what}: each entry must be a non-empty string, got {item!r}")
        out.append((str(item).strip(), line))
    return out


def _rule(data, node, path, kb) -> Rule:
    line = node.start_mark.line + 1
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise located(path, line, "each rule must be a mapping with id, doc_id, keywords/regex, action, priority")
    nodes = {k.value: v for k, v in node.value}
    unknown = [k for k in data if k not in RULE_KEYS]
    if unknown:
        bad = unknown[0]
        raise located(path, nodes[bad].start_mark.line + 1 if bad in nodes else line,
                      f"unknown key {bad!r} in a rule; valid keys: {', '.join(RULE_KEYS)}")
    at = lambda key: nodes[key].start_mark.line + 1 if key in nodes else line  # noqa: E731
    rule_id = data.get("id")
    if not isinstance(rule_id, str) or not rule_id.strip():
        raise located(path, line, "every rule needs an id (a short name such as vpn-setup)")
    action = data.get("action", "override")
    if action not in ACTIONS:
        raise located(path, at("action"), f"rule {rule_id!r}: unknown action {action!r}; use one of "
                                          f"{', '.join(ACTIONS)}")
    doc_id = data.get("doc_id")
    if action == "refuse":
        if doc_id is not None:
            raise located(path, at("doc_id"), f"rule {rule_id!r}: a refuse rule answers with the refusal; "
                                              "remove its doc_id")
    elif not isinstance(doc_id, str) or not doc_id.strip():
        raise located(path, at("doc_id"), f"rule {rule_id!r} needs a doc_id from the knowledge base")
    elif kb is not None and doc_id not in kb:
        raise located(path, at("doc_id"), f"rule {rule_id!r}: doc_id {doc_id!r} is not in the knowledge base")
    priority = data.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise located(path, at("priority"), f"rule {rule_id!r}: priority must be a whole number (higher wins)")
    keywords = _strings(nodes.get("keywords"), data.get("keywords"), path, f"rule {rule_id!r} keywords")
    for word, word_line in keywords:
        if not compact(word):
            raise located(path, word_line, f"keyword {word!r} is only punctuation/spaces and would match everything")
    regex = [(src, compile_pattern(src, path, ln))
             for src, ln in _strings(nodes.get("regex"), data.get("regex"), path, f"rule {rule_id!r} regex")]
    unless = _strings(nodes.get("unless"), data.get("unless"), path, f"rule {rule_id!r} unless")
    if not keywords and not regex:
        raise located(path, line, f"rule {rule_id!r} needs at least one keyword or regex")
    return Rule(rule_id.strip(), doc_id, [w for w, _ in keywords], regex,
                [w for w, _ in unless if compact(w)], action, priority, line)


def load_rules(path: str | Path, kb: dict | None = None) -> list[Rule]:
    """Parse and validate a rules file; every problem is a `file:line: …` error. Rules keep file order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: rules file not found")
    data, root = load_yaml(path, "YAML syntax")
    if not isinstance(data, dict) or "rules" not in data:
        raise located(path, 1, "expected a top-level `rules:` list")
    extra = [k for k in data if k != "rules"]
    if extra:
        raise located(path, 1, f"unknown top-level key {extra[0]!r}; the file holds only `rules:`")
    rules_node = next(v for k, v in root.value if k.value == "rules")
    if not isinstance(data["rules"], list):
        raise located(path, rules_node.start_mark.line + 1, "`rules:` must be a list of rules (each starts with -)")
    rules, seen = [], {}
    for item, node in zip(data["rules"], rules_node.value):
        rule = _rule(item, node, path, kb)
        if rule.id in seen:
            raise located(path, rule.line, f"duplicate rule id {rule.id!r} (first at line {seen[rule.id]})")
        seen[rule.id] = rule.line
        rules.append(rule)
    return rules


def match_rules(rules: Sequence[Rule], question: str) -> list[tuple[Rule, str]]:
    """Matching rules, highest priority first; equal priorities keep file order."""
    found = [(rule, why) for rule in rules if (why := rule.match(question))]
    return sorted(found, key=lambda pair: -pair[0].priority)


def _rule_detail(found: list[tuple[Rule, str]]) -> dict:
    rule, why = found[0]
    return {"rule": rule.id, **({"doc_id": rule.doc_id} if rule.doc_id else {}), "matched": why,
            "priority": rule.priority, "also_matched": [other.id for other, _ in found[1:]]}


def _r(x: float) -> float:
    return round(float(x), 4)


class RuleLayer:
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

    Rule actions: override (above) and refuse compete by priority; a refuse rule is obeyed even against the
    route (it is the author's explicit choice, and a refusal invents nothing). An append rule changes no
    decision: the answer decided without it gets the rule's KB text added, unless it already is that text.
    """

    def __init__(self, rules: Sequence[Rule], doc_answers: dict[str, str], index: LabelIndex, refusal: str,
                 kb_match_threshold: float = 0.8, route=None):
        self.rules, self.doc_answers, self.index = list(rules), doc_answers, index
        self.refusal, self.threshold, self.route = refusal, kb_match_threshold, route

    def _reproduces(self, scores, doc_id: str) -> bool:
        """The model's answer says what doc_id's KB answer says: ≥ threshold similar to it."""
        return max((scores[j] for j, lab in enumerate(self.index.labels) if lab == doc_id), default=0.0) >= self.threshold

    def _check_model(self, answer: str, scores, detail: dict, vote: str | None = None) -> Decision:
        j = int(scores.argmax())
        label, score = self.index.labels[j], float(scores[j])
        detail = {**detail, "nearest": label, "score": _r(score)}
        if label == REFUSAL:
            return Decision(self.refusal if score >= self.threshold else answer, "REFUSAL",
                            {**detail, "by": "model"})
        if score >= self.threshold:
            return Decision(self.doc_answers[label], "KB_MATCH", {**detail, "doc_id": label, "model_answer": answer})
        if label == vote:  # two independent signals name the same doc: its KB text beats the model's paraphrase
            return Decision(self.doc_answers[label], "KB_RETRIEVAL",
                            {**detail, "doc_id": label, "by": "route and model agree", "model_answer": answer})
        return Decision(answer, "MODEL_GENERATED", detail)

    def decide(self, questions: Sequence[str], model_answers: Sequence[str | None]) -> list[Decision]:
        given = [i for i, a in enumerate(model_answers) if a is not None]
        matrix = self.index.scores([model_answers[i] for i in given]) if given else None
        scores = {i: matrix[k] for k, i in enumerate(given)}
        routed = self.route.decide(list(questions)) if self.route is not None else [None] * len(questions)
        decisions, appending = [], []
        for i, question in enumerate(questions):
            found = match_rules(self.rules, question)
            deciding = [(rule, why) for rule, why in found if rule.action != "append"]
            decisions.append(self._decide_one(model_answers[i], scores.get(i), routed[i], deciding))
            appending.append([(rule, why) for rule, why in found if rule.action == "append"])
        decisions = self._check_answerable(list(questions), decisions)
        return [self._append(d, a) if a else d for d, a in zip(decisions, appending)]

    def _check_answerable(self, questions: list[str], decisions: list[Decision]) -> list[Decision]:
        """A KB answer (from a keyword rule, the route or a model answer that matched it) whose doc, by the
        route's answerability model, does not answer the question becomes the refusal: a topic word is not an
        answer ("can the printer print in colour?" is about the printer doc, which does not say)."""
        floor = getattr(self.route, "answer_floor", None)
        checked = [i for i, d in enumerate(decisions)
                   if d.source in ("RULE_OVERRIDE", "KB_RETRIEVAL", "KB_MATCH") and d.detail.get("doc_id")]
        if floor is None or not checked:
            return decisions
        scores = self.route.answer_scores([questions[i] for i in checked],
                                          [decisions[i].detail["doc_id"] for i in checked])
        for i, score in zip(checked, scores):
            if score is not None and score < floor:
                d = decisions[i]
                decisions[i] = Decision(self.refusal, "REFUSAL", {**d.detail, "by": "answerability",
                                                                  "instead_of": d.source, "answerability": _r(score),
                                                                  "answer_floor": _r(floor)})
        return decisions

    def _append(self, decision: Decision, found: list[tuple[Rule, str]]) -> Decision:
        """The highest-priority append rule adds its KB text after the decided answer (once, never to itself)."""
        rule, why = found[0]
        text = self.doc_answers[rule.doc_id]
        added = decision.answer is not None and decision.answer.strip() != text.strip()
        detail = {**decision.detail, "append": {"rule": rule.id, "doc_id": rule.doc_id, "matched": why,
                                                "added": added}}
        return Decision(f"{decision.answer}\n{text}" if added else decision.answer, decision.source, detail)

    def _decide_one(self, answer: str | None, scores, r, found: list[tuple[Rule, str]]) -> Decision:
        """One question's decision from its model answer (and its similarity to each KB answer), route decision
        and matching override/refuse rules, in the order the class docstring gives."""
        detail: dict = {}
        if found and found[0][0].action == "refuse":
            return Decision(self.refusal, "REFUSAL", {**_rule_detail(found), "by": "rule"})
        # A keyword names a topic, not an answerable question ("can the printer print in colour?" hits the
        # printer rule, but the KB does not say): when the route is confident the KB cannot answer, it wins.
        route_refuses = r is not None and (r.kind == "refuse" or (r.kind == "retrieve" and r.label == REFUSAL))
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
            detail = {"route": r.kind, "neighbour": n.text, "neighbour_kind": n.kind, "score": _r(r.score),
                      "vote": r.label, "confidence": _r(r.confidence)}
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


def audit_records(questions: Sequence[str], model_answers: Sequence[str | None], decisions: Sequence[Decision],
                  **context) -> list[dict]:
    """One JSON-able record per answer: what was asked, what the model said, what was answered, why."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return [{"time": now, **context, "question": q, "model_answer": m, "answer": d.answer, "source": d.source,
             "detail": d.detail} for q, m, d in zip(questions, model_answers, decisions)]


def append_audit(path: str | Path, records: Sequence[dict]) -> None:
    """Append to a JSONL audit log (one line per answer; appending keeps earlier sessions' records)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
