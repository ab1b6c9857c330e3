"""The learning-rate schedule (linear warmup, then cosine/linear/constant), as a pure function both backends call."""

from __future__ import annotations

import math

from mlx_lora.core.config import SCHEDULES


def lr_at(step: int, peak: float, warmup: int, total: int, kind: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`; decays to 0 at `total`."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
