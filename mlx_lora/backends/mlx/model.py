"""MLX models through mlx-lm: loading (rope_theta trap handled) and adapters of either format."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import load_model

from mlx_lora.backends import adapters
from mlx_lora.core.config import Config
from mlx_lora.core.errors import UserError
from mlx_lora.core.hf_config import rope_override
from mlx_lora.core.model_store import require_safetensors

OPENBLAS_FIX = (
    "apt-get install libopenblas0-pthread libgfortran5, then "
    "export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
)
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass
class MLXLoaded:
    """An mlx-lm model (with LoRA layers once an adapter is loaded or training starts) and where it came from."""

    model: nn.Module
    model_dir: Path
    config: dict
    pad_id: int = 0
    adapter: Path | None = None
    adapter_format: str | None = None
    lora: dict | None = None  # {rank, scale, alpha, dropout, keys, num_layers, dora} once LoRA layers exist
    warnings: list[str] = field(default_factory=list)
    first_token_bias: dict[int, float] = field(default_factory=dict)  # added to the first new token's logits


def blas_note() -> str | None:
    """On Linux, mlx-cpu links the reference BLAS (~20x slower matmuls) unless an optimised one is preloaded.

    Only LD_PRELOAD interposes on mlx's BLAS symbols: numpy's own bundled OpenBLAS, though loaded in the same
    process, stays private to numpy and changes nothing for mlx."""
    if not sys.platform.startswith("linux"):
        return None
    preload = os.environ.get("LD_PRELOAD", "").lower()
    if any(name in preload for name in ("openblas", "mkl", "blis")):
        return None
    return (
        "mlx-cpu on Linux uses the unoptimised reference BLAS (~20x slower matmuls than torch); "
        f"fine for tiny models. Fix: {OPENBLAS_FIX}"
    )


def _pad_id(config: dict) -> int:
    for key in ("pad_token_id", "eos_token_id"):
        value = config.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return 0


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m")}


def save_adapter(loaded: MLXLoaded, dst: Path, weights: dict[str, mx.array] | None = None) -> Path:
    """mlx-lm's adapter format (adapters.safetensors + adapter_config.json) into a new folder; the caller stages
    and publishes it (as the torch backend's save_adapter), so that one generation holds the whole checkpoint."""
    lora = loaded.lora
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(
        str(dst / adapters.MLX_WEIGHTS), weights or adapter_weights(loaded.model), metadata={"format": "mlx"}
    )
    config = adapters.mlx_config(
        lora["rank"],
        lora["scale"],
        lora["dropout"],
        lora["keys"],
        lora["num_layers"],
        dora=lora["dora"],
        alpha=lora["alpha"],
        base_model=str(loaded.model_dir),
    )
    (dst / adapters.CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return dst


def _load_adapter(loaded: MLXLoaded, adapter: Path) -> None:
    folder = adapters.adapter_dir(adapter)
    fmt = adapters.detect_format(folder)
    source = folder
    tmp = None
    if fmt == "peft":
        info = adapters.info(folder)
        total = len(loaded.model.layers)
        if info.layers and max(info.layers) >= total:
            raise UserError(f"{folder}: adapter has layer {max(info.layers)}, the model only {total} layers")
        tmp = Path(tempfile.mkdtemp(prefix="mlx-lora-adapter-"))
        source = tmp / "adapter"
        adapters.peft_to_mlx(folder, source, num_layers=total - min(info.layers) if info.layers else total)
    try:
        config = json.loads((source / adapters.CONFIG).read_text(encoding="utf-8"))
        try:
            load_adapters(loaded.model, str(source))
        except ValueError as exc:
            raise UserError(f"{folder}: adapter does not fit this model ({str(exc).splitlines()[0]})") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    params = config["lora_parameters"]
    alpha = (config.get("mlx_lora") or {}).get("alpha", params["scale"] * params["rank"])
    loaded.lora = {
        "rank": params["rank"],
        "alpha": alpha,
        "scale": params["scale"],
        "dropout": params.get("dropout", 0.0),
        "keys": params.get("keys") or [],
        "num_layers": config["num_layers"],
        "dora": config.get("fine_tune_type") == "dora",
    }
    loaded.adapter, loaded.adapter_format = folder, fmt


def load(model_dir: Path, adapter: Path | None = None, cfg: Config | None = None) -> MLXLoaded:
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{model_dir}: no config.json; point --model at a Hugging Face model folder")
    require_safetensors(model_dir)  # mlx-lm would say only "no safetensors found"
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    try:
        model, config = load_model(model_dir, model_config=rope_override(raw) or None)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(f"{model_dir}: mlx-lm cannot load this model ({str(exc).splitlines()[0][:160]})") from None
    dtype = cfg.model.dtype if cfg is not None else "auto"
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise UserError(f"model.dtype: unknown dtype {dtype!r}; choose auto, {', '.join(_DTYPES)}")
        model.set_dtype(_DTYPES[dtype])
    loaded = MLXLoaded(model, model_dir, config, pad_id=_pad_id(config))
    note = blas_note()
    if note:
        loaded.warnings.append(note)
    if adapter is not None:
        _load_adapter(loaded, Path(adapter))
    model.eval()
    return loaded
