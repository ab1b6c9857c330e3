"""Rules: validation with file:line, linear-time patterns, precedence and attribution, audit log, CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mlx_lora.answer.audit import append_audit, audit_records
from mlx_lora.answer.decide import Decider
from mlx_lora.answer.rules import compile_pattern, load_rules, match_rules
from mlx_lora.cli import main
from mlx_lora.core.config_file import load_config
from mlx_lora.core.errors import UserError
from mlx_lora.data.dataset import build_splits
from mlx_lora.data.kb import load_kb
from mlx_lora.data.questions import load_questions
from mlx_lora.data.similarity import REFUSAL, CharScorer, answer_index

REPO = Path(__file__).resolve().parent.parent
ANSWERS = {
    "vpn": "依據公司規範:VPN 設定:下載新版 client,以 SSO 登入。",
    "leave": "依據公司規範:請假須於三天前在 HR 系統申請。",
    "badge": "依據公司規範:識別證遺失請立即通報總務並補辦。",
}
REFUSAL_TEXT = "抱歉,知識庫沒有這個資訊。"

RULES = """\
rules:
  - id: vpn
    doc_id: vpn
    keywords: [VPN, 內網]
    unless: [頻寬]
    priority: 10
  - id: leave-regex
    doc_id: leave
    regex: ["請.{0,3}假"]
    priority: 5
  - id: badge
    doc_id: badge
    keywords: [識別證]
    priority: 20
  - id: vpn-late
    doc_id: leave
    keywords: [VPN]
    priority: 10
"""


def write(tmp_path, text, name="rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def kb(tiny_kb):
    return load_kb(tiny_kb)


@pytest.fixture()
def rules(tmp_path, kb):
    return load_rules(write(tmp_path, RULES), kb)


def decider(rules, threshold=0.8, route=None):
    char = CharScorer()
    return Decider(rules, ANSWERS, answer_index(char, ANSWERS, REFUSAL_TEXT), REFUSAL_TEXT, threshold, route)


def test_load_keeps_fields_and_lines(rules):
    assert [r.id for r in rules] == ["vpn", "leave-regex", "badge", "vpn-late"]
    assert rules[0].keywords == ["VPN", "內網"] and rules[0].unless == ["頻寬"] and rules[0].line == 2
    assert rules[1].regex[0][0] == "請.{0,3}假" and rules[1].action == "override"


def test_match_priority_then_file_order_and_unless(rules):
    assert [r.id for r, _ in match_rules(rules, "ＶＰＮ 連不上")] == ["vpn", "vpn-late"]  # tie → file order
    assert match_rules(rules, "vpn 連不上")[0][1] == "keyword: VPN"  # case and width ignored
    assert [r.id for r, _ in match_rules(rules, "識別證掉了,VPN 也不能用")] == ["badge", "vpn", "vpn-late"]
    assert [r.id for r, _ in match_rules(rules, "VPN 有頻寬上限嗎")] == ["vpn-late"]  # unless stops only its rule
    assert match_rules(rules, "我想請 病假")[0][1] == "regex: 請.{0,3}假"
    assert match_rules(rules, "今天天氣如何") == []


@pytest.mark.parametrize(
    "body, line, message",
    [
        ("rules:\n  - id: a\n    doc_id: vpn\n    keyword: [x]\n", 4, "unknown key 'keyword'"),
        ("rules:\n  - id: a\n    doc_id: nope\n    keywords: [x]\n", 3, "not in the knowledge base"),
        ("rules:\n  - id: a\n    doc_id: vpn\n    keywords: [x]\n    action: refuse\n", 3, "remove its doc_id"),
        ("rules:\n  - id: a\n    keywords: [x]\n    action: append\n", 2, "needs a doc_id"),
        ("rules:\n  - id: a\n    doc_id: vpn\n    keywords: [x]\n    action: delete\n", 5, "unknown action"),
        ("rules:\n  - id: a\n    doc_id: vpn\n    regex:\n      - ok\n      - '(?=x)y'\n", 6, "not supported"),
        ("rules:\n  - id: a\n    doc_id: vpn\n    regex: ['(a)\\1']\n", 4, "back-references"),
        ("rules:\n  - id: a\n    doc_id: vpn\n    regex: ['.*']\n", 4, "every question"),
        ("rules:\n  - id: a\n    doc_id: vpn\n    keywords: ['，。']\n", 4, "would match everything"),
        ("rules:\n  - id: a\n    doc_id: vpn\n", 2, "at least one keyword or regex"),
        (
            "rules:\n  - id: a\n    doc_id: vpn\n    keywords: [x]\n  - id: a\n    doc_id: leave\n    keywords: [y]\n",
            5,
            "duplicate rule id",
        ),
        ("rules:\n  - id: a\n    doc_id: vpn\n    keywords: [x]\n    priority: high\n", 5, "whole number"),
        ("rules:\n  - id: a\n    doc_id: vpn\n    keywords: [x\n", 5, "YAML"),
        ("other: 1\n", 1, "rules:"),
    ],
)
def test_invalid_rules_name_file_and_line(tmp_path, kb, body, line, message):
    path = write(tmp_path, body)
    with pytest.raises(UserError) as err:
        load_rules(path, kb)
    assert str(err.value).startswith(f"{path}:{line}:"), str(err.value)
    assert message in str(err.value)


def test_redos_patterns_cannot_hang():
    # Catastrophic for a backtracking engine (2^50 paths); RE2 is linear in the input.
    for source in ("(a+)+$", "(a|aa)+$", "(x+x+)+y"):
        pattern = compile_pattern(source, "rules.yaml", 1)
        for text in ("a" * 50 + "b", "x" * 5000, "a" * 100_000 + "!"):
            start = time.perf_counter()
            pattern.search(text)
            assert time.perf_counter() - start < 1.0, (source, len(text))


def test_oversized_patterns_are_rejected():
    with pytest.raises(UserError, match="rules.yaml:7: regex is"):
        compile_pattern("a" * 400, "rules.yaml", 7)
    with pytest.raises(UserError, match="rules.yaml:8:"):  # a program beyond RE2's memory budget
        compile_pattern("((((a{100}){100}){100}){100})", "rules.yaml", 8)


def test_rule_overrides_off_topic_answer_with_attribution(rules):
    d = decider(rules).decide(["VPN 連不上"], [ANSWERS["leave"]])[0]
    assert d.source == "RULE_OVERRIDE" and d.answer == ANSWERS["vpn"]
    assert d.detail["rule"] == "vpn" and d.detail["doc_id"] == "vpn" and d.detail["matched"] == "keyword: VPN"
    assert d.detail["also_matched"] == ["vpn-late"] and d.detail["model_topic"] == "leave"


def test_rule_leaves_only_a_faithful_answer_to_the_checks(rules):
    close = "依據公司規範:VPN 設定:下載新版 client,以 SSO 登入"  # ≥ 0.8 similar: snapped to the KB text
    d = decider(rules).decide(["VPN 連不上"], [close])[0]
    assert d.source == "KB_MATCH" and d.answer == ANSWERS["vpn"]
    assert d.detail["rule_checked"] == "vpn" and d.detail["model_answer"] == close
    loose = "VPN 請用 client 登入"  # about vpn, but not ≥ 0.8 similar: a paraphrase that may invent details
    d = decider(rules).decide(["VPN 連不上"], [loose])[0]
    assert d.source == "RULE_OVERRIDE" and d.answer == ANSWERS["vpn"]
    assert d.detail["model_topic"] == "vpn" and d.detail["model_score"] < 0.8
    # Without a rule the same loose answer stays the model's own.
    d = decider([]).decide(["VPN 連不上"], [loose])[0]
    assert d.source == "MODEL_GENERATED" and d.answer == loose and d.detail["nearest"] == "vpn"


def test_higher_priority_rule_wins(rules):
    d = decider(rules).decide(["識別證掉了,VPN 也不能用"], [REFUSAL_TEXT])[0]
    assert d.source == "RULE_OVERRIDE" and d.detail["rule"] == "badge" and d.answer == ANSWERS["badge"]
    assert d.detail["also_matched"] == ["vpn", "vpn-late"]


def test_sources_without_rules(rules):
    lay = decider(rules)
    decisions = lay.decide(
        ["天氣?", "天氣?", "天氣?", "天氣?"],
        [ANSWERS["badge"], "抱歉,知識庫沒有這個資訊", "我今天很開心,天氣很好", None],
    )
    assert [d.source for d in decisions] == ["KB_MATCH", "REFUSAL", "MODEL_GENERATED", "NO_ANSWER"]
    assert decisions[0].detail["doc_id"] == "badge" and decisions[1].answer == REFUSAL_TEXT
    assert decisions[1].detail["by"] == "model" and decisions[1].detail["nearest"] == REFUSAL


REFUSE_RULES = """\
  - id: no-pay
    keywords: [獎金]
    action: refuse
    priority: 15
  - id: no-leave-pay
    keywords: [薪水]
    action: refuse
    priority: 1
  - id: badge-note
    doc_id: badge
    keywords: [出差]
    action: append
"""


class _RouteAlwaysRetrieves:
    """A route confident that every question is about `doc`: a refuse rule must still win."""

    def __init__(self, doc):
        from mlx_lora.answer.route import Neighbour, RouteDecision

        self.low, self.refuse_at = 0.0, 1.0
        self._decision = lambda: RouteDecision("retrieve", 0.9, Neighbour("q", doc, "question"), doc, 0.99, 0.0)

    def decide(self, questions):
        return [self._decision() for _ in questions]

    def asked_docs(self):
        return set(ANSWERS)


def test_refuse_rule_wins_by_priority_even_against_a_confident_route(tmp_path, kb):
    rules = load_rules(write(tmp_path, RULES + REFUSE_RULES), kb)
    assert [r.action for r in rules][-3:] == ["refuse", "refuse", "append"] and rules[-2].doc_id is None
    d = decider(rules, route=_RouteAlwaysRetrieves("vpn")).decide(["VPN 獎金怎麼算"], [ANSWERS["vpn"]])[0]
    assert d.source == "REFUSAL" and d.answer == REFUSAL_TEXT
    assert d.detail["rule"] == "no-pay" and d.detail["by"] == "rule" and d.detail["also_matched"] == ["vpn", "vpn-late"]
    assert "doc_id" not in d.detail
    # A refuse rule below an override rule's priority loses to it.
    d = decider(rules).decide(["請假時薪水怎麼算"], [None])[0]
    assert d.source == "RULE_OVERRIDE" and d.detail["rule"] == "leave-regex"
    assert d.detail["also_matched"] == ["no-leave-pay"]


def test_append_rule_adds_its_doc_to_the_decided_answer(tmp_path, kb):
    rules = load_rules(write(tmp_path, RULES + REFUSE_RULES), kb)
    d = decider(rules).decide(["出差時 VPN 連不上"], [ANSWERS["leave"]])[0]
    assert d.source == "RULE_OVERRIDE" and d.detail["rule"] == "vpn"  # the append rule decides nothing
    assert d.answer == ANSWERS["vpn"] + "\n" + ANSWERS["badge"]
    assert d.detail["append"] == {"rule": "badge-note", "doc_id": "badge", "matched": "keyword: 出差", "added": True}
    d = decider(rules).decide(["出差?"], [ANSWERS["badge"]])[0]  # already that text: nothing to add
    assert d.source == "KB_MATCH" and d.answer == ANSWERS["badge"] and d.detail["append"]["added"] is False
    d = decider(rules).decide(["出差?"], ["我今天很開心"])[0]
    assert d.source == "MODEL_GENERATED" and d.answer == "我今天很開心\n" + ANSWERS["badge"]


def test_rule_without_model_answer_overrides(rules):
    d = decider(rules).decide(["請個假"], [None])[0]
    assert d.source == "RULE_OVERRIDE" and d.answer == ANSWERS["leave"] and "model_topic" not in d.detail


def test_audit_log_records_and_appends(tmp_path, rules):
    questions, models = ["VPN 連不上", "天氣?"], [ANSWERS["leave"], "我今天很開心"]
    decisions = decider(rules).decide(questions, models)
    records = audit_records(questions, models, decisions, variant="tuned_rules")
    log = tmp_path / "logs" / "audit.jsonl"
    append_audit(log, records)
    append_audit(log, records[:1])
    lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 3
    first = lines[0]
    assert {"time", "variant", "question", "model_answer", "answer", "source", "detail"} == set(first)
    assert first["question"] == "VPN 連不上" and first["model_answer"] == ANSWERS["leave"]
    assert first["answer"] == ANSWERS["vpn"] and first["source"] == "RULE_OVERRIDE"
    assert first["detail"]["rule"] == "vpn" and lines[1]["source"] == "MODEL_GENERATED"
    assert lines[2]["question"] == "VPN 連不上"


def test_sample_rules_file_is_valid_and_precise():
    kb = load_kb(REPO / "data" / "kb.jsonl")
    rules = load_rules(REPO / "configs" / "rules.yaml", kb)
    assert {r.doc_id for r in rules if r.action == "override"} == set(kb)
    expect = {
        "VPN 連不上": "vpn-setup",
        "訪客 Wi-Fi 密碼": "guest-wifi",
        "印表機卡紙": "printer",
        "早上起床發燒沒辦法上班，要怎麼請假？": "sick-leave",
        "remote work 的時候 VPN 要全程 on 嗎？": "wfh-policy",
    }
    for question, doc_id in expect.items():
        assert match_rules(rules, question)[0][0].doc_id == doc_id, question
    for question in ("VPN 有沒有流量或頻寬上限？", "今天天氣如何？"):
        assert match_rules(rules, question) == [], question


def test_sample_refuse_rules_touch_no_answerable_training_question():
    # The promise in configs/rules.yaml's header: refuse rules were written from the train/valid unanswerable
    # questions, and none of them matches an answerable train/valid question or a KB text.
    cfg = load_config(REPO / "configs" / "default.yaml")
    kb = load_kb(REPO / cfg.data.kb)
    refuse = [r for r in load_rules(REPO / "configs" / "rules.yaml", kb) if r.action == "refuse"]
    splits = build_splits(kb, load_questions(REPO / cfg.data.questions, kb), cfg.data)
    seen = [item for name in ("train", "valid") for item in splits[name]]
    assert refuse and all(match_rules(refuse, item.question) == [] for item in seen if item.doc_id), [
        item.question for item in seen if item.doc_id and match_rules(refuse, item.question)
    ]
    assert all(match_rules(refuse, doc.text) == [] for doc in kb.values())
    assert sum(bool(match_rules(refuse, item.question)) for item in seen if item.doc_id is None) >= 20


def test_cli_check_and_test(tmp_path, tiny_kb, capsys):
    path = write(tmp_path, RULES)
    main(["rules", "check", str(path), "--kb", str(tiny_kb)])
    assert "4 rules OK" in capsys.readouterr().out
    main(
        [
            "rules",
            "test",
            str(path),
            "VPN 連不上",
            ANSWERS["leave"],
            "--kb",
            str(tiny_kb),
            "--embedder",
            "char",
            "--json",
        ]
    )
    record = json.loads(capsys.readouterr().out)
    assert record["source"] == "RULE_OVERRIDE" and record["detail"]["rule"] == "vpn"
    bad = write(tmp_path, "rules:\n  - id: a\n    doc_id: vpn\n    regex: ['(?<=a)b']\n", "bad.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["rules", "check", str(bad), "--kb", str(tiny_kb)])
    assert exit_info.value.code == 2
    assert f"error: {bad}:4: regex" in capsys.readouterr().err
