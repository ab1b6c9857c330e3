"""Torch checkpoint state: the PEFT adapter, AdamW moments and step counts, and the RNG, as safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from mlx_lora.core.errors import UserError

OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter(model, folder: Path) -> None:
    """PEFT's own format into a new folder (the caller stages and publishes it)."""
    # save_embedding_layers=False: "auto" may fetch the base config from the hub to compare vocabularies.
    model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)


def load_adapter(model, folder: Path) -> None:
    from peft import set_peft_model_state_dict

    try:
        result = set_peft_model_state_dict(
            model,
            load_file(
                str(folder / "adapter" / ADAPTER_WEIGHTS)
                if (folder / "adapter").is_dir()
                else str(folder / ADAPTER_WEIGHTS)
            ),
        )
    except RuntimeError:  # torch's size-mismatch report runs to dozens of lines
        raise UserError(
            f"{folder}: checkpoint LoRA layout differs from the lora.* settings of this run (or another "
            "base model); resume with the same model, rank, targets and num_layers"
        ) from None
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"{folder}: adapter does not match this model/LoRA config")


def _rng() -> dict[str, torch.Tensor]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = rng
    return tensors


def save(folder: Path, optimizer: torch.optim.Optimizer, names: list[str]) -> None:
    """AdamW moments keyed by parameter name, per-parameter step counts in the file's metadata, and the RNG."""
    tensors, steps = {}, {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, param in zip(names, params):
        for key, value in (optimizer.state.get(param) or {}).items():
            if key == "step":
                steps[name] = float(value)
            else:
                tensors[f"{name}::{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(folder / OPTIMIZER_FILE), metadata={"format": "pt", "steps": json.dumps(steps)})
    save_file({k: v.contiguous() for k, v in _rng().items()}, str(folder / RNG_FILE))


def restore(folder: Path, model, optimizer: torch.optim.Optimizer, names: list[str]) -> None:
    load_adapter(model, folder)
    try:
        tensors = load_file(str(folder / OPTIMIZER_FILE))
        with safe_open(str(folder / OPTIMIZER_FILE), "pt") as handle:
            steps = json.loads((handle.metadata() or {}).get("steps", "{}"))
        rng = load_file(str(folder / RNG_FILE))
    except (OSError, SafetensorError, json.JSONDecodeError) as exc:
        raise UserError(f"{folder}: unreadable checkpoint state ({exc}); resume from another checkpoint") from None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, param in zip(names, params):
        if name not in steps:
            continue
        moments = {k.split("::", 1)[1]: v.to(param.device) for k, v in tensors.items() if k.split("::", 1)[0] == name}
        moments["step"] = torch.tensor(steps[name], dtype=torch.float32)
        optimizer.state[param] = moments
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
