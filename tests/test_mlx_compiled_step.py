"""The MLX backend's compiled step: bucketed shapes give the same loss, traces per shape, no non-finite update."""

from __future__ import annotations

import pytest

mx = pytest.importorskip("mlx.core", reason="the mlx backend needs mlx: pip install -e '.[mlx]'")

from test_mlx_backend import make_cfg, run_training


def lora_model(tiny_model):
    from mlx_lora.backends.mlx.lora import attach_lora
    from mlx_lora.backends.mlx.model import load

    loaded = load(tiny_model, None, make_cfg())
    mx.random.seed(0)
    attach_lora(loaded, make_cfg().lora)
    loaded.model.train()
    return loaded


def test_a_non_finite_step_is_not_applied(tiny_model, rows_and_vocab, tmp_path, monkeypatch):
    from mlx_lora.backends.mlx import engine as trainer

    rows = rows_and_vocab[0]
    run_training(tiny_model, rows, make_cfg(max_steps=1), tmp_path / "one")
    calls, make_batch = [], trainer.make_batch

    def poisoned(batch_rows, pad_id, pad=False, **kw):
        out = make_batch(batch_rows, pad_id, pad, **kw)
        calls.append(pad)
        if calls.count(True) == 3:  # step 2's first batch (2 batches a step): an infinite loss weight
            out = (*out[:3], out[3] * float("inf"), out[4])
        return out

    monkeypatch.setattr(trainer, "make_batch", poisoned)
    _, _, outcome, _ = run_training(tiny_model, rows, make_cfg(), tmp_path / "bad")
    assert outcome.stopped == "non_finite" and outcome.steps == 1
    # the compiled step did compute the bad update; the loop must have put step 1's weights back
    one = mx.load(str(tmp_path / "one" / "adapter" / "adapters.safetensors"))
    bad = mx.load(str(tmp_path / "bad" / "adapter" / "adapters.safetensors"))
    assert all(mx.array_equal(one[k], bad[k]).item() for k in one)


def test_update_slots_cover_every_weight_and_moment(tiny_model):
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from mlx_lora.backends.mlx.engine import update_slots

    model = lora_model(tiny_model).model
    optimizer = optim.AdamW(learning_rate=1e-2)
    optimizer.init(model.trainable_parameters())
    slots = update_slots(model, optimizer)
    arrays = [v for _, v in tree_flatten(model.trainable_parameters())] + [v for _, v in tree_flatten(optimizer.state)]
    assert [id(container[key]) for container, key in slots] == [id(v) for v in arrays]


@pytest.mark.parametrize("full_logits", [False, True])
def test_bucketed_batches_give_the_same_loss_and_gradients(tiny_model, rows_and_vocab, monkeypatch, full_logits):
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_lora.backends.mlx import engine as trainer

    assert [trainer.bucket(n, 8) for n in (1, 8, 9, 31, 127, 128, 255, 256, 257, 600, 1100)] == [
        8,
        8,
        16,
        32,
        128,
        128,
        256,
        256,
        272,
        608,
        1152,
    ]
    assert [trainer.bucket(n, 32) for n in (1, 33, 300, 511, 512, 513)] == [32, 64, 320, 512, 512, 544]
    rows, _, _ = rows_and_vocab
    if full_logits:
        monkeypatch.setattr(trainer, "split_head", lambda model: None)
    loaded = lora_model(tiny_model)
    value_and_grad = nn.value_and_grad(loaded.model, trainer.make_loss(loaded.model))
    results = []
    for pad in (False, True):
        inputs, targets, positions, weights, n = trainer.make_batch([rows[0], rows[3], rows[5]], 0, pad=pad)
        (value, _), grads = value_and_grad(loaded.model, inputs, targets, positions, weights, mx.array(float(n)))
        results.append((value.item(), dict(tree_flatten(grads)), inputs.shape, positions.size))
    (plain, g0, shape0, size0), (bucketed, g1, shape1, size1) = results
    assert shape1[1] % 8 == 0 and shape1[1] > shape0[1] and size1 % 32 == 0 and size1 > size0
    assert bucketed == pytest.approx(plain, abs=1e-6)
    assert max(mx.abs(g0[k] - g1[k]).max().item() for k in g0) < 1e-6


def test_step_is_traced_per_shape_not_per_step(tiny_model, rows_and_vocab, tmp_path, monkeypatch):
    from mlx_lora.backends.mlx import engine as trainer

    traces, make_loss = [], trainer.make_loss

    def counting(model):
        loss_sum = make_loss(model)

        def traced(model, *args):
            if model.training:  # eval runs eagerly; in training this Python runs only while mx.compile traces
                traces.append((args[0].shape, args[2].shape))
            return loss_sum(model, *args)

        return traced

    monkeypatch.setattr(trainer, "make_loss", counting)
    _, _, outcome, _ = run_training(tiny_model, rows_and_vocab[0], make_cfg(epochs=6, eval_every=0), tmp_path / "run")
    # 12 steps, 18 batches. A shape is traced at most once per role: first or later batch of a group, last or not.
    assert outcome.steps == 12 and len(traces) <= min(3 * len(set(traces)), 9)
    assert all(inputs[1] % 8 == 0 and positions[0] % 32 == 0 for inputs, positions in traces)
    # the engine counts its own traces (the run's summary shows them): the same number
    assert outcome.extra["compile_traces"] == len(traces)


def test_eager_steps_match_compiled_ones(tiny_model, rows_and_vocab):
    """compile=False (the benchmark's baseline) runs the same step: the same losses and weights, step for step."""
    from mlx.utils import tree_flatten

    from mlx_lora.backends.mlx.engine import MLXEngine
    from mlx_lora.backends.mlx.model import load

    rows = rows_and_vocab[0]
    runs = []
    for compile in (True, False):
        engine = MLXEngine(load(tiny_model, None, make_cfg()), make_cfg(), compile=compile)
        losses = [engine.step([rows[2 * k : 2 * k + 2], rows[5:7]], 1e-2, k).loss for k in range(3)]
        runs.append((losses, dict(tree_flatten(engine.model.trainable_parameters())), list(engine.traces)))
    (compiled, w0, traces0), (eager, w1, traces1) = runs
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert max(mx.abs(w0[k] - w1[k]).max().item() for k in w0) < 1e-5
    assert traces1 == [3, 3] and sum(traces0) < sum(traces1)  # eager: a Python run per call; compiled: per shape
