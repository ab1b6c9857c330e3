"""Merging the LoRA layers into the base weights with mlx-lm and saving an HF-style folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mlx.utils import tree_unflatten
from mlx_lm.utils import save_config, save_model

from mlx_lora.backends.mlx.model import MLXLoaded
from mlx_lora.core.errors import UserError
from mlx_lora.core.files import replaced_dir
from mlx_lora.core.hf_config import TOKENIZER_FILES, check_model_out, rope_override


def fuse(loaded: MLXLoaded, out_dir: Path) -> Path:
    """Merge the LoRA layers into the base weights with mlx-lm's fuse and save an HF-style folder."""
    if loaded.lora is None:
        raise UserError("fuse: no adapter loaded")
    fused = [(n, m.fuse()) for n, m in loaded.model.named_modules() if hasattr(m, "fuse")]
    loaded.model.update_modules(tree_unflatten(fused))
    loaded.lora = None
    out_dir = Path(out_dir)
    check_model_out(out_dir)
    with replaced_dir(out_dir) as folder:  # a kill mid-save leaves no half model under out_dir
        save_model(folder, loaded.model)
        config = dict(loaded.config)
        config.update(rope_override(config))  # write rope_theta on top so mlx-lm reads it next time
        save_config(config, folder / "config.json")
        for name in os.listdir(loaded.model_dir):
            if name in TOKENIZER_FILES:
                shutil.copy(loaded.model_dir / name, folder / name)
    return out_dir
