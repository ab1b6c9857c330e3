"""`mlx-lora run`: the whole job on the default (or given) config."""

import click

from mlx_lora.commands.options import (
    backend_choice,
    build_config,
    config_option,
    epochs_option,
    max_steps_option,
    set_option,
)


@click.command()
@config_option
@set_option
@click.option(
    "--model",
    help="Model: embedded (default), an HF folder, a .gguf file, or a hub id in the local Hugging Face cache "
    "(never downloaded).",
)
@click.option("--backend", type=backend_choice, help="Training/generation backend.")
@click.option("--out", help="Run directory (default from the config: train.out).")
@epochs_option
@max_steps_option
@click.option("--no-progress", is_flag=True, help="No progress bars (for logs).")
def run(config_path, overrides, model, backend, out, epochs, max_steps, no_progress):
    """Data → train → eval (base, tuned, tuned+rules, retrieval) → report. Default config: configs/default.yaml.

    Inputs missing from the current folder (configs/default.yaml, data/kb.jsonl, data/questions.yaml,
    configs/rules.yaml) are read from the packaged samples; runs/ is written here. `mlx-lora init DIR` copies them.
    """
    from mlx_lora.core.samples import with_fallback
    from mlx_lora.pipeline import run_pipeline

    used: list[str] = []
    if config_path is None:  # this folder's configs/default.yaml, else the packaged one
        config_path = with_fallback("configs/default.yaml", used)
    cfg = build_config(
        config_path,
        overrides,
        samples_used=used,
        model__path=model,
        backend__name=backend,
        train__out=out,
        train__epochs=epochs,
        train__max_steps=max_steps,
    )
    run_pipeline(cfg, progress=not no_progress)
