"""Fuse an adapter into its base model and save an HF folder that transformers and mlx-lm both load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from mlx_lora.config import Config
from mlx_lora.errors import UserError

from . import load as loading

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")


def fuse(model_dir: str | Path, adapter: str | Path, out_dir: str | Path, cfg: Config | None = None) -> Path:
    """merge_and_unload on CPU in fp32 (merging in bf16 would round the sum), then save weights + tokenizer."""
    cfg = cfg or Config()
    cfg.backend.device, cfg.model.dtype = "cpu", "float32"
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: output folder is not empty; choose a new --out")
    loaded = loading.load(model_dir, adapter, cfg)
    merged = loaded.model.merge_and_unload()
    merged.config.use_cache = True
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    source = Path(model_dir)
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and not (out_dir / name).exists():
            shutil.copy2(source / name, out_dir / name)
    add_top_level_rope_theta(out_dir / "config.json")
    return out_dir


def add_top_level_rope_theta(config_path: Path) -> None:
    """transformers 5 writes rope_theta only inside rope_parameters; mlx-lm reads the top-level key and
    silently falls back to 1e6 without it."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def same_logits(a: torch.nn.Module, b: torch.nn.Module, ids: list[int]) -> float:
    """Largest absolute logit difference between two models on one sequence (a check for fuse)."""
    with torch.no_grad():
        x = torch.tensor([ids])
        return float((a(input_ids=x).logits - b(input_ids=x).logits).abs().max())
