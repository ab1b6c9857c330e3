"""Atomic checkpoints: adapter + optimizer state + RNG (safetensors) + loop position (JSON), and their restore."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mlx_lora.core.errors import UserError

STATE_FILE = "trainer_state.json"


@dataclass
class Position:
    """Where the loop stands after `step` optimizer steps; enough to continue exactly."""

    step: int = 0
    epoch: int = 0  # 0-based epoch the next accumulation group belongs to
    group: int = 0  # next accumulation group inside that epoch
    best_eval_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evals since the best one (early stopping)
    last_eval_step: int = 0
    elapsed_s: float = 0.0


def save_adapter(model, path: Path) -> None:
    """PEFT's own format, written beside and renamed in so a reader never sees half an adapter."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        # save_embedding_layers=False: "auto" may fetch the base config from the hub to compare vocabularies.
        model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, final: Path) -> None:
    """rename() cannot replace a non-empty folder: move the old one aside first, then drop it."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    return tensors


def rng_snapshot() -> dict[str, torch.Tensor]:
    return _rng_tensors()


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, dict]:
    """AdamW moments keyed by parameter name (tensors) and the per-parameter step counts (JSON)."""
    tensors, steps = {}, {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, param in zip(names, params):
        state = optimizer.state.get(param)
        if not state:
            continue
        for key, value in state.items():
            if key == "step":
                steps[name] = float(value)
            else:
                tensors[f"{name}::{key}"] = value.detach().cpu().contiguous()
    return tensors, steps


def load_optimizer(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict, steps: dict) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, param in zip(names, params):
        if name not in steps:
            continue
        state = {k.split("::", 1)[1]: v.to(param.device) for k, v in tensors.items() if k.split("::", 1)[0] == name}
        state["step"] = torch.tensor(steps[name], dtype=torch.float32)
        optimizer.state[param] = state


def save(ckpt_root: Path, model, optimizer, names: list[str], position: Position, rng: dict,
         fingerprint: dict, keep: int = 2) -> Path:
    """Write checkpoints/step-N atomically (temp folder + rename) and keep only the newest `keep`."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{position.step}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".step-{position.step}.tmp-"))
    try:
        model.save_pretrained(str(tmp / "adapter"), safe_serialization=True, save_embedding_layers=False)
        tensors, steps = optimizer_tensors(optimizer, names)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
        state = {"position": asdict(position), "optimizer_steps": steps, "fingerprint": fingerprint}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(list_checkpoints(ckpt_root))[:-keep] if keep else []:
        shutil.rmtree(ckpt_root / f"step-{old}", ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[int]:
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        if child.name.startswith("step-") and (child / STATE_FILE).is_file():
            try:
                steps.append(int(child.name[5:]))
            except ValueError:
                pass
    return sorted(steps)


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder / checkpoints folder → its newest checkpoint."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return root / f"step-{found[-1]}"
    raise UserError(f"{path}: no checkpoint to resume from (expected a checkpoints/step-N folder)")


def load(path: Path) -> tuple[Position, dict, dict, dict, dict, Path]:
    """(position, optimizer tensors, optimizer steps, rng tensors, fingerprint, adapter file)."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        state["position"], state["optimizer_steps"], state["fingerprint"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path / STATE_FILE}: unreadable checkpoint state ({exc}); resume from another "
                        "checkpoint") from None
    return (Position(**state["position"]), load_file(str(path / "optimizer.safetensors")),
            state["optimizer_steps"], load_file(str(path / "rng.safetensors")), state["fingerprint"],
            path / "adapter" / "adapter_model.safetensors")
