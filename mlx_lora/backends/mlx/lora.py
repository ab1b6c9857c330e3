"""LoRA layers on an mlx-lm model: our lora.* settings → mlx-lm keys, scale and layers, attached fresh."""

from __future__ import annotations

import mlx.nn as nn
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_lora.backends.mlx.model import MLXLoaded
from mlx_lora.core.config import LoraConfig
from mlx_lora.core.errors import UserError

ALL_LINEAR = ("all-linear", "all")


def lora_keys(model: nn.Module, targets: list[str]) -> list[str]:
    """Our target names (q_proj, or self_attn.q_proj, or all-linear) → mlx-lm keys relative to a block."""
    linear = {
        name: name
        for name, module in model.layers[-1].named_modules()
        if isinstance(module, (nn.Linear, nn.QuantizedLinear)) and name
    }
    by_leaf: dict[str, list[str]] = {}
    for name in linear:
        by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    if any(t in ALL_LINEAR for t in targets):
        return sorted(linear)
    keys = []
    for target in targets:
        if target in linear:
            keys.append(target)
        elif target in by_leaf:
            keys += by_leaf[target]
        else:
            names = ", ".join(sorted(by_leaf))
            raise UserError(
                f"lora.targets: {target} is not a linear layer of this model; choose from {names} (or all-linear)"
            )
    return sorted(set(keys))


def lora_settings(model: nn.Module, lora: LoraConfig) -> dict:
    total = len(model.layers)
    num_layers = lora.num_layers if lora.num_layers is not None else total
    if not 1 <= num_layers <= total:
        raise UserError(
            f"lora.num_layers must be between 1 and {total} for this model, got {lora.num_layers} "
            "(--set lora.num_layers=null adapts every layer)"
        )
    if lora.rank < 1:
        raise UserError(f"lora.rank must be >= 1, got {lora.rank}")
    # PEFT's rsLoRA scales by alpha/sqrt(r); mlx-lm takes the product as an absolute scale either way.
    scale = lora.alpha / (lora.rank**0.5 if lora.rslora else lora.rank)
    return {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "scale": scale,
        "dropout": lora.dropout,
        "keys": lora_keys(model, lora.targets),
        "num_layers": num_layers,
        "dora": lora.dora,
    }


def attach_lora(loaded: MLXLoaded, lora: LoraConfig) -> dict:
    """Freeze the base model and put fresh LoRA layers on it (call mx.random.seed first: lora_a is random)."""
    settings = lora_settings(loaded.model, lora)
    loaded.model.freeze()
    linear_to_lora_layers(
        loaded.model,
        settings["num_layers"],
        {k: settings[k] for k in ("rank", "scale", "dropout", "keys")},
        use_dora=settings["dora"],
    )
    loaded.lora = settings
    return settings
