"""The model card: what a run folder's README.md says before and after evaluation, and whose README it replaces."""

from __future__ import annotations

import json
from pathlib import Path

from mlx_lora.core.model_store import EMBEDDED_SHA256
from mlx_lora.training.card import MARK, write_model_card


def fake_run(run: Path, spec: str = "embedded", mode: str = "closed_book") -> Path:
    """The files `train` leaves in a run folder, with made-up figures."""
    run.mkdir()
    manifest = {
        "config": {
            "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.05, "targets": ["q_proj", "v_proj"], "num_layers": None},
            "train": {"lr": 0.0005, "schedule": "cosine", "batch_size": 4, "grad_accum": 2, "precision": "fp32"},
            "data": {"mode": mode, "kb": "data/kb.jsonl", "questions": "data/questions.yaml"},
        },
        "backend": "torch",
        "adapter_format": "peft",
        "base_model": {"spec": spec, "path": "/models/x", "sha256": "ab" * 32},
        "data": {"files": ["d/train.jsonl", "d/valid.jsonl"], "sha256": "cd" * 32, "train_rows": 40, "valid_rows": 8},
        "system_prompt": "你是公司內部 FAQ 助理。",
        "versions": {"python": "3.11", "torch": "2.13.0"},
    }
    (run / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
    summary = {
        "stopped": "max_steps",
        "steps": 4,
        "total_steps": 4,
        "best_eval_loss": 1.5,
        "best_step": 4,
        "train_loss_first": 4.0,
        "train_loss_last": 2.0,
        "health": {"verdict": "healthy", "flags": []},
    }
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    steps = [{"type": "step", "step": i, "loss": 4.0 - 0.5 * i} for i in range(1, 5)]
    steps.append({"type": "eval", "step": 4, "eval_loss": 1.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps), encoding="utf-8")
    return run


def test_card_after_training_names_base_licence_data_lora_and_curve(tmp_path):
    run = fake_run(tmp_path / "run")
    card = write_model_card(run).read_text(encoding="utf-8")
    assert card.startswith(MARK + "\n")
    assert EMBEDDED_SHA256 in card and "Apache-2.0" in card and "ab" * 32 in card
    assert "cd" * 32 in card and "40 train, 8 valid" in card
    assert "rank 8, alpha 16.0" in card and "q_proj, v_proj" in card
    assert "train loss 4.0000 → 2.0000" in card and "valid loss by step: 4: 1.500" in card
    assert "Not evaluated yet" in card
    assert "## Intended use" in card and "## Known failure modes" in card


def test_card_after_evaluation_has_the_variants_table(tmp_path):
    run = fake_run(tmp_path / "run")
    variants = {"tuned": {"mean_similarity": 45.4, "refusal_accuracy": 30.8}, "tuned_rules": {"mean_similarity": 94.6}}
    (run / "run_summary.json").write_text(json.dumps({"variants": variants}), encoding="utf-8")
    card = write_model_card(run).read_text(encoding="utf-8")
    assert "| tuned | 45.4 | 30.8 | — | — | — |" in card
    assert "| tuned_rules | 94.6 |" in card
    assert "it refused 30.8% of the unanswerable ones)" in card


def test_a_grounded_cards_failure_modes_are_its_own(tmp_path):
    run = fake_run(tmp_path / "run", mode="grounded")
    variants = {"tuned": {"mean_similarity": 92.1, "refusal_accuracy": None, "answerable_refused": 9.3}}
    (run / "run_summary.json").write_text(json.dumps({"variants": variants}), encoding="utf-8")
    card = write_model_card(run).read_text(encoding="utf-8")
    assert "it refused 9.3% of the answerable ones)" in card and "—%" not in card  # no unanswerable row sampled
    assert "without retraining" in card and "seldom refuse" not in card and "off-topic questions instead" not in card


def test_card_of_another_base_makes_no_licence_claim(tmp_path):
    card = write_model_card(fake_run(tmp_path / "run", spec="Qwen/Qwen2.5-0.5B-Instruct")).read_text(encoding="utf-8")
    assert "Apache" not in card and "the base model's own licence applies" in card


def test_a_users_readme_is_left_alone(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "README.md").write_text("# my notes\n", encoding="utf-8")
    assert write_model_card(run) is None
    assert (run / "README.md").read_text(encoding="utf-8") == "# my notes\n"
    assert write_model_card(tmp_path / "no-run") is None
