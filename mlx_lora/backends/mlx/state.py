"""MLX checkpoint state: AdamW moments and step count in optimizer.safetensors (the loop writes the rest)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from mlx_lora.backends.adapters import MLX_WEIGHTS
from mlx_lora.backends.mlx.model import MLXLoaded
from mlx_lora.core.errors import UserError

OPTIMIZER_FILE = "optimizer.safetensors"


def save(optimizer: optim.Optimizer, folder: Path) -> None:
    # step and learning_rate are scalars (the metadata and the schedule); the per-parameter moments are tensors.
    moments = {k: v for k, v in tree_flatten(optimizer.state) if k not in ("step", "learning_rate")}
    mx.save_safetensors(
        str(folder / OPTIMIZER_FILE),
        moments,
        metadata={"format": "mlx", "step": str(int(optimizer.state["step"].item()))},
    )


def restore(loaded: MLXLoaded, optimizer: optim.Optimizer, folder: Path, current: dict) -> None:
    """Adapter weights and AdamW moments from a checkpoint into a model that already has LoRA layers."""
    weights = mx.load(str(folder / "adapter" / MLX_WEIGHTS))
    if set(weights) != set(current) or any(weights[k].shape != current[k].shape for k in weights):
        raise UserError(
            f"{folder}: checkpoint LoRA layout differs from the lora.* settings of this run; "
            "resume with the same rank, targets and num_layers"
        )
    loaded.model.load_weights(list(weights.items()), strict=False)
    moments, metadata = mx.load(str(folder / OPTIMIZER_FILE), return_metadata=True)
    optimizer.init(loaded.model.trainable_parameters())
    missing = []

    def pick(path, value):
        if path in ("step", "learning_rate"):
            return value
        if path not in moments:
            missing.append(path)
            return value
        return moments[path]

    restored = tree_map_with_path(pick, optimizer.state)
    if missing:
        raise UserError(f"{folder / OPTIMIZER_FILE}: optimizer state lacks {missing[0]} (and {len(missing) - 1} more)")
    restored["step"] = mx.array(int(metadata["step"]), mx.uint64)
    optimizer.state = restored
    mx.eval(loaded.model.parameters(), optimizer.state)
