"""Report math and shape on hand-made rows: thresholds, variants, buckets, aggregates, confusions, report files."""

from __future__ import annotations

import json

import pytest
from eval_helpers import chat, row

from mlx_lora.answer.decide import Decision
from mlx_lora.core.config import parse_threshold
from mlx_lora.core.errors import UserError
from mlx_lora.data.similarity import REFUSAL, CharScorer, answer_index
from mlx_lora.evaluation.scoring import (
    BUCKETS,
    aggregate,
    bucket,
    build_report,
    confused_pairs,
    score_rows,
    worst,
    write_report,
)
from mlx_lora.evaluation.variants import NEED_ADAPTER, VARIANTS, default_variants, models_for


def test_thresholds_presets_numbers_and_errors():
    assert parse_threshold("faq") == ("faq", 85.0)
    assert parse_threshold("Chatbot") == ("chatbot", 80.0)
    assert parse_threshold("critical") == ("critical", 90.0)
    assert parse_threshold(72.5) == ("72.5", 72.5)
    for bad in ("strict", "101", "-1"):
        with pytest.raises(UserError):
            parse_threshold(bad)


def test_variants_defaults_and_the_models_they_need():
    assert VARIANTS == ("base", "tuned", "tuned_rules", "base_rules", "retrieval", "top_passage")  # report order
    assert default_variants("runs/x") == ("base", "tuned", "tuned_rules", "retrieval", "top_passage")
    assert default_variants(None) == ("base", "base_rules", "retrieval", "top_passage")
    assert NEED_ADAPTER == ("tuned", "tuned_rules")
    assert models_for(("retrieval", "base_rules", "tuned_rules")) == ("tuned", "base")
    assert models_for(("retrieval",)) == ()


def test_bucket_edges():
    assert [bucket(s) for s in (100, 85, 84.9, 70, 69.9, 50, 49.9, 0)] == [
        "≥85",
        "≥85",
        "70–84",
        "70–84",
        "50–69",
        "50–69",
        "<50",
        "<50",
    ]


def test_aggregate_math_on_hand_made_rows():
    rows = [
        row(100),
        row(90, "leave", "leave"),
        row(72, "leave", "vpn"),
        row(55, "badge", REFUSAL),
        row(10, REFUSAL, "vpn"),
        row(95, REFUSAL, REFUSAL, source="REFUSAL"),
    ]
    agg = aggregate(rows, threshold=85)
    assert agg["rows"] == 6
    assert agg["mean_similarity"] == pytest.approx(round((100 + 90 + 72 + 55 + 10 + 95) / 6, 1))
    assert (agg["min_similarity"], agg["max_similarity"]) == (10, 100)
    assert agg["buckets"] == {"≥85": 3, "70–84": 1, "50–69": 1, "<50": 1}
    assert agg["pass_rate"] == 50.0  # 3 of 6 rows ≥ 85
    assert agg["passed"] is False  # mean 70.3 < 85
    assert agg["topic_accuracy"] == 50.0  # answerable: vpn ok, leave ok, leave→vpn, badge→refusal
    assert agg["answerable_refused"] == 25.0
    assert agg["refusal_accuracy"] == 50.0  # unanswerable: one answered vpn, one refused
    assert agg["sources"] == {"MODEL_GENERATED": 5, "REFUSAL": 1}
    assert aggregate(rows, threshold=60)["passed"] is True


def test_aggregate_without_unanswerable_rows_reports_none():
    agg = aggregate([row(80)], 85)
    assert agg["refusal_accuracy"] is None and agg["topic_accuracy"] == 100.0


def test_confused_pairs_and_worst():
    rows = [
        row(10, "a", "b", question="q1"),
        row(20, "a", "b", question="q2"),
        row(30, "c", REFUSAL),
        row(99, "a", "a"),
    ]
    pairs = confused_pairs(rows)
    assert pairs[0] == {"expected": "a", "predicted": "b", "count": 2, "questions": ["q1", "q2"]}
    assert pairs[1]["predicted"] == REFUSAL and len(pairs) == 2
    assert [r["similarity"] for r in worst(rows, 2)] == [10, 20]


def test_report_shape_and_files(tmp_path):
    variants = {
        "retrieval": [row(90), row(40, REFUSAL, "vpn")],
        "tuned": [row(60), row(95, REFUSAL, REFUSAL)],
        "base": [row(20), row(20, REFUSAL, "vpn")],
    }
    measure = {"name": "char", "description": "chrF", "fallback": None, "char": "chrF"}
    report = build_report(variants, "chatbot", measure, worst_n=1)
    assert list(report["summary"]) == ["base", "tuned", "retrieval"]  # canonical order
    for figures in report["summary"].values():
        assert {"mean_similarity", "refusal_accuracy", "topic_accuracy"} <= set(figures)
    assert report["summary"]["tuned"]["mean_similarity"] == 77.5
    assert report["summary"]["tuned"]["refusal_accuracy"] == 100.0
    assert report["threshold"] == {"name": "chatbot", "percent": 80.0}
    assert len(report["variants"]["tuned"]["worst"]) == 1
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["summary"]["base"]["mean_similarity"] == 20.0
    md = (tmp_path / "report.md").read_text()
    assert "| tuned | 2 | 77.5 |" in md and "chrF" in md
    assert "<svg" in (tmp_path / "report.html").read_text()


def test_score_rows_fields_and_sources():
    answers = {"vpn": "VPN:下載 client,以 SSO 登入。", "leave": "請假須於三天前在 HR 系統申請。"}
    refusal = "抱歉,知識庫沒有這個資訊。"
    char = CharScorer()
    index = answer_index(char, answers, refusal)
    examples = [chat("VPN?", answers["vpn"], "vpn"), chat("天氣?", refusal, None)]
    generated = [answers["vpn"], Decision(answers["leave"], "RULE_OVERRIDE", {"rule": "x"})]
    rows = score_rows(examples, generated, char, index)
    assert rows[0]["similarity"] == 100.0 and rows[0]["bucket"] == BUCKETS[0]
    assert rows[0]["source"] == "MODEL_GENERATED" and rows[0]["predicted_doc"] == "vpn"
    assert rows[1]["expected_doc"] == REFUSAL and not rows[1]["answerable"]
    assert rows[1]["source"] == "RULE_OVERRIDE" and rows[1]["detail"] == {"rule": "x"}
    assert rows[1]["predicted_doc"] == "leave" and rows[1]["refused"] is False
    assert rows[1]["similarity"] < 50


def test_an_empty_answer_has_no_topic_and_is_no_refusal():
    answers = {"vpn": "VPN:下載 client,以 SSO 登入。", "leave": "請假須於三天前在 HR 系統申請。"}
    index = answer_index(CharScorer(), answers, "抱歉,知識庫沒有這個資訊。")
    rows = score_rows([chat("VPN?", answers["vpn"], "vpn")], ["  "], CharScorer(), index)
    # Nearest-label of nothing used to be the first doc: an empty answer counted as answering about "vpn".
    assert rows[0]["predicted_doc"] == "(empty answer)" and rows[0]["refused"] is False
    assert aggregate(rows, 85)["topic_accuracy"] == 0.0
