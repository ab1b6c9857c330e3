"""`mlx-lora train`: LoRA-train a model on a data folder into a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlx_lora.commands.options import backend_choice, build_config, config_option, set_option


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
@click.option("--out", help="Run directory (default: train.out from the config).")
@click.option("--epochs", type=int)
@click.option("--max-steps", type=int)
@click.option(
    "--resume",
    type=click.Path(exists=True, file_okay=False),
    help="Continue from a checkpoint folder (run/checkpoints/step-N) or a run folder's newest one.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
def train(config_path, overrides, backend, model, data_dir, out, epochs, max_steps, resume, no_progress):
    """LoRA-train a model on DATA (any supported chat JSONL) into a run directory."""
    from mlx_lora.core.environment import main_process
    from mlx_lora.training.loop import EXIT_CODES
    from mlx_lora.training.run import train_run

    cfg = build_config(
        config_path,
        overrides,
        backend__name=backend,
        model__path=model,
        train__out=out,
        train__epochs=epochs,
        train__max_steps=max_steps,
    )
    run_dir = Path(cfg.train.out)
    outcome = train_run(
        cfg, data_dir or cfg.data.dir, run_dir, resume=Path(resume) if resume else None, progress=not no_progress
    )
    if not main_process():  # under torchrun only rank 0 reports
        return
    best = f"{outcome.best_eval_loss:.4f} at step {outcome.best_step}" if outcome.best_eval_loss is not None else "-"
    click.echo(f"run: {run_dir}  stopped: {outcome.stopped}  steps: {outcome.steps}  best eval loss: {best}")
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
