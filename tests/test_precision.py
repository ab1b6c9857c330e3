"""train.precision: auto's choice from the probe, and bf16 training's quality against fp32 on the same rows."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from mlx_lora.backends.torch import precision


@pytest.mark.parametrize("fp32, bf16, chosen", [(60.0, 170.0, "bf16"), (60.0, 8.0, "fp32"), (60.0, 65.0, "fp32")])
def test_auto_follows_the_probe(monkeypatch, tmp_path, fp32, bf16, chosen):
    monkeypatch.setattr(precision, "_gflops", lambda dtype, reps=3: bf16 if dtype == torch.bfloat16 else fp32)
    assert precision.resolve("auto", torch.device("cpu"), tmp_path) == chosen
    assert precision.resolve("fp32", torch.device("cpu"), tmp_path) == "fp32"  # an explicit setting is kept


def test_the_probe_is_measured_once_per_machine(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(precision, "_gflops", lambda dtype, reps=3: calls.append(dtype) or 10.0)
    first = precision.probe(tmp_path)
    assert precision.probe(tmp_path) == first and len(calls) == 2  # the second run reads the cache
    (tmp_path / precision.PROBE_FILE).write_text("{broken")
    precision.probe(tmp_path)
    assert len(calls) == 4  # a broken cache is measured again
    monkeypatch.setattr(precision.torch, "get_num_threads", lambda: 7)
    precision.probe(tmp_path)  # another thread count: measured, kept beside the first
    monkeypatch.undo()
    monkeypatch.setattr(precision, "_gflops", lambda dtype, reps=3: calls.append(dtype) or 10.0)
    precision.probe(tmp_path)
    assert len(calls) == 6  # the first thread count's entry survived
    assert len(json.loads((tmp_path / precision.PROBE_FILE).read_text())["entries"]) == 2


def test_a_cache_from_a_machine_with_other_bf16_units_is_not_read(monkeypatch, tmp_path):
    # Both kinds of machine this project met call themselves "AMD EPYC": the name alone would let an AVX2-only one
    # read the bf16 verdict of an avx512_bf16 one from a copied cache, and train 8x slower.
    monkeypatch.setattr(precision, "cpu_name", lambda: "AMD EPYC")
    monkeypatch.setattr(precision, "cpu_flags", lambda: ["avx2", "avx512_bf16", "avx512f"])
    monkeypatch.setattr(precision, "_gflops", lambda dtype, reps=3: 170.0 if dtype == torch.bfloat16 else 60.0)
    assert precision.resolve("auto", torch.device("cpu"), tmp_path) == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: ["avx", "avx2", "fma"])
    monkeypatch.setattr(precision, "_gflops", lambda dtype, reps=3: 19.0 if dtype == torch.bfloat16 else 150.0)
    assert precision.resolve("auto", torch.device("cpu"), tmp_path) == "fp32"
    keys = json.loads((tmp_path / precision.PROBE_FILE).read_text())["entries"]
    assert sorted(k.split(" | ")[0] for k in keys) == ["AMD EPYC (avx512_bf16)", "AMD EPYC (no bf16 units)"]


def test_bf16_training_matches_fp32_valid_loss(tiny_model, tiny_rows, tmp_path):
    from test_contract import make_cfg, run

    rows, _ = tiny_rows
    losses = {}
    for name in ("fp32", "bf16"):
        cfg = make_cfg(max_steps=6, eval_every=6)
        cfg.train.precision = name
        _, loaded, outcome, events = run("torch", tiny_model, rows, cfg, tmp_path / name)
        assert events[0]["device"].endswith(f"({name})")
        losses[name] = outcome.best_eval_loss
        # LoRA weights and AdamW state stay fp32 whatever the precision; only frozen weights are bf16.
        trainable = {p.dtype for p in loaded.model.parameters() if p.requires_grad}
        frozen = {p.dtype for p in loaded.model.parameters() if not p.requires_grad}
        assert trainable == {torch.float32}
        assert frozen == {torch.float32 if name == "fp32" else torch.bfloat16}
    # The tolerance was fixed before measuring: 2% relative on the valid loss after the same steps and rows.
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02), losses


@pytest.mark.parametrize(
    "setting, bf16_wins, expected",
    [("auto", True, "bf16"), ("auto", False, "fp32"), ("fp32", True, "fp32"), ("bf16", False, "bf16")],
)
def test_generate_precision_casts_the_loaded_model_once(
    monkeypatch, tmp_path, tiny_model, setting, bf16_wins, expected
):
    from mlx_lora import backends
    from mlx_lora.core.config import Config, GenerateConfig

    monkeypatch.setattr(
        precision, "_gflops", lambda dtype, reps=3: 170.0 if (dtype == torch.bfloat16) == bf16_wins else 60.0
    )
    monkeypatch.setenv("MLX_LORA_CACHE", str(tmp_path))  # a probe of its own, not the machine's cached one
    backend = backends.get("torch")
    loaded = backend.load(tiny_model, None, Config())
    prompts = [[5, 6, 7, 8], [9, 10]]
    gen = GenerateConfig(max_new_tokens=4, batch_size=2, precision=setting)
    first = backend.generate(loaded, prompts, gen, stop_ids=[])
    dtypes = {p.dtype for p in loaded.model.parameters()}
    assert dtypes == {torch.bfloat16 if expected == "bf16" else torch.float32}
    assert loaded.extra["generation_precision"] == expected
    assert backend.generate(loaded, prompts, gen, stop_ids=[]) == first  # decided once, greedy stays greedy
    assert [len(o) for o in first] == [4, 4]


def test_an_explicit_model_dtype_is_kept_for_generation(monkeypatch, tmp_path, tiny_model):
    from mlx_lora import backends
    from mlx_lora.core.config import Config, GenerateConfig

    monkeypatch.setattr(precision, "_gflops", lambda dtype, reps=3: 170.0 if dtype == torch.bfloat16 else 60.0)
    monkeypatch.setenv("MLX_LORA_CACHE", str(tmp_path))
    cfg = Config()
    cfg.model.dtype = "float32"  # e.g. a parity check that compares logits with another runtime
    backend = backends.get("torch")
    loaded = backend.load(tiny_model, None, cfg)
    backend.generate(loaded, [[5, 6, 7]], GenerateConfig(max_new_tokens=2, precision="bf16"), stop_ids=[])
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
