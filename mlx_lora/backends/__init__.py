"""The backend registry: which backends exist, which are installed, and what `auto` picks here."""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys

from mlx_lora.backends.protocol import Backend
from mlx_lora.core.errors import UserError

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
