"""Checkpoint folders of a run: checkpoints/step-N/{adapter/, engine state files, trainer_state.json}."""

from __future__ import annotations

import json
from pathlib import Path

from mlx_lora.core.errors import UserError

STATE_FILE = "trainer_state.json"
# Written into trainer_state.json; checkpoints of earlier versions (no format key) are refused with one line.
STATE_FORMAT = 2


def list_checkpoints(root: Path) -> list[int]:
    """Steps of the complete checkpoints under root (a folder without its state file is not one)."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.startswith("step-") and child.name[5:].isdigit() and (child / STATE_FILE).is_file():
            found.append(int(child.name[5:]))
    return sorted(found)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest checkpoint of a run folder or of its checkpoints/ folder."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        steps = list_checkpoints(root)
        if steps:
            return root / f"step-{steps[-1]}"
    raise UserError(f"{path}: no checkpoint to resume from (expected checkpoints/step-N/{STATE_FILE})")


def read_state(folder: Path, backend: str) -> dict:
    """The loop's saved state of a checkpoint, checked to be this version's and this backend's."""
    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        state["position"], state["fingerprint"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: unreadable checkpoint state ({exc}); resume from another checkpoint") from None
    if state.get("format") != STATE_FORMAT:
        raise UserError(
            f"{path}: written by an earlier mlx-lora (checkpoint format {state.get('format', 1)}, "
            f"this version reads {STATE_FORMAT}); start a new run — the old run's adapter/ still "
            "loads for generate and eval"
        )
    if state.get("backend") != backend:
        other = state.get("backend")
        raise UserError(f"{folder}: a {other} checkpoint; resume it with --backend {other}")
    return state


def _shown(value) -> str:
    return "unset" if value is None else repr(value)


def fingerprint_mismatch(now: dict, saved: dict, prefix: str = "") -> list[str]:
    """'key now X vs Y in the checkpoint' for each differing key (nested settings by their dotted name)."""
    found = []
    for key in sorted(set(now) | set(saved)):  # a key the checkpoint has and this run leaves out differs too
        a, b = now.get(key), saved.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += fingerprint_mismatch(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key} now {_shown(a)} vs {_shown(b)} in the checkpoint")
    return found
