"""Options shared by several commands: the config file, `--set` overrides and the backend choice."""

from __future__ import annotations

import click

from mlx_lora.core.config import Config, apply_mapping, load_config, validate

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML config (see configs/reference.yaml).",
)
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override a config key, e.g. --set train.lr=3e-4 (repeatable).",
)
backend_choice = click.Choice(["auto", "torch", "mlx"])


def build_config(config_path: str | None, overrides: tuple[str, ...], **direct) -> Config:
    """File, then --set, then explicit options (passed as section__key=value; None means not given)."""
    cfg = load_config(config_path, overrides)
    mapping: dict[str, dict] = {}
    for dotted, value in direct.items():
        if value is not None:
            section, key = dotted.split("__", 1)
            mapping.setdefault(section, {})[key] = value
    return validate(apply_mapping(cfg, mapping, "command line"))
