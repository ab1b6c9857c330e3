"""Crash tests of `data build`, `eval` and `adapter convert` (tests/crash_harness.py kills each before every change
it makes to the file system): the old or the new output whole, never a mix, and no debris once the same output is
written again; readers that go through an output's generation link."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from crash_harness import SPLIT_FILES, sweep
from mlx_adapter import write_mlx_adapter


@pytest.mark.parametrize("start", ["generation", "plain"])
def test_data_build_leaves_the_old_or_the_new_splits_whole(harness, tmp_path, tiny_kb, tiny_questions, start):
    seeds = {"old": 1, "new": 2}

    def build(work, which, kill_at=None):
        argv = ["data", "build", "--kb", tiny_kb, "--questions", tiny_questions, "--out", work / "d"]
        return harness.run([*argv, "--seed", seeds[which]], work, kill_at)

    points = sweep(harness, tmp_path, "d", SPLIT_FILES, build, lambda now, old, new: now in (old, new), start)
    assert points >= 4


def test_data_build_refuses_a_folder_with_other_files(harness, tmp_path, tiny_kb, tiny_questions):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    argv = ["data", "build", "--kb", tiny_kb, "--questions", tiny_questions, "--out", tmp_path / "mine"]
    got = harness.run(argv, tmp_path)
    assert got.code == 2 and "notes.txt" in got.output and len(got.output.strip().splitlines()) == 1, got.output
    assert os.listdir(tmp_path / "mine") == ["notes.txt"] and not (tmp_path / "mine").is_symlink()


REPORT_FILES = ("report.json", "report.md", "report.html", "diagnose.json", "diagnose.md", "proposal.yaml")


@pytest.mark.parametrize("start", ["generation", "plain"])
def test_eval_leaves_the_old_or_the_new_report_whole(harness, tmp_path, tiny_kb, tiny_questions, start):
    data = tmp_path / "data"
    argv = ["data", "build", "--kb", tiny_kb, "--questions", tiny_questions, "--out", data]
    assert harness.run(argv, tmp_path).code == 0
    threshold = {"old": "99", "new": "50"}

    def evaluate(work, which, kill_at=None):
        out = work / "eval"
        argv = ["eval", "--data", data / "test.jsonl", "--kb", tiny_kb, "--variants", "retrieval"]
        argv += ["--embedder", "char", "--rules", "none", "--threshold", threshold[which], "--out", out]
        got = harness.run(argv, work, kill_at)
        if which == "old" and got.code == 0:  # diagnose writes into the same folder: eval must keep its files
            argv = ["diagnose", "--report", out / "report.json", "--kb", tiny_kb, "--threshold", "99", "--out", out]
            got = harness.run(argv, work)
        return got

    def whole(now, old, new):
        """One report (json, md and html of the same threshold: json's timings differ from run to run) and the
        untouched diagnose files."""
        if None in now:
            return False
        percent = json.loads(now[0])["threshold"]["percent"]
        shown = {p for p in (99, 50) if f"= {p}%".encode() in now[1] and f"= {p}%".encode() in now[2]}
        allowed = {json.loads(report[0])["threshold"]["percent"] for report in (old, new)}
        return now[3:] == old[3:] and shown == {percent} and percent in allowed

    sweep(harness, tmp_path, "eval", REPORT_FILES, evaluate, whole, start)


@pytest.mark.parametrize("start", ["generation", "plain"])
def test_adapter_convert_leaves_the_old_or_the_new_adapter_whole(harness, tmp_path, start):
    from mlx_lora.backends.adapters import read_adapter
    from mlx_lora.core.errors import UserError

    for seed, name in ((0, "old"), (1, "new")):
        write_mlx_adapter(tmp_path / f"src-{name}", seed=seed)

    def convert(work, which, kill_at=None):
        argv = ["adapter", "convert", tmp_path / f"src-{which}", "--to", "peft", "--out", work / "peft"]
        return harness.run(argv, work, kill_at)

    def whole(now, old, new):
        try:
            return now in (old, new) and bool(read_adapter(tmp_path / "work" / "peft")[1])  # and it loads
        except UserError:
            return False

    sweep(harness, tmp_path, "peft", ("adapter_model.safetensors", "adapter_config.json"), convert, whole, start)


# -- readers go through the link --------------------------------------------------------------------------------


def test_peft_mlx_lm_and_our_loaders_read_an_adapter_through_its_generation_link(tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlx_lora import backends
    from mlx_lora.backends.adapters import convert, read_adapter
    from mlx_lora.core.config import Config

    write_mlx_adapter(tmp_path / "src", seed=0)
    convert(tmp_path / "src", tmp_path / "peft", "peft")
    convert(tmp_path / "peft", tmp_path / "run" / "adapter", "mlx")  # a run folder whose adapter/ is a link
    for folder in (tmp_path / "peft", tmp_path / "run" / "adapter"):
        assert folder.is_symlink() and not os.path.isabs(os.readlink(folder))
    weights = read_adapter(tmp_path / "peft")[1]
    b = weights["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(tmp_path / "peft"))
    loaded = dict(peft.named_parameters())["base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"]
    assert np.array_equal(loaded.detach().numpy(), b)
    cfg = Config()
    cfg.backend.device = "cpu"
    ours = backends.get("torch").load(tiny_model, tmp_path / "run", cfg)  # through run/adapter -> .adapter.gen-1
    with torch.no_grad():
        torch_logits = ours.model(input_ids=torch.tensor([[3, 4, 5]])).logits[0].numpy()
    if not backends.installed("mlx"):
        return
    import mlx.core as mx
    from mlx_lm import load as mlx_lm_load

    mlx_model, _ = mlx_lm_load(str(tiny_model), adapter_path=str(tmp_path / "run" / "adapter"))
    mlx_logits = np.array(mlx_model(mx.array([[3, 4, 5]]))[0].astype(mx.float32))
    assert np.abs(mlx_logits - torch_logits).max() < 1e-4
    ours_mlx = backends.get("mlx").load(tiny_model, tmp_path / "peft", cfg)
    assert np.abs(np.array(ours_mlx.model(mx.array([[3, 4, 5]]))[0]) - torch_logits).max() < 1e-4


# -- eval's folder: the report and its audit log are one generation -------------------------------------------


def test_the_audit_log_changes_with_its_report_and_files_diagnose_wrote_stay(tmp_path):
    from test_evaluate import row

    from mlx_lora.evaluation.scoring import build_report, write_report

    measure = {"name": "char", "description": "chrF", "fallback": None, "char": "chrF"}
    report = build_report({"tuned": [row(90)]}, "chatbot", measure)
    out = tmp_path / "eval"
    write_report(report, out, [{"n": 1}])
    (out / "diagnose.md").write_text("d")  # what `diagnose --out` put into the same folder
    write_report(report, out, [{"n": 2}])
    assert json.loads((out / "audit.jsonl").read_text()) == {"n": 2} and (out / "diagnose.md").read_text() == "d"
    write_report(report, out)  # no audit this time: the earlier one does not stay beside the new report
    assert sorted(os.listdir(out)) == ["diagnose.md", "report.html", "report.json", "report.md"]
    assert sorted(os.listdir(tmp_path)) == [".eval.gen-3", "eval"]
