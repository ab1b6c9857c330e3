"""Hugging Face config.json fix-ups both frameworks need, written once: rope_theta where mlx-lm reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def rope_override(config: dict) -> dict:
    """Keys to add so that mlx-lm reads the rope settings transformers 5 wrote.

    transformers 5 writes rope_theta only inside rope_parameters; mlx-lm reads the top-level key and silently
    falls back to 1e6 (a tiny Qwen2 with theta 1e4 then gave logits 0.03 apart). Non-default scaling rides along."""
    params = config.get("rope_parameters")
    override: dict[str, Any] = {}
    if isinstance(params, dict) and "rope_theta" not in config and "rope_theta" in params:
        override["rope_theta"] = params["rope_theta"]
        if params.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
            override["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return override


def add_top_level_rope(config_path: Path) -> None:
    """Rewrite a config.json with rope_override() applied (transformers still loads the file)."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    override = rope_override(config)
    if override:
        config_path.write_text(json.dumps({**config, **override}, indent=2) + "\n", encoding="utf-8")
