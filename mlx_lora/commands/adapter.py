"""`mlx-lora adapter convert|info`: move LoRA adapters between MLX and PEFT formats, and describe them."""

from __future__ import annotations

import json
from dataclasses import asdict

import click


@click.group()
def adapter():
    """Inspect and convert adapters between MLX (mlx-lm) and PEFT formats."""


@adapter.command()
@click.argument("src", type=click.Path(file_okay=False))
@click.option("--to", "to", type=click.Choice(["peft", "mlx"]), required=True, help="Target format.")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Output folder.")
@click.option(
    "--num-layers",
    type=int,
    default=None,
    help="To mlx: LoRA on the last N layers (default: the base model's layer count, or the adapter's).",
)
@click.option("--base-model", default=None, help="To peft: base model recorded in the PEFT config.")
def convert(src, to, out, num_layers, base_model):
    """Convert the adapter in SRC (a folder or a run directory) to --to format in --out."""
    from mlx_lora.backends.adapters import convert as do_convert
    from mlx_lora.backends.adapters import detect_format

    source = detect_format(src)
    if source == to:
        raise click.UsageError(f"{src} is already a {to} adapter")
    result = do_convert(src, out, to, num_layers=num_layers, base_model=base_model)
    click.echo(
        f"{source} → {to}: {out} (rank {result.rank}, alpha {result.alpha:g}, scale {result.scale:g}, "
        f"{len(result.layers)} layers, {result.parameters:,} parameters)"
    )


@adapter.command()
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(path, as_json):
    """Describe the adapter in PATH (a folder or a run directory)."""
    from mlx_lora.backends.adapters import info as read_info

    result = read_info(path)
    if as_json:
        click.echo(json.dumps(asdict(result), ensure_ascii=False, indent=2))
        return
    layers = result.layers
    span = f"{layers[0]}–{layers[-1]} ({len(layers)})" if layers else "none"
    click.echo(f"format      {result.format}")
    click.echo(f"rank        {result.rank}")
    click.echo(f"alpha       {result.alpha:g}  (scale {result.scale:g})")
    click.echo(f"dropout     {result.dropout:g}")
    click.echo(f"modules     {', '.join(result.modules)}")
    click.echo(f"layers      {span}")
    click.echo(f"parameters  {result.parameters:,}  ({result.dtype})")
    if result.base_model:
        click.echo(f"base model  {result.base_model}")
