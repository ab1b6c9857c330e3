"""The MLX backend on a tiny random Qwen2 built with mlx itself: training contract, resume, generation, rope trap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core", reason="the mlx backend needs mlx: pip install -e '.[mlx]'")

from conftest import build_tiny_model

from mlx_lora.core.config import Config, GenerateConfig
from mlx_lora.core.errors import UserError
from mlx_lora.training import loop
from mlx_lora.training.events import Event

LAYERS = 3  # conftest's tiny_model


@pytest.fixture(scope="module")
def tiny(tiny_model) -> Path:
    return tiny_model


def build_model(dst: Path, vocab: int, seed: int = 0, **kw) -> Path:
    return build_tiny_model(dst, vocab, seed=seed, layers=LAYERS, **kw)


def make_cfg(**train) -> Config:
    cfg = Config()
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = 4, 8.0, 0.0
    cfg.train.batch_size, cfg.train.grad_accum, cfg.train.epochs = 2, 2, 3
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.max_grad_norm = 1e-2, 1, 1.0
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def run_training(model_dir, rows, cfg, run_dir, resume=None, on_event=None):
    from mlx_lora.backends.mlx import MLXBackend

    backend = MLXBackend()
    loaded = backend.load(model_dir, None, cfg)
    events = []

    def listen(event):
        assert isinstance(event, Event), event  # the loop emits typed events only
        events.append(event.to_dict())
        if on_event:
            on_event(events[-1])

    outcome = loop.train(backend, loaded, rows[:4] + rows[5:], rows[4:5], cfg, run_dir, listen, resume=resume)
    return backend, loaded, outcome, events


def test_available_names_the_blas_fix_on_linux(monkeypatch):
    import sys

    from mlx_lora.backends.mlx import MLXBackend

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    ok, why = MLXBackend().available()
    assert ok and "mlx" in why
    assert "reference BLAS" in why and "LD_PRELOAD" in why and "libopenblas0-pthread libgfortran5" in why
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
    assert "reference BLAS" not in MLXBackend().available()[1]
    monkeypatch.setattr(sys, "platform", "darwin")  # Metal: nothing to warn about
    monkeypatch.delenv("LD_PRELOAD")
    assert "reference BLAS" not in MLXBackend().available()[1]


def test_training_on_linux_warns_about_blas_once(tiny, rows_and_vocab, tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    rows, _, _ = rows_and_vocab
    _, _, _, events = run_training(tiny, rows, make_cfg(max_steps=1), tmp_path / "run")
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert len(warnings) == 1 and "LD_PRELOAD" in warnings[0]


def test_adapter_folder_is_mlx_lms_own_format(tiny, rows_and_vocab, tmp_path):
    from mlx_lm import load as mlx_lm_load

    rows, _, _ = rows_and_vocab
    run = tmp_path / "run"
    _, loaded, _, _ = run_training(tiny, rows, make_cfg(max_steps=2), run)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == LAYERS
    assert config["lora_parameters"]["scale"] == pytest.approx(8.0 / 4) and config["lora_parameters"]["rank"] == 4
    assert sorted(config["lora_parameters"]["keys"]) == [
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]
    # plain mlx-lm accepts the adapter folder and gives the same logits as our trained model
    theirs, _ = mlx_lm_load(str(tiny), adapter_path=str(run / "adapter"))
    x = mx.array([rows[0].ids])
    assert mx.abs(theirs(x) - loaded.model(x)).max().item() < 1e-5


def test_targets_and_num_layers(tiny, rows_and_vocab, tmp_path):
    from mlx_lora.backends.mlx.lora import attach_lora
    from mlx_lora.backends.mlx.model import load

    cfg = make_cfg()
    cfg.lora.targets, cfg.lora.num_layers = ["q_proj", "v_proj"], 1
    loaded = load(tiny, None, cfg)
    settings = attach_lora(loaded, cfg.lora)
    assert settings["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    trainable = sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(loaded.model.trainable_parameters()))
    assert trainable == 4 * ((64 + 64) + (64 + 32))
    cfg.lora.targets = ["q_proj", "nope_proj"]
    with pytest.raises(UserError, match="nope_proj"):
        attach_lora(load(tiny, None, cfg), cfg.lora)
    cfg.lora.targets, cfg.lora.num_layers = ["q_proj"], LAYERS + 1
    with pytest.raises(UserError, match="num_layers"):
        attach_lora(load(tiny, None, cfg), cfg.lora)


def greedy_reference(model, prompt, steps):
    """Greedy decoding by full forward passes, no cache: what the batched generator must reproduce."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    return ids[len(prompt) :]


def test_generate_batched_greedy_matches_reference_and_stops(tiny, rows_and_vocab):
    from mlx_lora.backends.mlx import MLXBackend

    rows, _, _ = rows_and_vocab
    backend = MLXBackend()
    loaded = backend.load(tiny, None, make_cfg())
    prompts = [rows[0].ids[:9], rows[3].ids[:5], rows[2].ids[:12]]
    gen = GenerateConfig(max_new_tokens=6, temperature=0.0, batch_size=2)  # 3 prompts: batches of 2 + 1
    streamed = {i: [] for i in range(3)}
    out = backend.generate(loaded, prompts, gen, [], lambda i, t: streamed[i].append(t))
    refs = [greedy_reference(loaded.model, p, 6) for p in prompts]
    assert out == refs and [streamed[i] for i in range(3)] == refs
    stop = refs[0][2]
    cut = backend.generate(loaded, prompts[:1], gen, [stop])[0]
    assert cut == refs[0][: refs[0].index(stop)]


def test_rope_theta_trap_is_handled(rows_and_vocab, tmp_path):
    from mlx_lm.utils import load_model

    from mlx_lora.backends.mlx.model import load
    from mlx_lora.core.hf_config import rope_override

    rows, vocab, _ = rows_and_vocab
    top = build_model(tmp_path / "top", vocab, seed=1, rope_theta=10000.0)
    nested = build_model(tmp_path / "nested", vocab, seed=1, rope_theta=10000.0, top_level_rope=False)
    assert rope_override(json.loads((nested / "config.json").read_text())) == {"rope_theta": 10000.0}
    assert rope_override(json.loads((top / "config.json").read_text())) == {}
    x = mx.array([rows[1].ids])
    reference = load(top).model(x)
    assert mx.abs(load(nested).model(x) - reference).max().item() < 1e-6
    naive, _ = load_model(nested)  # mlx-lm alone falls back to rope_theta 1e6: the trap is real
    assert mx.abs(naive(x) - reference).max().item() > 1e-3


def test_adapter_of_either_format_loads(tiny, rows_and_vocab, tmp_path):
    from mlx_lora.backends.adapters import mlx_to_peft

    rows, _, _ = rows_and_vocab
    backend, trained, _, _ = run_training(tiny, rows, make_cfg(max_steps=2), tmp_path / "run")
    mlx_to_peft(tmp_path / "run" / "adapter", tmp_path / "peft")
    x = mx.array([rows[2].ids])
    expected = trained.model(x)
    for source in (tmp_path / "run", tmp_path / "peft"):
        loaded = backend.load(tiny, source, make_cfg())
        assert mx.abs(loaded.model(x) - expected).max().item() < 1e-5
    with pytest.raises(UserError, match="not found|neither"):
        backend.load(tiny, tmp_path / "missing", make_cfg())


def test_fuse_through_mlx_lm(tiny, rows_and_vocab, tmp_path):
    from mlx_lm.utils import load_model

    rows, _, _ = rows_and_vocab
    backend, trained, _, _ = run_training(tiny, rows, make_cfg(max_steps=2), tmp_path / "run")
    x = mx.array([rows[2].ids])
    expected = trained.model(x)
    backend.fuse(backend.load(tiny, tmp_path / "run" / "adapter", make_cfg()), tmp_path / "fused")
    fused, _ = load_model(tmp_path / "fused")
    assert mx.abs(fused(x) - expected).max().item() < 1e-5


def test_dora_trains_and_loads_in_mlx_lm(tiny, rows_and_vocab, tmp_path):
    from mlx_lm import load as mlx_lm_load

    rows, _, _ = rows_and_vocab
    cfg = make_cfg(max_steps=2)
    cfg.lora.dora = True
    _, loaded, _, events = run_training(tiny, rows, cfg, tmp_path / "run")
    # DoRA adds a magnitude per output feature: q,o 64 and k,v 32 on each layer
    lora_only = LAYERS * 4 * (2 * (64 + 64) + 2 * (64 + 32))
    assert events[0]["trainable_params"] == lora_only + LAYERS * (64 + 32 + 32 + 64)
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    theirs, _ = mlx_lm_load(str(tiny), adapter_path=str(tmp_path / "run" / "adapter"))
    x = mx.array([rows[0].ids])
    assert mx.abs(theirs(x) - loaded.model(x)).max().item() < 1e-5
