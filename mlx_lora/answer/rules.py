"""YAML keyword/regex rules → KB docs: loading with file:line errors, RE2 patterns, and matching a question."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import re2
import yaml

from mlx_lora.core.errors import UserError, located
from mlx_lora.core.textnorm import compact
from mlx_lora.core.userfiles import load_yaml

# override: answer with doc_id's KB text; refuse: answer with the refusal (no doc_id); append: answer as if the rule
# were absent, then add doc_id's KB text as the related policy.
ACTIONS = ("override", "refuse", "append")
RULE_KEYS = ("id", "doc_id", "keywords", "regex", "unless", "action", "priority", "note")
MAX_PATTERN_CHARS = 300
_RE2_MAX_MEM = 8 << 20  # bytes of compiled program per pattern; a pattern that needs more is rejected at load


# Questions are one or two sentences. Matching reads at most this many characters of one, so that a pasted
# document costs what a question costs; the decider notes in the decision's detail when it cut a question.
MAX_QUESTION_CHARS = 2000


@dataclass(frozen=True)
class Question:
    """A question normalised once for all rules: the keyword key (compact) and the text regexes see."""

    key: str
    text: str


def prepare(question: str) -> Question:
    """The question, cut to MAX_QUESTION_CHARS, in both normal forms that rules match against."""
    question = question[:MAX_QUESTION_CHARS]
    return Question(compact(question), regex_text(question))


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

    def __post_init__(self):
        # Normalised once here, not on every question: a rule file is matched against many questions.
        self._keys = [(word, compact(word)) for word in self.keywords]
        self._unless = [compact(word) for word in self.unless]

    def match(self, question: str | Question) -> str | None:
        """What made the rule match ("keyword: VPN" / "regex: …"), or None."""
        q = question if isinstance(question, Question) else prepare(question)
        if any(word in q.key for word in self._unless):
            return None
        for word, key in self._keys:
            if key in q.key:
                return f"keyword: {word}"
        for source, pattern in self.regex:
            if pattern.search(q.text):
                return f"regex: {source}"
        return None


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
        raise located(
            path, line, f"regex {source!r} is not supported ({why}); re2 syntax has no look-around or back-references"
        ) from None
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
        raise located(
            path,
            nodes[bad].start_mark.line + 1 if bad in nodes else line,
            f"unknown key {bad!r} in a rule; valid keys: {', '.join(RULE_KEYS)}",
        )
    at = lambda key: nodes[key].start_mark.line + 1 if key in nodes else line
    rule_id = data.get("id")
    if not isinstance(rule_id, str) or not rule_id.strip():
        raise located(path, line, "every rule needs an id (a short name such as vpn-setup)")
    action = data.get("action", "override")
    if action not in ACTIONS:
        raise located(
            path, at("action"), f"rule {rule_id!r}: unknown action {action!r}; use one of {', '.join(ACTIONS)}"
        )
    doc_id = data.get("doc_id")
    if action == "refuse":
        if doc_id is not None:
            raise located(
                path, at("doc_id"), f"rule {rule_id!r}: a refuse rule answers with the refusal; remove its doc_id"
            )
    elif not isinstance(doc_id, str) or not doc_id.strip():
        raise located(path, at("doc_id"), f"rule {rule_id!r} needs a doc_id from the knowledge base")
    elif kb is not None and doc_id not in kb:
        raise located(
            path,
            at("doc_id"),
            f"rule {rule_id!r}: doc_id {doc_id!r} is not in the knowledge base; rules written for another KB? fix or "
            "remove the rule, or run without keyword rules (--set rules.path=null; --rules none for eval and serve; "
            "no --rules for generate)",
        )
    priority = data.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise located(path, at("priority"), f"rule {rule_id!r}: priority must be a whole number (higher wins)")
    keywords = _strings(nodes.get("keywords"), data.get("keywords"), path, f"rule {rule_id!r} keywords")
    for word, word_line in keywords:
        if not compact(word):
            raise located(path, word_line, f"keyword {word!r} is only punctuation/spaces and would match everything")
    regex = [
        (src, compile_pattern(src, path, ln))
        for src, ln in _strings(nodes.get("regex"), data.get("regex"), path, f"rule {rule_id!r} regex")
    ]
    unless = _strings(nodes.get("unless"), data.get("unless"), path, f"rule {rule_id!r} unless")
    if not keywords and not regex:
        raise located(path, line, f"rule {rule_id!r} needs at least one keyword or regex")
    return Rule(
        rule_id.strip(),
        doc_id,
        [w for w, _ in keywords],
        regex,
        [w for w, _ in unless if compact(w)],
        action,
        priority,
        line,
    )


def load_rules(path: str | Path, kb: dict | None = None) -> list[Rule]:
    """Parse and validate a rules file; every problem is a `file:line: …` error. Rules keep file order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: rules file not found")
    data, root = load_yaml(path, "YAML syntax")
    if not isinstance(data, dict) or "rules" not in data:
        raise located(path, 1, "expected a top-level `rules:` list (`rules: []` for none)")
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


def match_rules(rules: Sequence[Rule], question: str | Question) -> list[tuple[Rule, str]]:
    """Matching rules, highest priority first; equal priorities keep file order. The question is normalised
    once for all rules (10,000 rules on a long question took minutes when each rule normalised it again)."""
    prepared = question if isinstance(question, Question) else prepare(question)
    found = [(rule, why) for rule in rules if (why := rule.match(prepared))]
    return sorted(found, key=lambda pair: -pair[0].priority)
