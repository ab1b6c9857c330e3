"""Roofline: the machine's measured matmul FLOP/s and the FLOPs a LoRA training step does (formula below)."""

from __future__ import annotations

import statistics
import time

# Work of one LoRA training step, counting matmuls only (2 FLOPs per multiply-add):
#   frozen linear weights:  forward 2·N·T + gradient w.r.t. the input 2·N·T (no weight gradient) = 4·N_frozen·T
#   LoRA A/B (trainable):   forward 2 + input gradient 2 + weight gradient 2                     = 6·N_lora·T
#   lm_head (frozen):       4·N_head·T_head, T_head = positions the head runs on
# T = tokens the model actually computes (padding included), T_head = all of them for a loop that takes
# logits everywhere (HF Trainer, mlx-lm), only the supervised targets for ours (gathered before the head).
# Attention's T² terms (QKᵀ, AV) are left out: with T ≤ 192 they are ~2% of the 0.5B model's step.
FORMULA = "4·N_frozen·T + 6·N_lora·T + 4·N_head·T_head (matmuls only; attention T² terms ignored)"


def model_shape(config: dict) -> dict:
    """Linear-layer sizes of a Llama/Qwen-style decoder from its config.json."""
    h = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    inter = config["intermediate_size"]
    linears = {
        "q_proj": (h, heads * hd),
        "k_proj": (h, kv * hd),
        "v_proj": (h, kv * hd),
        "o_proj": (heads * hd, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    layers = config["num_hidden_layers"]
    return {
        "layers": layers,
        "linears": linears,
        "hidden": h,
        "vocab": config["vocab_size"],
        "n_frozen": layers * sum(i * o for i, o in linears.values()),
        "n_head": config["vocab_size"] * h,
    }


def lora_params(shape: dict, rank: int, targets: list[str], num_layers: int | None) -> int:
    layers = shape["layers"] if num_layers is None else min(num_layers, shape["layers"])
    per_layer = 0
    for target in targets:
        leaf = target.rsplit(".", 1)[-1]
        if leaf in shape["linears"]:
            i, o = shape["linears"][leaf]
            per_layer += rank * (i + o)
    return layers * per_layer


def training_flops(shape: dict, lora: dict, computed_tokens: int, head_positions: int) -> float:
    n_lora = lora_params(shape, lora["rank"], lora["targets"], lora.get("num_layers"))
    return 4 * shape["n_frozen"] * computed_tokens + 6 * n_lora * computed_tokens + 4 * shape["n_head"] * head_positions


def _affordable(n: int, once: float, budget: float) -> int:
    """The largest size ≤ n (halving) whose single product should take under `budget` seconds (cost ∝ n³)."""
    size, probe = n, 512
    while size > probe and once * (size / probe) ** 3 > budget:
        size //= 2
    return size


def torch_matmul(
    n: int, dtype_name: str, threads: int | None, reps: int, budget_s: float = 3.0, device: str = "cpu"
) -> dict:
    """Median seconds of an n×n · n×n product through F.linear (what nn.Linear runs) → FLOP/s (2·n³ per product).

    A dtype the CPU has no fast kernel for (bf16 on an AVX2-only build: ~50× slower than fp32 here) would take
    minutes at 2048³, so a 512³ probe first picks the largest size that fits `budget_s` per product.
    """
    import torch
    import torch.nn.functional as F

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
        elif device == "mps":
            torch.mps.synchronize()

    def once(a, b) -> float:
        sync()
        tic = time.perf_counter()
        F.linear(a, b)
        sync()
        return time.perf_counter() - tic

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dtype = getattr(torch, dtype_name)
        small = torch.randn(512, 512).to(device=device, dtype=dtype)
        once(small, small)  # warm-up: thread pool, packing buffers, kernels
        n = _affordable(n, once(small, small), budget_s)
        a = torch.randn(n, n).to(device=device, dtype=dtype)
        b = torch.randn(n, n).to(device=device, dtype=dtype)
        once(a, b)
        times = [once(a, b) for _ in range(reps)]
    finally:
        torch.set_num_threads(before)
    return _row("torch", n, dtype_name, threads, times)


def torch_model_matmul(shape: dict, dtype_name: str, threads: int | None, reps: int = 5, tokens: int = 512) -> dict:
    """The model's own largest product on the CPU: (tokens × hidden) · (hidden × intermediate) through F.linear,
    the up/gate projection a training step spends most of its time in. Best-of-`reps` → FLOP/s: the peak a
    training run's achieved FLOP/s is a share of (a square 2048 product runs at a different rate)."""
    import torch
    import torch.nn.functional as F

    k, n = shape["linears"]["up_proj"]
    dtype = getattr(torch, dtype_name)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        x, w = torch.randn(tokens, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        F.linear(x, w)
        times = []
        for _ in range(reps):
            tic = time.perf_counter()
            F.linear(x, w)
            times.append(time.perf_counter() - tic)
    finally:
        torch.set_num_threads(before)
    best = min(times)
    return {
        "framework": "torch",
        "shape": [tokens, k, n],
        "dtype": dtype_name,
        "threads": threads,
        "seconds": times,
        "seconds_median": statistics.median(times),
        "flops_per_s": 2 * tokens * k * n / best,
    }


def mlx_matmul(n: int, dtype_name: str, reps: int, budget_s: float = 3.0) -> dict:
    """The same for mlx on its default device (on Linux: whichever BLAS the process loaded)."""
    import mlx.core as mx

    dtype = getattr(mx, dtype_name)
    small = mx.random.normal((512, 512)).astype(dtype)
    mx.eval(small @ small)
    tic = time.perf_counter()
    mx.eval(small @ small)
    n = _affordable(n, time.perf_counter() - tic, budget_s)
    a = mx.random.normal((n, n)).astype(dtype)
    b = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a, b, a @ b)
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - tic)
    return _row("mlx", n, dtype_name, None, times)


def _row(framework: str, n: int, dtype: str, threads: int | None, times: list[float]) -> dict:
    med = statistics.median(times)
    return {
        "framework": framework,
        "n": n,
        "dtype": dtype,
        "threads": threads,
        "seconds": times,
        "seconds_median": med,
        "flops_per_s": 2 * n**3 / med,
    }
