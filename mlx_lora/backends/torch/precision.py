"""Which arithmetic training uses here: fp32, or frozen base weights in bf16 where this machine's bf16 is faster."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mlx_lora.core.environment import cpu_flags, cpu_name
from mlx_lora.core.files import atomic_write_text

# A matmul of the embedded 0.5B's MLP shape (tokens × hidden) · (hidden × intermediate): what a step spends on.
PROBE_SHAPE = (512, 896, 4864)
# bf16 must beat fp32 by this much to be chosen: it rounds the frozen weights, so a tie is not worth it. CPUs with
# avx512_bf16 measured 2.5–2.8× on this shape (2 threads); AVX2-only CPUs emulate bf16 and measured 7–10× slower.
MIN_GAIN = 1.2
PROBE_FILE = "precision-probe.json"


def _gflops(dtype: torch.dtype, reps: int = 3) -> float:
    m, k, n = PROBE_SHAPE
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    F.linear(x, w)  # warm-up: first calls pick kernels
    best = float("inf")
    for _ in range(reps):
        tick = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - tick)
    return 2 * m * k * n / best / 1e9


def probe(cache_dir: Path | None = None, refresh: bool = False) -> dict:
    """fp32 vs bf16 matmul rate on this CPU (best of 3; about a second), cached per CPU model and bf16 units,
    torch version and thread count so that every run on a machine makes the same choice. The cache keeps one entry
    per key: a 1-thread test run and a 2-thread main job do not re-measure each other's out. The units are in the
    key because the name is not enough: an AVX2-only machine and one with avx512_bf16 both call themselves "AMD
    EPYC", and a cache carried from one to the other (a copied home folder) would pick bf16 where it is 8x slower."""
    units = ",".join(f for f in cpu_flags() if "bf16" in f or f.startswith("amx")) or "no bf16 units"
    key = f"{cpu_name()} ({units}) | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = Path(cache_dir) / PROBE_FILE if cache_dir is not None else None
    entries: dict = {}
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            entries = cached.get("entries", {}) if isinstance(cached, dict) else {}
        except (OSError, json.JSONDecodeError):
            pass  # a broken cache is measured again
        if key in entries and not refresh:
            return entries[key]
    fp32, bf16 = _gflops(torch.float32), _gflops(torch.bfloat16)
    result = {"key": key, "fp32_gflops": round(fp32, 1), "bf16_gflops": round(bf16, 1), "shape": list(PROBE_SHAPE)}
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"entries": {**entries, key: result}}, indent=2) + "\n")
        except OSError:
            pass  # a read-only cache costs a second per run, nothing else
    return result


def resolve(setting: str, device: torch.device, cache_dir: Path | None = None) -> str:
    """train.precision (auto | fp32 | bf16) → what this device uses: "fp32" or "bf16"."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type != "cpu":
        return "fp32"  # MPS: bf16 support varies by macOS version; fp32 is always right
    found = probe(cache_dir)
    return "bf16" if found["bf16_gflops"] >= MIN_GAIN * found["fp32_gflops"] else "fp32"


def for_generation(loaded, setting: str, cache_dir: Path | None = None) -> str:
    """Put a loaded model in the arithmetic generate.precision resolves to here, once: an fp32 model (base and
    adapter) becomes bf16 where bf16 wins. Generation only reads the weights, so nothing is kept in fp32. A dtype
    the user chose (model.dtype) is kept, as is a model loaded in bf16 (CUDA). Returns what generation uses."""
    if "generation_precision" not in loaded.extra:
        chosen = "fp32"
        automatic = loaded.extra.get("dtype_setting", "auto") == "auto"
        if automatic and loaded.dtype == torch.float32 and resolve(setting, loaded.device, cache_dir) == "bf16":
            loaded.model.to(torch.bfloat16)
            loaded.dtype, chosen = torch.bfloat16, "bf16"
        elif loaded.dtype != torch.float32:
            chosen = str(loaded.dtype).removeprefix("torch.")
        loaded.extra["generation_precision"] = chosen
    return loaded.extra["generation_precision"]
