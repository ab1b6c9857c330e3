"""`mlx-lora export gguf`: a run's adapter (or the merged model) as GGUF for llama.cpp and Ollama."""

from __future__ import annotations

import click

from mlx_lora.commands.options import adapter_option, build_config, config_option, set_option


@click.group()
def export():
    """Export a trained adapter for other runtimes."""


@export.command()
@config_option
@set_option
@adapter_option
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The .gguf file to write.")
@click.option("--model", help="Base model (default: the run's; required for a bare adapter folder).")
@click.option("--merged", is_flag=True, help="Write the base model with the adapter merged in, not an adapter.")
@click.option(
    "--type",
    "kind",
    type=click.Choice(["f32", "f16", "q8_0"]),
    default=None,
    help="Type of the matrices written (default: f32 for an adapter, f16 for a merged or base model).",
)
def gguf(config_path, overrides, adapter, out, model, merged, kind):
    """Write a llama.cpp LoRA adapter GGUF (or, with --merged, a whole model GGUF), an Ollama Modelfile and a
    model card (README.md) beside it."""
    from mlx_lora.export import export_gguf

    cfg = build_config(config_path, overrides, samples=False)
    written = export_gguf(cfg, adapter, out, model=model, merged=merged, kind=kind)
    for key in ("gguf", "base", "modelfile", "card"):
        if key in written:
            click.echo(f"{key:<10} {written[key]}")
    click.echo(f"ollama: {written['command']}")
