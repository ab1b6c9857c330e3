"""The Backend protocol every training/generation engine implements, the registry, and `auto` resolution."""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from mlx_lora.core.config import Config, GenerateConfig
from mlx_lora.core.errors import UserError
from mlx_lora.data.render import Encoded

Event = dict  # {"type": "step"|"eval"|"epoch"|"checkpoint"|"done"|..., ...}; see events.py
OnEvent = Callable[[Event], None]


@dataclass
class TrainOutcome:
    run_dir: Path
    steps: int
    best_eval_loss: float | None
    best_step: int | None
    stopped: str  # completed | max_steps | early_stopped | interrupted | non_finite
    extra: dict = field(default_factory=dict)


class Backend(Protocol):
    name: str

    def available(self) -> tuple[bool, str]:
        """(usable here?, one line why or why not) — must not import the heavy library when it is absent."""

    def load(self, model_dir: Path, adapter: Path | None, cfg: Config) -> Any:
        """Load the base model (and an adapter of either format) for training or generation."""

    def train(self, loaded: Any, train: list[Encoded], valid: list[Encoded], cfg: Config,
              run_dir: Path, on_event: OnEvent, resume: Path | None = None) -> TrainOutcome:
        """LoRA-train on ids+mask rows; write run_dir/adapter and checkpoints; report through on_event."""

    def generate(self, loaded: Any, prompts: list[list[int]], cfg: GenerateConfig, stop_ids: list[int],
                 on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """New token ids for each prompt (batched); on_token(prompt_index, token_id) streams them."""


_REGISTRY = {
    "torch": ("mlx_lora.backends.torch", "TorchBackend", "torch"),
    "mlx": ("mlx_lora.backends.mlx", "MLXBackend", "mlx"),
}


def names() -> list[str]:
    return list(_REGISTRY)


def installed(name: str) -> bool:
    """Whether the backend's library is installed, without importing it."""
    return importlib.util.find_spec(_REGISTRY[name][2]) is not None


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise UserError(f"unknown backend {name!r}; choose one of: auto, {', '.join(_REGISTRY)}")
    module, cls, lib = _REGISTRY[name]
    if not installed(name):
        extra = "torch" if name == "torch" else "mlx"
        raise UserError(f"backend {name!r} needs {lib}: pip install -e '.[{extra}]'")
    return getattr(importlib.import_module(module), cls)()


def auto_name() -> str:
    """MLX on Apple Silicon (Metal); torch elsewhere (CUDA when present). MLX on Linux CPU is slow (reference BLAS)."""
    if is_apple_silicon() and installed("mlx"):
        return "mlx"
    if installed("torch"):
        return "torch"
    if installed("mlx"):
        return "mlx"
    raise UserError("no backend installed: pip install -e '.[torch]' (or '.[mlx]' on Apple Silicon)")


def resolve(name: str = "auto") -> Backend:
    return get(auto_name() if name == "auto" else name)
