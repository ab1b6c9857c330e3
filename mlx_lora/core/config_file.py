"""A config as the commands build it: defaults, then a YAML file (ours or mlx-lm's), then --set overrides."""

from __future__ import annotations

import typing
from pathlib import Path

from mlx_lora.core.config import Config, apply_mapping, parse_override, validate
from mlx_lora.core.errors import UserError
from mlx_lora.core.mlx_lm_config import apply_mlx_lm, is_mlx_lm_config
from mlx_lora.core.userfiles import load_yaml


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then each `section.key=value` override in order."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: config file not found; see configs/reference.yaml for an example")
        mapping = load_yaml(path, "YAML syntax")[0] or {}
        if is_mlx_lm_config(mapping):
            apply_mlx_lm(cfg, mapping, str(path))
        else:
            apply_mapping(cfg, mapping, str(path))
    for text in overrides:
        section, key, value = parse_override(text)
        apply_mapping(cfg, {section: {key: value}}, f"--set {text}")
    return validate(cfg)
