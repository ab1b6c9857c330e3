"""MLX training checkpoints: adapter + AdamW state (safetensors) + trainer scalars (JSON), written atomically."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from mlx_lora.core.errors import UserError
from mlx_lora.core.files import staged_dir
from mlx_lora.backends.mlx.model import MLXLoaded, adapter_weights, save_adapter

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step}"


def save(loaded: MLXLoaded, optimizer: optim.Optimizer, run_dir: Path, step: int, state: dict) -> Path:
    """checkpoints/step-N/{adapter/, optimizer.safetensors, trainer_state.json}, via a temp dir + rename."""
    dst = checkpoint_dir(run_dir, step)
    with staged_dir(dst) as tmp:
        save_adapter(loaded, tmp / "adapter")
        # step and learning_rate go to JSON; the per-parameter moments (m, v) are the tensors.
        moments = {k: v for k, v in tree_flatten(optimizer.state) if k not in ("step", "learning_rate")}
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), moments, metadata={"format": "mlx"})
        scalars = {**state, "optimizer_step": int(optimizer.state["step"].item()), "backend": "mlx"}
        (tmp / STATE_FILE).write_text(json.dumps(scalars, indent=2) + "\n", encoding="utf-8")
    return dst


def prune(run_dir: Path, keep: set[int]) -> None:
    """Drop checkpoints other than the ones to keep (the best and the latest)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and int(match.group(1)) not in keep:
            shutil.rmtree(child, ignore_errors=True)


def find(resume: Path) -> Path:
    """A checkpoint folder, or the latest checkpoint of a run directory."""
    resume = Path(resume)
    if (resume / STATE_FILE).is_file():
        return resume
    root = resume / "checkpoints"
    steps = sorted((int(m.group(1)), c) for c in (root.iterdir() if root.is_dir() else [])
                   if (m := _STEP_DIR.match(c.name)) and (c / STATE_FILE).is_file())
    if not steps:
        raise UserError(f"{resume}: no checkpoint to resume from (expected checkpoints/step-N/{STATE_FILE})")
    return steps[-1][1]


def restore(loaded: MLXLoaded, optimizer: optim.Optimizer, folder: Path) -> dict:
    """Load adapter weights and AdamW moments into a model that already has the same LoRA layers."""
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{folder / STATE_FILE}: unreadable ({exc})") from None
    if state.get("backend") != "mlx":
        other = state.get("backend") or ("torch" if "position" in state else "unknown")
        raise UserError(f"{folder}: a {other} checkpoint; resume it with the {other} backend (backend.name={other})")
    weights = mx.load(str(folder / "adapter" / "adapters.safetensors"))
    current = adapter_weights(loaded.model)
    if set(weights) != set(current) or any(weights[k].shape != current[k].shape for k in weights):
        raise UserError(f"{folder}: checkpoint LoRA layout differs from lora.* settings of this run; "
                        "resume with the same rank, targets and num_layers")
    loaded.model.load_weights(list(weights.items()), strict=False)
    moments = mx.load(str(folder / OPTIMIZER_FILE))
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
    restored["step"] = mx.array(state["optimizer_step"], mx.uint64)
    optimizer.state = restored
    mx.eval(loaded.model.parameters(), optimizer.state)
    return state
