"""Environment report: platform, usable backends, versions, thread settings, and MLX's BLAS on Linux."""

from __future__ import annotations

import os
import platform
import sys

from mlx_lora import backends
from mlx_lora.core.environment import versions
from mlx_lora.core.model_store import default_cache_dir

OPENBLAS_FIX = (
    "apt-get install libopenblas0-pthread libgfortran5, then "
    "export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
)
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY", "LD_PRELOAD")


def mlx_blas() -> str | None:
    """On Linux, which BLAS mlx-cpu's library links or has preloaded — found without importing mlx."""
    if not sys.platform.startswith("linux") or not backends.installed("mlx"):
        return None
    preload = os.environ.get("LD_PRELOAD", "")
    if "openblas" in preload or "mkl" in preload:
        return f"optimised BLAS preloaded ({preload})"
    return f"reference BLAS (slow: ~20x below torch on matmuls). Fix: {OPENBLAS_FIX}"


def report() -> dict:
    rows = {
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}, "
        f"Python {platform.python_version()}",
        "cpus": os.cpu_count(),
        "auto backend": _auto(),
    }
    for name in backends.names():
        rows[f"backend {name}"] = (
            "installed" if backends.installed(name) else f"not installed (pip install -e '.[{name}]')"
        )
    if backends.installed("torch"):
        from mlx_lora.backends.torch import devices, precision_note  # on request: importing torch takes seconds

        rows["torch devices"] = devices()
        rows["torch precision"] = precision_note()
    if backends.installed("mlx"):
        rows["mlx device"] = "Metal (Apple Silicon)" if backends.is_apple_silicon() else "CPU (mlx-cpu)"
    blas = mlx_blas()
    if blas:
        rows["mlx BLAS"] = blas
    rows["versions"] = ", ".join(f"{k} {v}" for k, v in versions().items())
    rows["threads"] = ", ".join(f"{k}={os.environ[k]}" for k in _THREAD_VARS if k in os.environ) or "library defaults"
    rows["model cache"] = str(default_cache_dir())
    return rows


def _auto() -> str:
    try:
        return backends.auto_name()
    except Exception as exc:
        return f"none ({exc})"
