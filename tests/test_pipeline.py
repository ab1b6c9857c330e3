"""`mlx-lora run` end to end: on a tiny random model (fast), and on the real embedded 0.5B model (slow)."""

from __future__ import annotations

import json
import re
from functools import partial

import conftest
import pytest
from conftest import REPO, build_tiny_model

VARIANTS = {"base", "tuned", "tuned_rules", "retrieval", "top_passage"}


run_cli = partial(conftest.run_cli, timeout=1800)  # whole pipelines: minutes, not the default 2


def check_run(run_dir, out):
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "run_summary.json").read_text(encoding="utf-8"))
    assert set(summary["variants"]) == VARIANTS
    for row in summary["variants"].values():
        for key in ("mean_similarity", "refusal_accuracy", "topic_accuracy"):
            assert 0 <= row[key] <= 100
    report = json.loads((run_dir / "eval" / "report.json").read_text(encoding="utf-8"))
    assert set(report["summary"]) == VARIANTS
    for name in (
        "manifest.json",
        "metrics.jsonl",
        "summary.json",
        "eval/report.md",
        "eval/audit.jsonl",
        "data/train.jsonl",
        "data/test.jsonl",
    ):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "plots").glob("*.png"))
    card = (run_dir / "README.md").read_text(encoding="utf-8")  # the model card, rewritten after the evaluation
    assert "## Training curve" in card and "| tuned_rules |" in card
    assert "== summary" in out.stdout and "tuned_rules" in out.stdout
    return summary, report


def test_main_job_in_closed_book_mode_on_a_tiny_model(tmp_path, qwen_tokenizer_dir):
    model = build_tiny_model(tmp_path / "tiny", tokenizer_dir=qwen_tokenizer_dir)
    run_dir = tmp_path / "run"
    out = run_cli(
        "run", "--model", str(model), "--out", str(run_dir), "--max-steps", "2", "--no-progress",
        "--set", "data.mode=closed_book", "--set", "train.max_length=192", "--set", "lora.num_layers=null",
        "--set", "eval.max_rows=8", "--set", "generate.max_new_tokens=8",
    )  # fmt: skip
    summary, report = check_run(run_dir, out)
    assert summary["train"]["steps"] == 2 and report["meta"]["prompt"] == "closed_book"
    test = [json.loads(line) for line in (run_dir / "data" / "test.jsonl").read_text().splitlines()]
    assert not any("參考資料" in row["messages"][-2]["content"] for row in test)
    # A second run into the same directory must not overwrite the first one's adapter.
    again = run_cli("run", "--model", str(model), "--out", str(run_dir), "--max-steps", "1")
    assert again.returncode == 2 and "already holds a run" in again.stderr


def test_main_job_on_a_tiny_model(tmp_path, qwen_tokenizer_dir):
    """The main job's own config (grounded) on a 2-layer model: its top-12-layer setting is the one thing to lift."""
    model = build_tiny_model(tmp_path / "tiny", tokenizer_dir=qwen_tokenizer_dir)
    run_dir = tmp_path / "run"
    too_deep = run_cli(
        "run", "--model", str(model), "--out", str(tmp_path / "deep"), "--max-steps", "1", "--no-progress"
    )
    assert too_deep.returncode == 2 and "Traceback" not in too_deep.stderr
    assert "lora.num_layers must be between 1 and 2" in too_deep.stderr.strip().splitlines()[-1]
    out = run_cli(
        "run", "--model", str(model), "--out", str(run_dir), "--max-steps", "2", "--no-progress",
        "--set", "lora.num_layers=null", "--set", "eval.max_rows=8", "--set", "generate.max_new_tokens=8",
    )  # fmt: skip
    summary, report = check_run(run_dir, out)
    assert summary["train"]["steps"] == 2
    assert report["meta"]["prompt"] == "grounded" and report["meta"]["model_first"] is True
    # The prompt budget the run was fitted with is kept with it, for eval/generate/serve to fit theirs the same way.
    manifest = json.loads((run_dir / "manifest.json").read_text())
    budget = manifest["config"]["train"]["max_length"] - manifest["data"]["longest_answer_tokens"]
    assert manifest["config"]["data"]["prompt_tokens"] == budget > 0
    # Lengths and the first token's weight are set from the rows (null in the config) and kept as numbers: on the
    # sample's rows, the values measured on its valid split.
    assert manifest["config"]["train"]["max_length"] == 320 and manifest["config"]["train"]["first_token_weight"] == 5.0
    test = [json.loads(line) for line in (run_dir / "data" / "test.jsonl").read_text().splitlines()]
    assert all("參考資料" in row["messages"][-2]["content"] and row["meta"]["question"] for row in test)
    # The model alone carries all its answers; the baselines none.
    assert summary["variants"]["tuned"]["model_carried"] == 100.0
    assert summary["variants"]["retrieval"]["model_carried"] == 0.0
    assert summary["variants"]["top_passage"]["model_carried"] == 0.0
    # generate builds the same grounded prompt from the run's train questions and today's KB.
    from mlx_lora.answer.service import grounded_prompt, grounding
    from mlx_lora.core.config import Config

    cfg = Config()
    cfg.data.mode, cfg.data.kb = "grounded", str(REPO / "data" / "kb.jsonl")
    turn, shown = grounded_prompt(grounding(cfg, run_dir), "VPN 連不上怎麼辦?", cfg.data)
    assert turn.startswith("參考資料:\n[1] ") and turn.endswith("問題:VPN 連不上怎麼辦?")
    assert shown[0] == "vpn-setup" and "[vpn-setup]" not in turn  # passages are numbered, their doc ids kept aside
    answered = run_cli("generate", "--adapter", str(run_dir), "--max-new-tokens", "4", "--no-progress", "VPN?")
    assert answered.returncode == 0, answered.stderr[-2000:]


def test_main_job_checks_rules_and_embedder_before_any_stage(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - id: a\n    doc_id: vpn-setup\n    regex: ['(?=x)']\n", encoding="utf-8")
    for setting, needle in (
        (f"rules.path={rules}", f"{rules}:4: regex"),
        ("eval.embedder=./no_such_model", "no such folder"),
    ):
        out = run_cli("run", "--out", str(tmp_path / "run"), "--set", setting, timeout=300)
        assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert not (tmp_path / "run").exists()  # nothing built, nothing trained


@pytest.mark.slow
def test_main_job_on_the_embedded_model(tmp_path):
    """Prepare the real 0.5B model, train a step, generate Chinese answers, evaluate every variant."""
    run_dir = tmp_path / "run"
    out = run_cli(
        "run",
        "--out",
        str(run_dir),
        "--max-steps",
        "1",
        "--no-progress",
        "--set",
        "eval.max_rows=4",
        "--set",
        "generate.max_new_tokens=24",
        "--set",
        "train.batch_size=2",
        "--set",
        "train.grad_accum=1",
    )
    _, report = check_run(run_dir, out)
    answers = " ".join(row["generated"] for row in report["variants"]["tuned"]["rows"])
    assert re.search(r"[\u4e00-\u9fff]", answers), f"the model should answer in Chinese: {answers!r}"
