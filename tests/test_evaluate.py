"""The evaluation run without a model and with a tiny one, batched greedy generation, the eval and diagnose commands."""

from __future__ import annotations

import json

import pytest
from eval_helpers import chat, row

from mlx_lora.answer.build import doc_answers, refusal_text
from mlx_lora.core.config import Config, DataConfig
from mlx_lora.core.errors import UserError
from mlx_lora.data.formats import read_examples
from mlx_lora.data.similarity import REFUSAL
from mlx_lora.evaluation.run import evaluate_run, generate_answers


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


def test_evaluate_run_refuses_a_kb_without_any_doc_the_rows_ask_about(tmp_path, tiny_kb, tiny_splits):
    data, _ = tiny_splits
    other = tmp_path / "other-kb.jsonl"
    other.write_text('{"doc_id": "library-card", "text": "借閱證申辦：憑身分證到服務台。"}\n', encoding="utf-8")
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(
        json.dumps(
            {
                "config": {"lora": {}, "data": {"system_prompt": None, "kb": "kb/library.jsonl"}},
                "base_model": {"path": "x"},
            }
        ),
        encoding="utf-8",
    )
    with pytest.raises(UserError) as error:
        evaluate_run(
            Config(), None, run, data / "test.jsonl", None, None, other, tmp_path / "out",
            variants=("retrieval",), progress=False,
        )  # fmt: skip
    message = str(error.value)
    assert "test.jsonl: none of the docs its rows ask about" in message and str(other) in message
    assert "--set data.kb=PATH; the run was trained with kb/library.jsonl" in message and "\n" not in message


def test_a_doc_deleted_from_the_kb_after_training_is_left_out_with_a_note(tmp_path, tiny_kb, tiny_splits):
    data, _ = tiny_splits
    train = read_examples(data / "train.jsonl")
    gone = next(e.meta["doc_id"] for e in train if e.meta.get("answerable"))
    smaller = tmp_path / "smaller-kb.jsonl"
    lines = [line for line in tiny_kb.read_text(encoding="utf-8").splitlines() if f'"{gone}"' not in line]
    smaller.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = Config()
    cfg.eval.embedder = "char"
    # Every train question, the deleted doc's too, is asked: the retrieval baseline and the route answer each one.
    questions = data / "asked.jsonl"
    questions.write_text((data / "train.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    report = evaluate_run(
        cfg, None, None, questions, data / "valid.jsonl", data / "train.jsonl", smaller, tmp_path / "out",
        variants=("retrieval",), rules_path=None, progress=False,
    )  # fmt: skip
    note = report["meta"]["notes"]["kb"]
    assert f"({gone})" in note and str(smaller) in note
    decided = report["variants"]["retrieval"]["rows"]
    assert len(decided) == len(train) and all(r["predicted_doc"] != gone for r in decided)


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
    # A clause that leans on the one before it is no question on its own.
    drafts = draft_questions("books", "借閱時請小心翻閱，以免書頁損壞；若資料遺失，須照價賠償。")
    assert not [d for d in drafts if d.startswith(("以免", "若"))], drafts
    assert "須照價賠償嗎？" in drafts and "借閱時請小心翻閱嗎？" in drafts
