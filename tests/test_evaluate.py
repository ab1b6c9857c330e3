"""Report math and shape on hand-made rows, the orchestration without a model, and batched greedy generation."""

from __future__ import annotations

import json

import pytest

from mlx_lora.answer.build import doc_answers, refusal_text
from mlx_lora.answer.decide import Decision
from mlx_lora.core.config import Config, DataConfig, parse_threshold
from mlx_lora.core.errors import UserError
from mlx_lora.data.formats import Example, read_examples
from mlx_lora.data.similarity import REFUSAL, CharScorer, answer_index
from mlx_lora.evaluation.run import evaluate_run, generate_answers
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


def row(sim, expected="vpn", predicted="vpn", source="MODEL_GENERATED", char=None, question="q"):
    answerable = expected != REFUSAL
    return {
        "question": question,
        "expected": "e",
        "generated": "g",
        "expected_doc": expected,
        "answerable": answerable,
        "similarity": sim,
        "char": sim if char is None else char,
        "bucket": bucket(sim),
        "predicted_doc": predicted,
        "predicted_score": sim,
        "refused": predicted == REFUSAL,
        "source": source,
        "detail": {},
    }


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


def chat(question, answer, doc_id):
    return Example(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        meta={"doc_id": doc_id, "answerable": doc_id is not None},
    )


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


@pytest.fixture()
def tiny_splits(tmp_path, tiny_kb, tiny_questions):
    from mlx_lora.data.dataset import build_splits, write_splits
    from mlx_lora.data.kb import load_kb
    from mlx_lora.data.questions import load_questions

    kb = load_kb(tiny_kb)
    cfg = DataConfig(valid_fraction=0.2, test_fraction=0.2)
    write_splits(build_splits(kb, load_questions(tiny_questions, kb), cfg), tmp_path / "d", cfg)
    return tmp_path / "d", kb


def test_evaluate_run_with_given_answers_writes_report_and_audit(tmp_path, tiny_kb, tiny_splits):
    data, kb = tiny_splits
    test = read_examples(data / "test.jsonl")
    cfg = Config()
    cfg.eval.embedder = "char"
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - id: vpn\n    doc_id: vpn\n    keywords: [VPN]\n", encoding="utf-8")
    canonical = doc_answers(kb, test, cfg.data.answer_prefix)
    refusal = refusal_text(test, cfg)
    tuned = [e.answer for e in test]  # a perfect "model"
    base = ["我不知道。"] * len(test)
    report = evaluate_run(
        cfg,
        None,
        "unused-adapter",
        data / "test.jsonl",
        data / "valid.jsonl",
        data / "train.jsonl",
        tiny_kb,
        tmp_path / "out",
        rules_path=str(rules),
        answers={"tuned": tuned, "base": base},
        progress=False,
    )
    summary = report["summary"]
    assert list(summary) == ["base", "tuned", "tuned_rules", "retrieval", "top_passage"]
    # The models alone carry all their answers; the decided variant only what no guard overruled.
    assert summary["tuned"]["model_carried"] == 100.0 and summary["retrieval"]["model_carried"] == 0.0
    assert summary["tuned"]["mean_similarity"] == 100.0 and summary["tuned"]["topic_accuracy"] == 100.0
    assert summary["tuned"]["refusal_accuracy"] == 100.0
    assert summary["base"]["topic_accuracy"] == 0.0
    assert report["measure"]["name"] == "char"
    assert report["meta"]["refusal"] == refusal and set(canonical) == set(kb)
    audit = [json.loads(line) for line in (tmp_path / "out" / "audit.jsonl").read_text().splitlines()]
    assert len(audit) == len(test) and all(a["variant"] == "tuned_rules" for a in audit)
    assert {a["source"] for a in audit} <= {"RULE_OVERRIDE", "KB_RETRIEVAL", "KB_MATCH", "REFUSAL", "MODEL_GENERATED"}
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "report.html").is_file()


def test_evaluate_run_needs_an_adapter_for_tuned(tmp_path, tiny_kb, tiny_splits):
    data, _ = tiny_splits
    with pytest.raises(UserError, match="adapter"):
        evaluate_run(
            Config(),
            None,
            None,
            data / "test.jsonl",
            None,
            None,
            tiny_kb,
            tmp_path,
            variants=("tuned",),
            progress=False,
        )


class FakeBackend:
    """Returns each prompt's length as its 'answer' tokens, recording the batches and the generation config."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def generate(self, loaded, prompts, cfg, stop_ids, on_token=None, biased=None):
        self.calls.append(([len(p) for p in prompts], cfg.temperature, list(stop_ids), biased))
        return [self.tokenizer.encode(f"len {len(p)}") for p in prompts]


def test_generate_answers_batches_by_length_greedy_and_keeps_order(qwen_tokenizer_dir):
    from mlx_lora.data.render import ChatTokenizer

    tok = ChatTokenizer.from_dir(qwen_tokenizer_dir)
    examples = [
        chat("短", "a", None),
        chat("這是一個比較長的問題，需要更多的 token 來表示它的內容", "a", None),
        chat("中等長度的問題", "a", None),
    ]
    cfg = Config()
    cfg.generate.batch_size = 2
    cfg.generate.temperature = 0.7  # evaluation must ignore it
    backend = FakeBackend(tok)
    answers = generate_answers(backend, None, tok, examples, cfg, system_prompt="你是助理。")
    lengths = [len(tok.prompt_ids(e.prompt_messages(), "你是助理。")) for e in examples]
    assert answers == [f"len {n}" for n in lengths]
    assert [c[0] for c in backend.calls] == [sorted(lengths)[:2], sorted(lengths)[2:]]
    assert all(c[1] == 0.0 for c in backend.calls) and backend.calls[0][2] == tok.stop_ids()
    assert [c[3] for c in backend.calls] == [[True, True], [True]]  # closed-book prompts: the run's bias applies

    # Grounded: a prompt that shows a doc no training question asks for (added after training) is answered unbiased.
    from types import SimpleNamespace

    for e, shown in zip(examples, (["vpn"], ["vpn", "new-doc"], ["leave", "vpn"])):
        e.meta = {"passages": shown}
    backend.calls.clear()
    generate_answers(backend, None, tok, examples, cfg, "你是助理。", index=SimpleNamespace(asked={"vpn", "leave"}))
    assert [c[3] for c in backend.calls] == [[True, True], [False]]  # by length: 短, 中等…, then the long one


def test_evaluate_run_end_to_end_with_a_tiny_torch_model(tmp_path, tiny_kb, tiny_splits, qwen_tokenizer_dir):
    """Real orchestration: train 2 steps on a tiny random Qwen2, then base vs tuned vs tuned_rules vs retrieval."""
    import shutil

    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mlx_lora.training.run import train_run

    torch.set_num_threads(1)
    data, _ = tiny_splits
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=151669,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            max_position_embeddings=256,
            eos_token_id=151645,
            pad_token_id=151643,
        )
    ).save_pretrained(model_dir)
    for f in qwen_tokenizer_dir.iterdir():
        shutil.copy(f, model_dir / f.name)
    cfg = Config()
    cfg.model.path, cfg.backend.name = str(model_dir), "torch"
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum, cfg.lora.rank = 2, 4, 1, 4
    cfg.generate.max_new_tokens, cfg.eval.embedder = 4, "char"
    train_run(cfg, data, tmp_path / "run", progress=False)
    report = evaluate_run(
        cfg,
        None,
        tmp_path / "run",
        data / "test.jsonl",
        data / "valid.jsonl",
        data / "train.jsonl",
        tiny_kb,
        tmp_path / "eval",
        rules_path=None,
        progress=False,
    )
    test_rows = len(read_examples(data / "test.jsonl"))
    assert list(report["summary"]) == ["base", "tuned", "tuned_rules", "retrieval", "top_passage"]
    assert all(report["summary"][v]["rows"] == test_rows for v in report["summary"])
    assert report["meta"]["timings"]["tuned_generate_s"] > 0 and report["meta"]["adapter"].endswith("run")
    # the tuned model answered with the bias its training calibrated on valid; the base model with none
    calibrated = json.loads((tmp_path / "run" / "calibration.json").read_text(encoding="utf-8"))["refusal_bias"]
    assert report["meta"]["refusal_bias"] == {"base": 0.0, "tuned": calibrated}
    assert (tmp_path / "eval" / "audit.jsonl").read_text().count("\n") == test_rows


def test_eval_and_diagnose_commands_without_a_model(tmp_path, tiny_kb, tiny_splits, capsys):
    import yaml

    from mlx_lora.cli import main
    from mlx_lora.data.dataset import load_extra_questions
    from mlx_lora.data.kb import load_kb

    data, _ = tiny_splits
    out = tmp_path / "eval"
    main(
        [
            "eval",
            "--data",
            str(data / "test.jsonl"),
            "--kb",
            str(tiny_kb),
            "--variants",
            "retrieval",
            "--embedder",
            "char",
            "--rules",
            "none",
            "--threshold",
            "99",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "retrieval" in printed and "report:" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["threshold"]["percent"] == 99.0 and report["meta"]["train"].endswith("train.jsonl")
    main(
        [
            "diagnose",
            "--report",
            str(out / "report.json"),
            "--kb",
            str(tiny_kb),
            "--threshold",
            "99",
            "--out",
            str(tmp_path / "diag"),
        ]
    )
    assert "proposal:" in capsys.readouterr().out
    result = json.loads((tmp_path / "diag" / "diagnose.json").read_text())
    assert result["variant"] == "retrieval" and result["topics"]
    proposal_path = tmp_path / "diag" / "proposal.yaml"
    proposal = yaml.safe_load(proposal_path.read_text())
    train_questions = {e.question for e in read_examples(data / "train.jsonl")}
    assert proposal and all(q not in train_questions for qs in proposal.values() for q in qs)
    assert load_extra_questions(proposal_path, load_kb(tiny_kb)) == proposal
    with pytest.raises(SystemExit):
        main(
            ["eval", "--data", str(data / "test.jsonl"), "--kb", str(tiny_kb), "--variants", "bogus", "--out", str(out)]
        )
    assert "unknown 'bogus'" in capsys.readouterr().err
    # Not a report: one line, no traceback; the audit log and report of the earlier run stay as they were.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "other.json").write_text(json.dumps({"variants": {"tuned": {"rows": [{"question": "x"}]}}}))
    with pytest.raises(SystemExit):
        main(["diagnose", "--report", str(tmp_path / "other.json"), "--out", str(tmp_path / "diag2")])
    assert "not an `mlx-lora eval` report.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "eval",
                "--data",
                str(data / "test.jsonl"),
                "--kb",
                str(tiny_kb),
                "--threshold",
                "bogus",
                "--out",
                str(out),
            ]
        )
    assert "eval.threshold" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_diagnose_ranks_weak_topics_and_drafts_new_questions():
    from mlx_lora.data.kb import Doc
    from mlx_lora.evaluation.diagnose import diagnose, draft_questions

    rows = [
        row(95, "vpn", "vpn", question="VPN?"),
        row(30, "leave", "vpn", question="請假?"),
        row(40, "leave", REFUSAL, question="休假?"),
        row(90, REFUSAL, REFUSAL, question="天氣?"),
    ]
    kb = {
        "vpn": Doc("vpn", "VPN 設定：下載 client，以 SSO 登入。", ""),
        "leave": Doc("leave", "請假須於三天前在 HR 系統申請，並經主管核准。", ""),
    }
    result = diagnose(rows, kb, train_questions=["leave 的規定是什麼？"], threshold=85)
    assert [t["doc_id"] for t in result["topics"]] == ["leave", REFUSAL, "vpn"]  # weakest first
    leave = result["topics"][0]
    assert leave == {
        "doc_id": "leave",
        "rows": 2,
        "mean_similarity": 35.0,
        "topic_accuracy": 0.0,
        "weak": True,
        "answered_as": [REFUSAL, "vpn"],
    }
    assert [w["question"] for w in result["weak_questions"]] == ["請假?", "休假?"]
    assert list(result["proposal"]) == ["leave"]  # only weak, answerable topics
    assert "leave 的規定是什麼？" not in result["proposal"]["leave"]  # already in train
    assert "需要假須於三天前在 HR 系統申請嗎？" not in result["proposal"]["leave"]
    assert "請假須於三天前在 HR 系統申請嗎？" in result["proposal"]["leave"]
    assert draft_questions("vpn", kb["vpn"].text)[:2] == ["vpn 的規定是什麼？", "VPN 設定要怎麼處理？"]
