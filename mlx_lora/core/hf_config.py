"""Hugging Face model folders as both frameworks write them: rope_theta where mlx-lm reads it, what a folder holds."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mlx_lora.core.errors import UserError
from mlx_lora.core.files import replaceable_dir

# The tokenizer and chat-template files a saved model folder carries beside its weights (fuse copies them).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_WEIGHTS = re.compile(r"^model(-\d+-of-\d+)?\.safetensors(\.index\.json)?$")


def _model_entry(name: str) -> bool:
    return name == "config.json" or name in TOKENIZER_FILES or bool(_WEIGHTS.match(name))


def check_model_out(out: str | Path) -> None:
    """Refuse, before any work, an --out that fuse would replace but did not write: a folder of other files, or
    another command's output (a run's adapter/ is replaced whole too). An earlier fused model is replaced."""
    if not replaceable_dir(out, _model_entry):
        raise UserError(f"{out}: output folder holds files that are not a fused model's; choose a new --out")


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
