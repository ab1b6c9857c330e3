"""Where a base model comes from: hub ids from the local Hugging Face cache only, and a base model that changed
since training (warned, or refused with --strict; its hash cached per size and mtime)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import build_tiny_model
from reliability_helpers import HAS_TORCH, one_error_line, run_cli, write_mlx_adapter

from mlx_lora.core import model_store
from mlx_lora.core.errors import UserError

# -- 5: hub ids come from the local Hugging Face cache only ---------------------------------------------------------


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch, qwen_tokenizer_dir) -> tuple[Path, Path]:
    """(cache, snapshot): HF_HUB_CACHE laid out as huggingface_hub writes it, holding a tiny org/tiny model."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / ("ab" * 20)
    build_tiny_model(snapshot, tokenizer_dir=qwen_tokenizer_dir, layers=1, hidden=32, intermediate=64)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("ab" * 20)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a network call would fail loudly rather than hang
    monkeypatch.chdir(tmp_path)
    return cache, snapshot


def test_a_cached_hub_id_resolves_to_its_snapshot(hub_cache, tmp_path):
    cache, snapshot = hub_cache
    assert model_store.resolve_model("org/tiny", cache_dir=tmp_path / "c") == snapshot
    assert model_store.local_model_dir("org/tiny", cache_dir=tmp_path / "c") == snapshot
    (cache / "models--org--tiny" / "refs" / "main").unlink()  # a cache copied without refs/ still works
    assert model_store.resolve_model("org/tiny", cache_dir=tmp_path / "c") == snapshot


def test_a_hub_id_not_in_the_cache_is_one_line(hub_cache, capsys):
    code, _, err = run_cli(capsys, "generate", "--model", "org/missing", "hi")
    line = one_error_line(err)
    assert code == 2 and "org/missing: not in the local Hugging Face cache" in line
    assert "hf download org/missing" in line and str(hub_cache[0]) in line


def test_help_says_hub_ids_come_from_the_local_cache(capsys):
    for command in ("train", "run"):
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0 and "hub id in the local Hugging Face cache" in " ".join(out.split())


@pytest.mark.skipif(not HAS_TORCH, reason="torch backend not installed")
def test_generate_with_a_cached_hub_id(hub_cache, capsys):
    code, _, err = run_cli(
        capsys, "generate", "--backend", "torch", "--model", "org/tiny", "--max-new-tokens", "2", "--no-progress", "hi"
    )
    assert code == 0 and "error" not in err, err


# -- 6: the base model changed since training -----------------------------------------------------------------------


@pytest.fixture()
def trained_run(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(run folder, base model folder): a manifest recording the model's sha256, and an adapter."""
    from mlx_lora.core.config import Config
    from mlx_lora.core.files import sha256_of_files  # as training/run.py's manifest() records it

    monkeypatch.setenv("MLX_LORA_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "base"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2"}')
    (model / "model.safetensors").write_bytes(b"weights v1")
    run = tmp_path / "run"
    write_mlx_adapter(run / "adapter")
    manifest = {
        "config": Config().to_dict(),
        "base_model": {"spec": str(model), "path": str(model), "sha256": sha256_of_files(list(model.iterdir()))},
        "system_prompt": "你是 FAQ 助理。",
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run, model


class _Stop(UserError):
    pass


@pytest.fixture()
def no_backend(monkeypatch):
    """The check happens before any model loads: a backend whose load stops the command."""
    from mlx_lora import backends

    class Fake:
        name = "fake"

        def load(self, model_dir, adapter_dir, cfg):
            raise _Stop("model would load now")

    monkeypatch.setattr(backends, "resolve", lambda name: Fake())


def test_generate_warns_when_the_base_model_changed(trained_run, no_backend, capsys):
    run, model = trained_run
    code, _, err = run_cli(capsys, "generate", "--adapter", run, "q")
    assert code == 2 and err.strip().splitlines() == ["error: model would load now"]  # unchanged: no warning
    (model / "model.safetensors").write_bytes(b"weights v2")
    code, _, err = run_cli(capsys, "generate", "--adapter", run, "q")
    warning, error = err.strip().splitlines()
    assert warning.startswith(f"warning: {run / 'manifest.json'}: base model {model} has changed since training")
    assert warning.endswith("--strict refuses") and error == "error: model would load now"
    code, _, err = run_cli(capsys, "generate", "--adapter", run, "--strict", "q")
    line = one_error_line(err)
    assert code == 2 and "has changed since training" in line and "(refused: --strict)" in line


def test_eval_strict_refuses_a_changed_base_model(trained_run, no_backend, capsys, tmp_path, tiny_kb):
    run, model = trained_run
    data = tmp_path / "eval" / "test.jsonl"
    data.parent.mkdir()
    row = {"messages": [{"role": "user", "content": "VPN?"}, {"role": "assistant", "content": "a"}], "meta": {}}
    data.write_text(json.dumps(row) + "\n")
    (model / "config.json").write_text('{"model_type": "qwen2", "edited": true}')
    args = ["eval", "--adapter", run, "--data", data, "--kb", tiny_kb, "--rules", "none", "--out", tmp_path / "o"]
    args += ["--variants", "tuned", "--embedder", "char", "--no-progress"]
    code, _, err = run_cli(capsys, *args, "--strict")
    assert code == 2 and "has changed since training" in one_error_line(err)
    code, _, err = run_cli(capsys, *args)
    assert "has changed since training" in err.splitlines()[0] and err.strip().endswith("model would load now")


def test_a_bare_adapter_folder_is_not_checked(trained_run, no_backend, capsys, monkeypatch):
    run, model = trained_run

    def never(*args, **kwargs):
        raise AssertionError("no manifest, nothing to compare")

    monkeypatch.setattr("mlx_lora.backends.loading.model_sha256", never)
    code, _, err = run_cli(capsys, "generate", "--adapter", run / "adapter", "--model", model, "--strict", "q")
    assert code == 2 and err.strip() == "error: model would load now"


def test_the_model_hash_is_cached_per_size_and_mtime(tmp_path, monkeypatch):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"abc")
    hashed = []
    real = model_store.sha256_of_files
    monkeypatch.setattr(model_store, "sha256_of_files", lambda files: hashed.append(1) or real(files))
    first = model_store.model_sha256(model, tmp_path / "cache")
    assert first == real([model / "config.json", model / "model.safetensors"])  # what manifests record
    assert model_store.model_sha256(model, tmp_path / "cache") == first and len(hashed) == 1
    assert (tmp_path / "cache" / model_store.HASH_CACHE).is_file()
    (model / "model.safetensors").write_bytes(b"abcd")
    os.utime(model / "model.safetensors", ns=(1, 1))
    assert model_store.model_sha256(model, tmp_path / "cache") != first and len(hashed) == 2
