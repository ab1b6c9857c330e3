"""Options shared by several commands: the config file, `--set` overrides, the backend, how long to train."""

from __future__ import annotations

import click

from mlx_lora.core.config import CHOICES, Config, apply_mapping, validate
from mlx_lora.core.config_file import load_config
from mlx_lora.core.samples import sample_path, say_fallbacks, with_fallback

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML config: ours (keys in configs/reference.yaml) or an mlx-lm LoRA config (flat keys, see README).",
)
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override a config key, e.g. --set train.lr=3e-4 (repeatable).",
)
backend_choice = click.Choice(CHOICES["backend.name"])
# The trained run a command reads (`export gguf`, `fuse`).
adapter_option = click.option(
    "--adapter",
    type=click.Path(exists=True, file_okay=False),
    required=True,
    help="Run directory or adapter folder (PEFT or MLX format).",
)
# How long to train: `train` and `run` take the same two, mlx-lm's --iters included.
epochs_option = click.option("--epochs", type=int, help="Passes over the train split (default: train.epochs).")
max_steps_option = click.option(
    "--max-steps",
    "--iters",
    "max_steps",
    type=int,
    help="Stop after N optimizer steps, before --epochs ends (default: train.max_steps). --iters is mlx-lm's name.",
)


def build_config(
    config_path: str | None,
    overrides: tuple[str, ...],
    *,
    samples: bool | tuple[str, ...] = True,
    samples_used: list[str] | None = None,
    **direct,
) -> Config:
    """File, then --set, then explicit options (passed as section__key=value; None means not given); with
    `samples`, default inputs missing here read the packaged samples (see use_samples): True for all three, or the
    ones this command reads ("kb", "questions", "rules"), so that its note names nothing it does not read."""
    used = list(samples_used or [])
    if samples and config_path is not None:  # `-c configs/default.yaml` from any folder reads the packaged one
        config_path = with_fallback(config_path, used)
    cfg = load_config(config_path, overrides)
    mapping: dict[str, dict] = {}
    for dotted, value in direct.items():
        if value is not None:
            section, key = dotted.split("__", 1)
            mapping.setdefault(section, {})[key] = value
    cfg = validate(apply_mapping(cfg, mapping, "command line"))
    if not samples:
        return cfg
    return use_samples(cfg, used, SAMPLE_INPUTS if samples is True else samples)


SAMPLE_INPUTS = ("kb", "questions", "rules")


def use_samples(cfg: Config, used: list[str] | None = None, reads: tuple[str, ...] = SAMPLE_INPUTS) -> Config:
    """data.kb, data.questions and rules.path left at their defaults but missing from the current folder → the
    packaged samples, said in one line on stderr (`used`: defaults the caller already took, e.g. run's -c).

    The sample question bank and rules name the sample KB's docs: they stand in only for the sample KB. With a KB
    of one's own, a missing default rules file means no keyword rules (the route only, with a note where rules are
    read) and a missing question bank is an error naming it — never the sample's, which would fail on doc ids."""
    used = list(used or [])
    cfg.data.kb = with_fallback(cfg.data.kb, used)
    if cfg.data.kb == str(sample_path("data/kb.jsonl")):
        if "questions" in reads:
            cfg.data.questions = with_fallback(cfg.data.questions, used)
        if "rules" in reads:
            cfg.rules.path = with_fallback(cfg.rules.path, used)
    say_fallbacks(used)
    return cfg
