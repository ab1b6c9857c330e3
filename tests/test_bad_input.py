"""Bad input: arguments and files that are not UTF-8, a full disk while writing, pickle-only model folders —
each one line naming what is wrong, no traceback, no half-written file."""

from __future__ import annotations

import errno
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from reliability_helpers import HAS_TORCH, one_error_line, run_cli, write_mlx_adapter

from mlx_lora.core import model_store
from mlx_lora.core.errors import UserError

# -- 1a: command-line arguments that are not UTF-8 ----------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["rules", "test", "configs/rules.yaml", "\udcff"],  # a question
        ["generate", "--model", "/nonexistent", "VPN\udcff?"],
        ["data", "check", "/tmp/\udcffdata.jsonl"],  # a path
        ["data", "build", "--out", "/tmp/out-\udce9"],
    ],
)
def test_an_argument_that_is_not_utf8_is_one_line(capsys, monkeypatch, args):
    monkeypatch.chdir(REPO)
    code, _, err = run_cli(capsys, *args)
    line = one_error_line(err)
    assert code == 2 and "is not UTF-8" in line and f"argument {len(args)}" in line


def test_a_raw_non_utf8_byte_from_the_shell_is_one_line():
    """As a shell passes $'\\xff': bytes in argv, decoded by Python with surrogateescape."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mlx_lora.cli import main; main()",
            b"rules",
            b"test",
            b"configs/rules.yaml",
            b"\xff",
        ],
        capture_output=True,
        cwd=REPO,
        timeout=120,
    )
    err = out.stderr.decode("utf-8", "replace")
    assert out.returncode == 2 and "Traceback" not in err
    assert (
        err.strip() == r"error: command-line argument 4 (\xff) is not UTF-8 (byte 0xff); type it again as UTF-8 "
        "text, or rename the file to a UTF-8 name"
    )


# -- 1b: escaped lone surrogates in JSONL and YAML ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kb", "data", "questions", "rules"])
def test_an_escaped_lone_surrogate_names_file_and_line(tmp_path, capsys, tiny_kb, tiny_questions, kind):
    if kind == "kb":
        bad = tmp_path / "bad.jsonl"
        bad.write_text(tiny_kb.read_text(encoding="utf-8") + '{"doc_id": "x", "text": "VPN \\ud800 設定"}\n')
        args, line = ["data", "build", "--kb", bad, "--questions", tiny_questions, "--out", tmp_path / "d"], 4
    elif kind == "data":
        bad = tmp_path / "bad.jsonl"
        row = '{"messages": [{"role": "user", "content": "hi\\uDC00"}, {"role": "assistant", "content": "ok"}]}'
        bad.write_text('{"text": "fine"}\n' + row + "\n")
        args, line = ["data", "check", bad], 2
    elif kind == "questions":
        bad = tmp_path / "bad.yaml"
        text = tiny_questions.read_text(encoding="utf-8").replace('"VPN 連不上"', '"VPN \\ud83d 連不上"')
        bad.write_text(text, encoding="utf-8")
        args, line = ["data", "build", "--kb", tiny_kb, "--questions", bad, "--out", tmp_path / "d"], 4
    else:
        bad = tmp_path / "bad.yaml"
        bad.write_text('rules:\n  - id: vpn\n    doc_id: vpn\n    keywords: ["VPN", "\\udfff"]\n', encoding="utf-8")
        args, line = ["rules", "check", bad, "--kb", tiny_kb], 4
    code, _, err = run_cli(capsys, *args)
    message = one_error_line(err)
    assert code == 2 and f"{bad}:{line}:" in message
    assert "half of a UTF-16 pair" in message and "write the character itself" in message
    assert not (tmp_path / "d").exists()


def test_a_valid_surrogate_pair_is_one_character(tmp_path):
    from mlx_lora.core.jsonl import read_jsonl

    path = tmp_path / "ok.jsonl"
    path.write_text('{"text": "smile \\ud83d\\ude00"}\n')
    assert [row for _, row in read_jsonl(path)] == [{"text": "smile 😀"}]


# -- 1c: a full disk while writing safetensors ----------------------------------------------------------------------


def _raising_writer(error: BaseException):
    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # what a writer leaves when the disk fills mid-file
        raise error

    return save_file


def _storage_full():
    from safetensors import SafetensorError

    return SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )


@pytest.mark.parametrize("make_error", [lambda: OSError(errno.ENOSPC), _storage_full], ids=["oserror", "safetensors"])
def test_disk_full_while_writing_safetensors_is_one_line_and_leaves_no_half_file(
    tmp_path, capsys, monkeypatch, make_error
):
    import safetensors.numpy

    write_mlx_adapter(tmp_path / "src")
    monkeypatch.setattr(safetensors.numpy, "save_file", _raising_writer(make_error()))
    code, _, err = run_cli(capsys, "adapter", "convert", tmp_path / "src", "--to", "peft", "--out", tmp_path / "dst")
    line = one_error_line(err)
    assert code == 1 and "disk full" in line and "free some space" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no dst, no staging folder


# -- 1d: pickle-only model folders ----------------------------------------------------------------------------------


@pytest.fixture()
def pickle_model(tmp_path) -> Path:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen2"}')
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return folder


def test_a_pickle_only_model_folder_is_refused_before_loading(pickle_model, tmp_path):
    with pytest.raises(UserError) as info:
        model_store.resolve_model(str(pickle_model), cache_dir=tmp_path / "c")
    message = str(info.value)
    assert "\n" not in message and "pytorch_model.bin" in message and "safetensors only" in message
    assert "save_pretrained" in message  # how to convert


def test_the_cli_refuses_a_pickle_only_model_in_one_line(pickle_model, capsys):
    code, _, err = run_cli(capsys, "generate", "--model", pickle_model, "--backend", "torch", "hi")
    assert code == 2 and "safetensors only" in one_error_line(err)


@pytest.mark.skipif(not HAS_TORCH, reason="torch backend not installed")
def test_the_torch_loader_refuses_a_pickle_only_model(pickle_model, monkeypatch):
    import transformers

    from mlx_lora.backends.torch.model import _from_pretrained

    def never(*args, **kwargs):
        raise AssertionError("from_pretrained must not be reached")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(UserError, match="safetensors only"):
        _from_pretrained(str(pickle_model), None)


@pytest.mark.skipif(not importlib.util.find_spec("mlx_lm"), reason="mlx backend not installed")
def test_the_mlx_loader_refuses_a_pickle_only_model(pickle_model):
    from mlx_lora.backends.mlx.model import load

    with pytest.raises(UserError, match="safetensors only"):
        load(pickle_model)


# -- outside check of 2026-12-07: folders that are almost an adapter or a model, request bodies no client sends ------


def test_an_adapter_folder_without_its_config_is_one_line_and_never_the_hub(tmp_path):
    from mlx_lora.backends.adapters import adapter_dir

    folder = tmp_path / "run" / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 8)
    # PEFT, finding no adapter_config.json here, asked huggingface.co for "run/adapter" (five retries, ~36 s).
    with pytest.raises(UserError, match=r"adapter: no adapter_config.json; not an adapter folder"):
        adapter_dir(tmp_path / "run")
    (folder / "adapter_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UserError, match=r"adapter_config.json: expected a JSON object; re-export the adapter"):
        adapter_dir(folder)
    (folder / "adapter_config.json").write_bytes(b'{"r": "\xff"}')
    with pytest.raises(UserError, match=r"adapter_config.json: unreadable .*; re-export the adapter"):
        adapter_dir(folder)


@pytest.mark.skipif(not HAS_TORCH, reason="torch backend not installed")
def test_a_truncated_or_custom_code_model_is_one_line(tmp_path):
    import torch
    from safetensors.torch import save_file

    from mlx_lora.backends.torch.model import _from_pretrained

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text('{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}')
    save_file({"x": torch.zeros(64)}, truncated / "model.safetensors")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        _from_pretrained(str(truncated), torch.float32)
    custom = tmp_path / "custom"
    custom.mkdir()
    auto_map = {"AutoConfig": "modeling_mine.C", "AutoModelForCausalLM": "modeling_mine.M"}
    (custom / "config.json").write_text(json.dumps({"model_type": "my-own", "auto_map": auto_map}))
    save_file({"x": torch.zeros(1)}, custom / "model.safetensors")
    (custom / "modeling_mine.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UserError, match="never runs"):
        _from_pretrained(str(custom), torch.float32)
    (custom / "config.json").write_text('{"model_type": "my-own"}')
    with pytest.raises(UserError, match="cannot load the model .*my-own"):
        _from_pretrained(str(custom), torch.float32)


@pytest.mark.parametrize(
    "body, needle",
    [
        (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "half of a UTF-16 pair"),
        (b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
    ],
)
def test_a_request_body_no_client_sends_is_a_400_not_a_500(body, needle):
    from mlx_lora.serve.protocol import ApiError, parse_chat

    with pytest.raises(ApiError, match=needle) as info:
        parse_chat(body, "m", 8, 64, None)
    assert info.value.status == 400


def test_files_nested_thousands_deep_are_one_line(tmp_path):
    from mlx_lora.core.userfiles import load_yaml
    from mlx_lora.data.kb import load_kb

    kb = tmp_path / "kb.jsonl"
    kb.write_text("[" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"kb.jsonl:1: JSON nested too deeply"):
        load_kb(kb)
    deep = tmp_path / "rules.yaml"
    deep.write_text("rules: " + "[" * 5_000 + "]" * 5_000 + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"rules.yaml: nested too deeply to read"):
        load_yaml(deep)


@pytest.mark.parametrize(
    "error",
    [RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory"), MemoryError()],
)
def test_running_out_of_memory_is_one_line(capsys, monkeypatch, error):
    import mlx_lora.cli

    def allocate(args):  # what `train --rank 100000000` met inside torch
        raise error

    monkeypatch.setattr(mlx_lora.cli, "_check_arguments", allocate)
    code, _, err = run_cli(capsys, "doctor")
    assert code == 1 and "out of memory; lower train.batch_size" in one_error_line(err)


def test_an_adapter_holding_nan_is_refused_not_answered_with(tmp_path, tiny_model):
    import numpy as np
    from safetensors.numpy import save_file

    from mlx_lora.backends.adapters import lora_pairs, peft_to_mlx, read_adapter

    tensors = write_mlx_adapter(tmp_path / "nan")
    first = sorted(tensors)[0]
    tensors[first] = np.full_like(tensors[first], np.nan)
    save_file(tensors, str(tmp_path / "nan" / "adapters.safetensors"), metadata={"format": "mlx"})
    for read in (read_adapter, lora_pairs, lambda p: peft_to_mlx(p, tmp_path / "out")):
        with pytest.raises(UserError, match=f"adapter's {first} holds NaN or infinite values"):
            read(tmp_path / "nan")
    if HAS_TORCH:  # the torch backend loads through PEFT, not read_adapter: it checks what it loaded
        from mlx_lora.backends.torch.model import load
        from mlx_lora.core.config import Config

        cfg = Config()
        cfg.backend.device = "cpu"
        with pytest.raises(UserError, match="holds NaN or infinite values"):
            load(tiny_model, tmp_path / "nan", cfg)
