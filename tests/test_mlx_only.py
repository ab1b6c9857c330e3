"""An MLX-only install: with `import torch` blocked, a GGUF model is prepared into a safetensors folder and an MLX
LoRA run trains on it; asking for torch anyway is one line naming the extra to install."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm")
pytest.importorskip("gguf")

from conftest import TINY_QA, build_tiny_model
from test_gguf_export import BYTE_VOCAB, byte_level_tokenizer

from mlx_lora.backends.gguf_export import write_model_gguf

REPO = Path(__file__).resolve().parent.parent
# As an install without the torch extra: `import torch` fails and find_spec("torch") finds nothing. transformers
# stays: mlx-lm itself depends on it (for tokenizers), and it imports without torch.
NO_TORCH = 'import sys; sys.modules["torch"] = None; from mlx_lora.cli import main; main()'


def no_torch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, cwd=cwd, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlx-only")
    model = build_tiny_model(root / "hf", BYTE_VOCAB, byte_level_tokenizer(root / "tok"), bias=0.1)
    write_model_gguf(model, root / "tiny.gguf", "f32")
    return root / "tiny.gguf"


def write_rows(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in TINY_QA]
    for split, chosen in (("train", rows), ("valid", rows[:2])):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen)
        (folder / f"{split}.jsonl").write_text(text, encoding="utf-8")
    return folder


def test_prepare_and_train_on_mlx_without_torch(tmp_path, tiny_gguf):
    cache = tmp_path / "cache"
    prepared = no_torch("model", "convert", str(tiny_gguf), "--cache-dir", str(cache), "--no-progress", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    folder = Path(prepared.stdout.strip())
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()

    data = write_rows(tmp_path / "data")
    run = tmp_path / "run"
    trained = no_torch(
        "train", "--backend", "mlx", "--model", str(tiny_gguf), "--data", str(data), "--out", str(run),
        "--max-steps", "2", "--batch-size", "2", "--set", f"model.cache_dir={cache}", "--set", "train.max_length=64",
        cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert (run / "adapter" / "adapters.safetensors").is_file()
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["backend"] == "mlx"
    assert (run / "README.md").read_text(encoding="utf-8").startswith("<!-- mlx-lora model card")


def test_torch_backend_without_torch_is_one_line_naming_the_extra(tmp_path, tiny_gguf):
    data = write_rows(tmp_path / "data")
    result = no_torch(
        "train", "--backend", "torch", "--model", str(tiny_gguf), "--data", str(data), "--out", str(tmp_path / "r"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == "error: backend 'torch' needs torch: pip install -e '.[torch]'\n"
