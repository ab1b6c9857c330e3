"""Our LoRA settings → a PEFT LoraConfig, and the adapter attached to a model."""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from mlx_lora.core.config import LoraConfig
from mlx_lora.core.errors import UserError

ALL_LINEAR = ("all-linear", "all")


def linear_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers inside the transformer blocks (lm_head excluded, as PEFT does)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def num_hidden_layers(model: torch.nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def peft_config(lora: LoraConfig, model: torch.nn.Module) -> PeftLoraConfig:
    """Translate the shared config. `all-linear` is expanded to names because PEFT refuses a string with
    `layers_to_transform`, which is how "only the last N layers" is expressed."""
    available = linear_names(model)
    targets = list(lora.targets)
    if any(t in ALL_LINEAR for t in targets):
        targets = available
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise UserError(
            f"lora.targets: {', '.join(unknown)} not in this model; its linear layers are: "
            f"{', '.join(available)} (or use all-linear)"
        )
    if lora.rank < 1:
        raise UserError(f"lora.rank must be >= 1, got {lora.rank}")
    total = num_hidden_layers(model)
    layers = None
    if lora.num_layers is not None:
        if not 1 <= lora.num_layers <= total:
            raise UserError(
                f"lora.num_layers must be between 1 and {total} for this model, got {lora.num_layers} "
                "(--set lora.num_layers=null adapts every layer)"
            )
        layers = list(range(total - lora.num_layers, total))
    return PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        use_dora=lora.dora,
        use_rslora=lora.rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach(model: torch.nn.Module, lora: LoraConfig) -> PeftModel:
    """A fresh adapter on a base model (the caller seeds torch first: lora_A's init draws random numbers)."""
    return get_peft_model(model, peft_config(lora, model))
