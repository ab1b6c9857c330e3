"""Facts about this process and install: installed versions, and whether this is the process that writes files."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

VERSIONED = ("mlx-lora", "torch", "transformers", "peft", "mlx", "mlx-lm", "tokenizers", "gguf")


def versions(names: tuple[str, ...] = VERSIONED) -> dict[str, str]:
    """Installed versions of `names` (absent packages are left out), plus Python's."""
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD features that decide matmul speed (avx512/bf16/amx), from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def main_process() -> bool:
    """False on every torchrun rank but 0: only rank 0 writes files and reports."""
    return os.environ.get("RANK", "0") == "0"
