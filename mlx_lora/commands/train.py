"""`mlx-lora train`: LoRA-train a model on a data folder into a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlx_lora.commands.options import (
    backend_choice,
    build_config,
    config_option,
    epochs_option,
    max_steps_option,
    set_option,
)
from mlx_lora.core.config import Config


def train_config(
    config_path=None,
    overrides=(),
    backend=None,
    model=None,
    out=None,
    epochs=None,
    max_steps=None,
    batch_size=None,
    lr=None,
    rank=None,
    num_layers=None,
) -> Config:
    """The run's config from `train`'s options: file, then --set, then each option given."""
    if num_layers == -1:  # mlx-lm's "every layer", our null
        overrides, num_layers = (*overrides, "lora.num_layers=null"), None
    return build_config(
        config_path,
        overrides,
        samples=False,  # training reads its data folder, not the KB
        backend__name=backend,
        model__path=model,
        train__out=out,
        train__epochs=epochs,
        train__max_steps=max_steps,
        train__batch_size=batch_size,
        train__lr=lr,
        lora__rank=rank,
        lora__num_layers=num_layers,
    )


@click.command()
@config_option
@set_option
@click.option("--backend", type=backend_choice, help="Training backend (default: auto).")
@click.option(
    "--model",
    help="Model: embedded (default), an HF folder, a .gguf file, or a hub id in the local Hugging Face cache "
    "(never downloaded).",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False),
    help="Folder with train.jsonl and valid.jsonl (default: data.dir from the config).",
)
@click.option(
    "--out", "--adapter-path", "out", help="Run directory (default: train.out). --adapter-path is mlx-lm's name."
)
@epochs_option
@max_steps_option
@click.option("--batch-size", type=int, help="Rows per micro-batch (train.batch_size).")
@click.option("--lr", "--learning-rate", "lr", type=float, help="Peak learning rate (train.lr).")
@click.option("--rank", type=int, help="LoRA rank (lora.rank).")
@click.option("--num-layers", type=int, help="LoRA on the last N layers only; -1 = all (lora.num_layers).")
@click.option(
    "--mask-prompt",
    is_flag=True,
    help="Accepted for mlx-lm: the prompt is always masked here and every assistant turn is trained.",
)
@click.option(
    "--resume",
    type=click.Path(exists=True, file_okay=False),
    help="Continue from a checkpoint folder (run/checkpoints/step-N) or a run folder's newest one.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
def train(config_path, overrides, data_dir, resume, no_progress, mask_prompt, **options):
    """LoRA-train a model on a data folder (--data: any supported chat JSONL) into a run directory.

    mlx-lm's flags (--iters, --batch-size, --learning-rate, --num-layers, --adapter-path) and its LoRA YAML
    (-c lora_config.yaml) are accepted.
    """
    from mlx_lora.core.environment import main_process
    from mlx_lora.training.loop import EXIT_CODES
    from mlx_lora.training.refusal_bias import describe_bias
    from mlx_lora.training.run import train_run

    cfg = train_config(config_path, overrides, **options)
    run_dir = Path(cfg.train.out)
    outcome = train_run(
        cfg, data_dir or cfg.data.dir, run_dir, resume=Path(resume) if resume else None, progress=not no_progress
    )
    if not main_process():  # under torchrun only rank 0 reports
        return
    best = f"{outcome.best_eval_loss:.4f} at step {outcome.best_step}" if outcome.best_eval_loss is not None else "-"
    click.echo(f"run: {run_dir}  stopped: {outcome.stopped}  steps: {outcome.steps}  best eval loss: {best}")
    if "refusal_bias" in outcome.extra:
        click.echo(f"refusal bias: {describe_bias(outcome.extra['refusal_bias'])}")
    if outcome.stopped == "interrupted":
        click.echo(f"resume with: mlx-lora train --out {run_dir} --resume {run_dir}  (same config and data)")
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        health = json.loads(summary_path.read_text(encoding="utf-8")).get("health", {})
        click.echo(f"health: {health.get('verdict', '?')}")
        for flag in health.get("flags", []):
            click.echo(f"  - {flag['code']}: {flag['message']}")
    if outcome.stopped in EXIT_CODES:  # checkpointed, but not finished: scripts must not read it as success
        if "error" in outcome.extra:
            click.echo(f"error: {outcome.extra['error']}", err=True)
        raise SystemExit(EXIT_CODES[outcome.stopped])
