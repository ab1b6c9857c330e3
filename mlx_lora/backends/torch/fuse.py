"""Fuse an adapter into its base model and save an HF folder that transformers and mlx-lm both load."""

from __future__ import annotations

import shutil
from pathlib import Path

from mlx_lora.backends.torch import model as loading
from mlx_lora.backends.torch.model import Loaded
from mlx_lora.core.config import Config
from mlx_lora.core.errors import UserError
from mlx_lora.core.files import replaced_dir
from mlx_lora.core.hf_config import TOKENIZER_FILES, add_top_level_rope, check_model_out


def fuse_loaded(loaded: Loaded, out_dir: str | Path) -> Path:
    """merge_and_unload the loaded adapter, save safetensors weights, copy the tokenizer and chat template."""
    if not hasattr(loaded.model, "merge_and_unload"):
        raise UserError("fuse: no adapter loaded; pass --adapter with a run or adapter folder")
    out_dir = Path(out_dir)
    check_model_out(out_dir)
    merged = loaded.model.merge_and_unload()
    loaded.model = merged
    merged.config.use_cache = True  # the saved model is for inference
    source = Path(loaded.source)
    source = source if source.is_dir() else source.parent
    with replaced_dir(out_dir) as folder:  # a kill mid-save leaves no half model under out_dir
        merged.save_pretrained(str(folder), safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (source / name).is_file() and not (folder / name).exists():
                shutil.copy2(source / name, folder / name)
        add_top_level_rope(folder / "config.json")
    return out_dir


def fuse(model_dir: str | Path, adapter: str | Path, out_dir: str | Path, cfg: Config | None = None) -> Path:
    """Load on CPU in fp32 (merging in bf16 would round the sum) and fuse."""
    cfg = cfg or Config()
    cfg.backend.device, cfg.model.dtype = "cpu", "float32"
    return fuse_loaded(loading.load(model_dir, adapter, cfg), out_dir)
