"""Measuring helpers shared by the benchmark workers: peak memory that can be reset per task, timing, hardware."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

from mlx_lora.core.environment import cpu_flags, cpu_name

VERSIONED = (
    "mlx-lora",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "mlx",
    "mlx-cpu",
    "mlx-metal",
    "mlx-cuda",
    "mlx-lm",
    "tokenizers",
    "numpy",
)


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux), so one process can measure several tasks."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (Linux VmHWM), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 1024)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    tic = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - tic, result


def spread(values: list[float]) -> dict:
    """Median, min, max and the relative half-range ((max-min)/2/median) of a list of measurements."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "rel_spread": None, "n": 0}
    med = statistics.median(values)
    half = (max(values) - min(values)) / 2
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "rel_spread": half / med if med else None,
        "n": len(values),
    }


def quantiles(values: list[float]) -> dict:
    """Median and inter-quartile range of per-step times."""
    if not values:
        return {"median": None, "p25": None, "p75": None}
    if len(values) < 2:
        return {"median": values[0], "p25": values[0], "p75": values[0]}
    q = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "p25": q[0], "p75": q[2]}


def versions() -> dict[str, str]:
    from mlx_lora.core.environment import versions as installed_versions

    return installed_versions(VERSIONED)


def memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def hardware() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "machine": platform.node(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "cpu_flags": cpu_flags(),
        "load_average_at_start": list(load) if load else None,
    }
