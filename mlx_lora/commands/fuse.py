"""`mlx-lora fuse`: merge an adapter into its base model and save a folder transformers and mlx-lm load."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_lora.commands.options import adapter_option, backend_choice, build_config, config_option, set_option
from mlx_lora.core.errors import UserError
from mlx_lora.core.hf_config import check_model_out


@click.command()
@config_option
@set_option
@click.option("--model", help="Base model (default: the adapter run's).")
@adapter_option
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder for the merged model.")
@click.option("--backend", type=backend_choice, help="Backend that merges (default: auto).")
def fuse(config_path, overrides, model, adapter, out, backend):
    """Merge an adapter into its base model; the output folder loads in transformers and mlx-lm."""
    from mlx_lora.backends.loading import load_for_generation

    cfg = build_config(config_path, overrides, samples=False, backend__name=backend)
    if cfg.model.dtype == "auto":
        cfg.model.dtype = "float32"  # merge at full precision: a bf16 sum would round the adapter away
    check_model_out(out)  # before the model loads
    backend_, loaded, _, _ = load_for_generation(model, adapter, cfg, progress=True)
    if not hasattr(backend_, "fuse"):
        raise UserError(f"backend {backend_.name} cannot fuse; use --backend torch")
    click.echo(f"fused model: {backend_.fuse(loaded, Path(out))}")
