"""The shared training-event listeners: metrics.jsonl, progress bar, plots, summary and its health verdict."""

from __future__ import annotations

import json
import math

from mlx_lora.training import events
from mlx_lora.training import summary as run_summary
from mlx_lora.training.listeners import standard_listeners
from mlx_lora.training.loop import TrainOutcome


def _steps(losses, lrs=None, norms=None):
    out = []
    for i, loss in enumerate(losses):
        out.append(
            {
                "type": "step",
                "step": i + 1,
                "epoch": 1,
                "loss": loss,
                "lr": lrs[i] if lrs else 1e-3 * (1 - i / len(losses)),
                "grad_norm": norms[i] if norms else 2.0,
                "tokens": 100,
                "supervised_tokens": 40,
                "tokens_per_s": 1000.0 + i,
                "supervised_tokens_per_s": 400.0,
                "elapsed_s": float(i + 1),
                "memory_mb": 500.0 + i,
            }
        )
    return out


def _evals(pairs):
    best = math.inf
    out = []
    for step, loss in pairs:
        out.append({"type": "eval", "step": step, "epoch": 1, "eval_loss": loss, "best": loss < best})
        best = min(best, loss)
    return out


def _run(run_dir, stream, capsys=None, progress=False):
    on_event = standard_listeners(run_dir, progress)
    for event in stream:
        on_event(events.from_dict(event))
    return on_event


def test_listeners_write_metrics_plots_and_summary(tmp_path, capsys):
    steps = _steps([3.0, 2.5, 2.0, 1.6, 1.3, 1.1, 1.0, 0.9])
    stream = (
        [
            {
                "type": "start",
                "total_steps": 8,
                "epochs": 2,
                "train_rows": 32,
                "valid_rows": 8,
                "trainable_params": 10,
                "total_params": 100,
                "backend": "torch",
                "device": "cpu",
            }
        ]
        + steps[:4]
        + _evals([(4, 1.8)])
        + [{"type": "checkpoint", "step": 4, "path": "x"}]
        + steps[4:]
        + _evals([(4, 1.8), (8, 1.2)])[1:]
        + [
            {
                "type": "done",
                "steps": 8,
                "stopped": "completed",
                "best_eval_loss": 1.2,
                "best_step": 8,
                "elapsed_s": 8.0,
            }
        ]
    )
    _run(tmp_path, stream, progress=True)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == stream
    err = capsys.readouterr().err
    assert "eval loss 1.8000 (best)" in err and "8/8" in err
    for name in run_summary.PLOTS:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    summary = run_summary.finish(tmp_path, TrainOutcome(tmp_path, 8, 1.2, 8, "completed"))
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["health"] == {"verdict": "healthy", "flags": []}
    assert summary["train_loss_first"] == 3.0 and summary["train_loss_last"] == 0.9
    assert summary["eval_losses"] == [{"step": 4, "eval_loss": 1.8}, {"step": 8, "eval_loss": 1.2}]
    assert summary["peak_memory_mb"] == 507.0 and summary["tokens_per_s"] == 1003.5
    assert summary["trainable_params"] == 10 and summary["plots"] == [f"plots/{p}" for p in run_summary.PLOTS]
    assert "compile_traces" not in summary  # torch: no compiled step to count
    traced = run_summary.finish(tmp_path, TrainOutcome(tmp_path, 8, 1.2, 8, "completed", {"compile_traces": 3}))
    assert traced["compile_traces"] == 3


def _codes(steps, evals=(), schedule=None):
    return {f["code"] for f in run_summary.health(list(steps), list(evals), schedule)["flags"]}


def test_health_flags_each_problem_and_only_that():
    falling = [3.0, 2.5, 2.0, 1.6, 1.3, 1.1, 1.0, 0.9]
    assert _codes(_steps(falling), _evals([(4, 1.8), (8, 1.2)])) == set()
    assert _codes(_steps(falling), _evals([(2, 1.8), (4, 1.5), (6, 1.6), (8, 1.7)])) == {"overfitting"}
    assert _codes(_steps(falling), _evals([(2, 1.8), (4, 1.5), (6, 1.6), (8, 1.4)])) == set()  # recovered
    assert _codes(_steps(falling), _evals([(2, 1.8), (4, 1.5), (6, 1.6)])) == set()  # one rise is not a trend
    assert _codes(_steps(falling, norms=[2, 3, 25, 4, 2, 2, 2, 2])) == set()  # one clipped spike: no flag
    assert _codes(_steps(falling, norms=[2, 3, 9, 12, 15, 20, 30, 40])) == {"exploding_gradients"}
    assert _codes(_steps(falling, norms=[2, 3, 9, 12, 15, 20, 11, 8])) == set()  # settled: last quarter 11, 8
    assert _codes(_steps(falling, norms=[0.05] * 8)) == {"vanishing_gradients"}
    assert _codes(_steps(falling, lrs=[3e-4] * 8)) == {"flat_lr"}
    assert _codes(_steps(falling, lrs=[3e-4] * 8), schedule={"schedule": "constant", "warmup_steps": 0}) == set()
    assert _codes(_steps(falling, lrs=[0.0] * 8), schedule={"schedule": "constant", "warmup_steps": 0}) == {"flat_lr"}
    assert _codes(_steps([2.0, 2.1, 1.95, 2.05, 2.0, 2.02, 1.99, 2.01])) == {"loss_not_falling"}


def test_resumed_history_keeps_the_latest_record_per_step(tmp_path):
    first = _steps([3.0, 2.5, 2.0, 1.5])
    redo = _steps([9.0, 9.0, 1.9, 1.4])[2:]  # a resume from step 2 re-runs steps 3 and 4
    _run(tmp_path, first + redo)
    steps, _, _ = run_summary.read_metrics(tmp_path)
    assert [s["loss"] for s in steps] == [3.0, 2.5, 1.9, 1.4]


def test_interrupted_and_non_finite_runs_still_get_a_summary(tmp_path):
    _run(tmp_path, _steps([3.0, 2.0]) + [{"type": "warning", "message": "loss nan at step 3"}])
    summary = run_summary.finish(tmp_path, TrainOutcome(tmp_path, 2, None, None, "non_finite"))
    assert summary["stopped"] == "non_finite" and summary["warnings"] == ["loss nan at step 3"]
    assert "non_finite" in {f["code"] for f in summary["health"]["flags"]}
    assert (tmp_path / "plots" / "loss.png").is_file()


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    _run(tmp_path, _steps([3.0, 2.0]))
    assert run_summary.finish(tmp_path, TrainOutcome(tmp_path, 2, None, None, "completed")) == {}
    assert list(tmp_path.iterdir()) == []
