"""The training contract both backends keep, run against every installed backend: one loop, the same policy."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from mlx_lora import backends
from mlx_lora.backends.protocol import ValidResult
from mlx_lora.core.config import Config
from mlx_lora.core.errors import UserError
from mlx_lora.training import checkpoints, loop
from mlx_lora.training.events import Event

LAYERS = 3  # tiny_model's
BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(not backends.installed(name), reason=f"{name} not installed"))
    for name in backends.names()
]
WEIGHTS = {"torch": "adapter_model.safetensors", "mlx": "adapters.safetensors"}


def make_cfg(**train) -> Config:
    cfg = Config()
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = 4, 8.0, 0.0
    cfg.lora.targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    cfg.train.batch_size, cfg.train.grad_accum, cfg.train.epochs = 2, 2, 3
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.max_grad_norm = 1e-2, 1, 1.0
    cfg.train.precision = "fp32"  # exact comparisons below; bf16 has its own test
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def run(name, model_dir, rows, cfg, run_dir, resume=None, on_event=None, fingerprint=None, engine_patch=None):
    """Train on rows[:4] + rows[5:] with rows[4:5] as the valid set; events come back as dicts."""
    backend = backends.get(name)
    if engine_patch:  # wrap the engine the loop gets (e.g. scripted eval losses)
        build = backend.engine
        backend.engine = lambda loaded, cfg: engine_patch(build(loaded, cfg))
    loaded = backend.load(model_dir, None, cfg)
    events = []

    def listen(event):
        assert isinstance(event, Event), event  # typed events only
        events.append(event.to_dict())
        if on_event:
            on_event(events[-1])

    outcome = loop.train(
        backend, loaded, rows[:4] + rows[5:], rows[4:5], cfg, run_dir, listen, resume=resume, fingerprint=fingerprint
    )
    return backend, loaded, outcome, events


def logits(name: str, loaded, ids: list[int]) -> np.ndarray:
    if name == "torch":
        import torch

        with torch.no_grad():
            return loaded.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    import mlx.core as mx

    return np.array(loaded.model(mx.array([ids]))[0].astype(mx.float32))


def adapter(name: str, folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / WEIGHTS[name]))


def of(events, kind):
    return [e for e in events if e["type"] == kind]


@pytest.mark.parametrize("name", BACKENDS)
def test_loss_falls_events_and_exact_parameter_count(name, tiny_model, tiny_rows, tmp_path):
    rows, _ = tiny_rows
    _, loaded, outcome, events = run(name, tiny_model, rows, make_cfg(), tmp_path / "run")
    steps, evals = of(events, "step"), of(events, "eval")
    assert events[0]["type"] == "start" and events[-1]["type"] == "done" and events[-1]["stopped"] == "completed"
    # 5 rows, batch 2 → 3 batches → 2 groups (grad_accum 2) per epoch, 3 epochs
    assert outcome.steps == len(steps) == 6 and [e["epoch"] for e in steps] == [1, 1, 2, 2, 3, 3]
    assert [e["epoch"] for e in evals] == [1, 2, 3]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and steps[-1]["loss"] < steps[0]["loss"]
    assert steps[0]["lr"] == pytest.approx(1e-2) and steps[-1]["lr"] < steps[1]["lr"]  # warmup 1, then cosine
    assert all(s["supervised_tokens"] < s["tokens"] for s in steps)  # the prompt carries no loss
    # q/k/v/o on 3 layers: r·(in+out) each; q,o: 64→64, k,v: 64→32 (2 kv heads × 16)
    assert events[0]["trainable_params"] == LAYERS * 4 * (2 * (64 + 64) + 2 * (64 + 32))
    assert events[0]["backend"] == name
    best = min(evals, key=lambda e: e["eval_loss"])
    assert outcome.best_step == best["step"] and outcome.best_eval_loss == pytest.approx(best["eval_loss"])
    # The run folder's adapter, loaded afresh, is the model the run ended with.
    reloaded = backends.get(name).load(tiny_model, tmp_path / "run" / "adapter", make_cfg())
    assert np.abs(logits(name, reloaded, rows[0].ids) - logits(name, loaded, rows[0].ids)).max() < 1e-5


@pytest.mark.parametrize("name", BACKENDS)
def test_ctrl_c_checkpoints_and_resume_equals_the_uninterrupted_run(name, tiny_model, tiny_rows, tmp_path):
    rows, _ = tiny_rows
    cfg = make_cfg(eval_every=0)
    cfg.lora.dropout = 0.1  # dropout draws random numbers: they must replay identically after a resume
    _, _, whole, whole_events = run(name, tiny_model, rows, cfg, tmp_path / "whole")

    def ctrl_c_at_3(event):
        if event["type"] == "step" and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does; the loop finishes this step, then stops

    _, _, first, first_events = run(name, tiny_model, rows, cfg, tmp_path / "cut", on_event=ctrl_c_at_3)
    assert first.stopped == "interrupted" and first.steps == 3
    assert checkpoints.list_checkpoints(tmp_path / "cut" / "checkpoints")[-1] == 3
    _, _, resumed, resumed_events = run(name, tiny_model, rows, cfg, tmp_path / "cut", resume=tmp_path / "cut")
    assert resumed.stopped == "completed" and [e["step"] for e in of(resumed_events, "step")] == [4, 5, 6]
    losses = [e["loss"] for e in of(first_events, "step") + of(resumed_events, "step")]
    assert losses == pytest.approx([e["loss"] for e in of(whole_events, "step")], rel=1e-6)
    assert resumed.best_eval_loss == pytest.approx(whole.best_eval_loss, rel=1e-6)
    a, b = adapter(name, tmp_path / "whole" / "adapter"), adapter(name, tmp_path / "cut" / "adapter")
    assert a.keys() == b.keys() and max(np.abs(a[k] - b[k]).max() for k in a) < 1e-6


@pytest.mark.parametrize("name", BACKENDS)
def test_early_stopping_keeps_the_best_adapter_and_its_checkpoint(name, tiny_model, tiny_rows, tmp_path):
    rows, _ = tiny_rows
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7])  # the stopping policy under test, not the model's loss

    def scripted_evals(engine):
        engine.validate = lambda rows, token=None: ValidResult(next(scripted))
        return engine

    cfg = make_cfg(eval_every=1, early_stopping_patience=3)
    best_adapters = {}

    def remember(event):  # the adapter published when step 2 was best
        if event["type"] == "checkpoint" and event["step"] == 2:
            best_adapters[2] = adapter(name, tmp_path / "run" / "adapter")

    _, loaded, outcome, events = run(
        name, tiny_model, rows, cfg, tmp_path / "run", on_event=remember, engine_patch=scripted_evals
    )
    assert outcome.stopped == "early_stopped" and outcome.steps == 5 and outcome.best_step == 2
    assert [e["best"] for e in of(events, "eval")] == [True, True, False, False, False]
    final = adapter(name, tmp_path / "run" / "adapter")
    assert all(np.array_equal(final[k], best_adapters[2][k]) for k in final)
    # Retention keeps the latest (to resume) and the best (three evals old here), nothing else.
    assert checkpoints.list_checkpoints(tmp_path / "run" / "checkpoints") == [2, 5]
    kept = adapter(name, tmp_path / "run" / "checkpoints" / "step-2" / "adapter")
    assert all(np.array_equal(final[k], kept[k]) for k in final)
    # The model in memory ends on the best adapter too: whoever generates next uses what the run folder holds.
    reloaded = backends.get(name).load(tiny_model, tmp_path / "run" / "adapter", make_cfg())
    assert np.abs(logits(name, reloaded, rows[0].ids) - logits(name, loaded, rows[0].ids)).max() < 1e-5


@pytest.mark.parametrize("name", BACKENDS)
def test_non_finite_loss_stops_without_applying_the_step(name, tiny_model, tiny_rows, tmp_path):
    rows, _ = tiny_rows
    cfg = make_cfg(lr=1e30, max_grad_norm=0.0, warmup_steps=0, eval_every=1)
    cfg.train.weight_decay = 0.0
    _, _, outcome, events = run(name, tiny_model, rows, cfg, tmp_path / "run")
    assert outcome.stopped == "non_finite" and outcome.steps < 6
    warning = [e["message"] for e in of(events, "warning") if "not finite" in e["message"]]
    assert warning and f"at step {outcome.steps + 1}" in warning[0] and "train.lr" in warning[0]
    assert all(math.isfinite(e["loss"]) for e in of(events, "step"))
    # No checkpoint after the last applied step, and the final adapter is that step's weights: the bad step
    # was undone, not half-applied.
    kept = checkpoints.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert kept and kept[-1] == outcome.steps
    final = adapter(name, tmp_path / "run" / "adapter")
    last = adapter(name, tmp_path / "run" / "checkpoints" / f"step-{kept[-1]}" / "adapter")
    assert all(np.array_equal(final[k], last[k]) and np.isfinite(final[k]).all() for k in final)


@pytest.mark.parametrize("name", BACKENDS)
def test_resume_refuses_other_data_model_lora_or_batching(name, tiny_model, tiny_rows, tmp_path):
    rows, _ = tiny_rows
    fingerprint = {"data_sha256": "d1", "base_model_sha256": "m1", "lora": {"rank": 4}}
    run(name, tiny_model, rows, make_cfg(max_steps=2), tmp_path / "run", fingerprint=fingerprint)
    for key, value in (("data_sha256", "d2"), ("base_model_sha256", "m2"), ("lora", {"rank": 8})):
        with pytest.raises(UserError, match=key):
            run(
                name,
                tiny_model,
                rows,
                make_cfg(max_steps=4),
                tmp_path / "run",
                resume=tmp_path / "run",
                fingerprint={**fingerprint, key: value},
            )
    with pytest.raises(UserError, match="batch_size"):
        run(
            name,
            tiny_model,
            rows,
            make_cfg(max_steps=4, batch_size=1),
            tmp_path / "run",
            resume=tmp_path / "run",
            fingerprint=fingerprint,
        )
    _, _, outcome, _ = run(
        name,
        tiny_model,
        rows,
        make_cfg(max_steps=4),
        tmp_path / "run",
        resume=tmp_path / "run",
        fingerprint=fingerprint,
    )
    assert outcome.steps == 4  # the same settings resume (max_steps may grow)


def test_first_tokens_joins_the_resume_fingerprint_only_when_set():
    from mlx_lora.training.run import resume_fingerprint

    def fingerprint(**train):
        config = {"lora": {"rank": 4}, "train": {"max_length": 64, "first_token_weight": 5.0, **train}}
        return resume_fingerprint({"config": config, "data": {"sha256": "d"}, "base_model": {"sha256": "m"}})

    old = fingerprint()  # a checkpoint from before the key existed, or with its default
    assert "first_tokens" not in old and fingerprint(first_tokens=1) == old
    assert checkpoints.fingerprint_mismatch(fingerprint(first_tokens=1), old) == []
    # either way round, 2 against 1 is a different objective: no silent resume
    assert checkpoints.fingerprint_mismatch(fingerprint(first_tokens=2), old) == [
        "first_tokens now 2 vs unset in the checkpoint"
    ]
    assert checkpoints.fingerprint_mismatch(old, fingerprint(first_tokens=2)) == [
        "first_tokens now unset vs 2 in the checkpoint"
    ]


@pytest.mark.parametrize("name", BACKENDS)
def test_a_run_killed_between_checkpoint_and_adapter_resumes(name, tiny_model, tiny_rows, tmp_path, monkeypatch):
    rows, _ = tiny_rows
    real_publish = loop.publish_dir

    def die(src, dst):  # the process ends right after the first checkpoint, before its adapter is published
        raise SystemExit(137)

    monkeypatch.setattr(loop, "publish_dir", die)
    with pytest.raises(SystemExit):
        run(name, tiny_model, rows, make_cfg(max_steps=4, eval_every=1), tmp_path / "run")
    assert checkpoints.list_checkpoints(tmp_path / "run" / "checkpoints") == [1]
    assert not (tmp_path / "run" / "adapter").exists()
    monkeypatch.setattr(loop, "publish_dir", real_publish)
    _, _, outcome, _ = run(
        name, tiny_model, rows, make_cfg(max_steps=4, eval_every=1), tmp_path / "run", resume=tmp_path / "run"
    )
    assert outcome.steps == 4 and (tmp_path / "run" / "adapter" / WEIGHTS[name]).is_file()


@pytest.mark.parametrize("name", BACKENDS)
def test_fuse_gives_the_adapter_models_logits(name, tiny_model, tiny_rows, tmp_path):
    rows, _ = tiny_rows
    backend, loaded, _, _ = run(name, tiny_model, rows, make_cfg(max_steps=2), tmp_path / "run")
    out = backend.fuse(backend.load(tiny_model, tmp_path / "run" / "adapter", make_cfg()), tmp_path / "fused")
    fused = backend.load(out, None, make_cfg())
    assert np.abs(logits(name, fused, rows[2].ids) - logits(name, loaded, rows[2].ids)).max() < 1e-4


@pytest.mark.parametrize("trained_on", BACKENDS)
@pytest.mark.parametrize("loaded_on", BACKENDS)
def test_an_adapter_from_either_backend_loads_on_either(trained_on, loaded_on, tiny_model, tiny_rows, tmp_path):
    rows, _ = tiny_rows
    _, loaded, _, _ = run(trained_on, tiny_model, rows, make_cfg(max_steps=2), tmp_path / "run")
    other = backends.get(loaded_on).load(tiny_model, tmp_path / "run", make_cfg())
    diff = np.abs(logits(loaded_on, other, rows[2].ids) - logits(trained_on, loaded, rows[2].ids)).max()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("name", BACKENDS)
def test_a_checkpoint_of_an_earlier_version_is_refused_in_one_line(name, tiny_model, tiny_rows, tmp_path):
    rows, _ = tiny_rows
    old = tmp_path / "old" / "checkpoints" / "step-2"
    old.mkdir(parents=True)
    # What the per-backend loops wrote before the shared one: no format key.
    (old / checkpoints.STATE_FILE).write_text('{"position": {"step": 2}, "optimizer_steps": {}, "fingerprint": {}}')
    with pytest.raises(UserError, match="earlier mlx-lora.*start a new run") as info:
        run(name, tiny_model, rows, make_cfg(max_steps=4), tmp_path / "old", resume=tmp_path / "old")
    assert "\n" not in str(info.value)
