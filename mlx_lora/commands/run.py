"""`mlx-lora run`: the whole job on the default (or given) config."""

import click

from mlx_lora.commands.options import build_config, config_option, set_option


@click.command()
@config_option
@set_option
@click.option(
    "--model",
    help="Model: embedded (default), an HF folder, a .gguf file, or a hub id in the local Hugging Face cache "
    "(never downloaded).",
)
@click.option("--backend", type=click.Choice(["auto", "torch", "mlx"]), help="Training/generation backend.")
@click.option("--out", help="Run directory (default from the config: train.out).")
@click.option("--epochs", type=int)
@click.option("--max-steps", type=int)
@click.option("--no-progress", is_flag=True, help="No progress bars (for logs).")
def run(config_path, overrides, model, backend, out, epochs, max_steps, no_progress):
    """Data → train → eval (base, tuned, tuned+rules, retrieval) → report. Default config: configs/default.yaml."""
    from pathlib import Path

    from mlx_lora.pipeline import run_pipeline

    if config_path is None and Path("configs/default.yaml").is_file():
        config_path = "configs/default.yaml"
    cfg = build_config(
        config_path,
        overrides,
        model__path=model,
        backend__name=backend,
        train__out=out,
        train__epochs=epochs,
        train__max_steps=max_steps,
    )
    run_pipeline(cfg, progress=not no_progress)
