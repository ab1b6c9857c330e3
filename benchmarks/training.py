"""Training throughput of our two backends (torch+PEFT, MLX) through the real shared training loop."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

from benchmarks import measure, roofline
from mlx_lora.core.config import Config
from mlx_lora.data.batching import epoch_batches, steps_per_epoch
from mlx_lora.data.render import Encoded
from mlx_lora.training import loop


def replay_steps(rows: list[Encoded], cfg: Config, n_steps: int) -> list[dict]:
    """Per optimizer step, what both of our backends feed the model (they share epoch_batches): real tokens,
    supervised targets, tokens actually computed (each micro-batch padded to its own longest row), and the
    positions where the lm_head runs (only the supervised ones: both loops gather before the head)."""
    t = cfg.train
    per_epoch = steps_per_epoch(len(rows), t.batch_size, t.grad_accum)
    out: list[dict] = []
    epoch = 0
    while len(out) < n_steps:
        batches = epoch_batches(rows, t.batch_size, t.seed, epoch)
        groups = [batches[i : i + t.grad_accum] for i in range(0, len(batches), t.grad_accum)][:per_epoch]
        for group in groups:
            micro = [[rows[i] for i in batch] for batch in group]
            sup = sum(sum(r.mask[1:]) for b in micro for r in b)
            out.append(
                {
                    "tokens": sum(len(r.ids) for b in micro for r in b),
                    "supervised": sup,
                    "computed": sum(len(b) * max(len(r.ids) for r in b) for b in micro),
                    "head": sup,
                }
            )
        epoch += 1
    return out[:n_steps]


def summarize(steps: list[dict], warmup: int, model_shape: dict, lora: dict) -> dict:
    """One repetition's figures from its measured steps (the first `warmup` steps are dropped)."""
    kept = steps[warmup:]
    seconds = [s["s"] for s in kept]
    total = sum(seconds)
    row = {
        "warmup_steps": warmup,
        "steps_measured": len(kept),
        "step_s": seconds,
        "step_s_quantiles": measure.quantiles(seconds),
    }
    if not kept or total <= 0:
        return row
    for key in ("tokens", "supervised", "computed"):
        if all(s.get(key) is not None for s in kept):
            row[f"{key}_tokens" if key != "tokens" else "tokens"] = sum(s[key] for s in kept)
    row["tokens_per_s"] = row["tokens"] / total if "tokens" in row else None
    row["supervised_tokens_per_s"] = row["supervised_tokens"] / total if "supervised_tokens" in row else None
    if all(s.get("computed") is not None and s.get("head") is not None for s in kept):
        flops = sum(roofline.training_flops(model_shape, lora, s["computed"], s["head"]) for s in kept)
        row["train_flops_per_s"] = flops / total
        row["computed_tokens_per_s"] = row["computed_tokens"] / total
    losses = [s.get("loss") for s in steps if s.get("loss") is not None]
    if losses:
        row["loss_first"], row["loss_last"] = losses[0], losses[-1]
    return row


def _steps_from_events(events: list[dict], replay: list[dict]) -> tuple[list[dict], bool]:
    """Step seconds from the backend's own events (tokens / tokens_per_s = the time it measured)."""
    steps, consistent = [], True
    for event, planned in zip((e for e in events if e["type"] == "step"), replay):
        consistent &= event["tokens"] == planned["tokens"]
        steps.append(
            {
                **planned,
                "s": event["tokens"] / event["tokens_per_s"],
                "loss": event["loss"],
                "tokens": event["tokens"],
                "supervised": event["supervised_tokens"],
            }
        )
    return steps, consistent


def answer_loss(model, rows: list[Encoded], pad_id: int, bf16: bool = False, batch: int = 8) -> float:
    """Mean cross-entropy over the answer tokens (mask 1) of `rows`, for any HF/PEFT torch causal LM: the one
    quality measure every torch implementation in the benchmark is held to after its steps (the pairs compare
    speed at equal valid loss)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    model.eval()
    device = next(model.parameters()).device
    arithmetic = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    total, count = 0.0, 0
    order = sorted(rows, key=lambda r: len(r.ids))
    with torch.no_grad(), arithmetic:
        for i in range(0, len(order), batch):
            chunk = order[i : i + batch]
            width = max(len(r.ids) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long, device=device)
            attention = torch.zeros_like(ids)
            target = torch.zeros_like(ids, dtype=torch.bool)
            for k, r in enumerate(chunk):
                ids[k, : len(r.ids)] = torch.tensor(r.ids)
                attention[k, : len(r.ids)] = 1
                target[k, : len(r.ids)] = torch.tensor(r.mask, dtype=torch.bool)
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
            take = target[:, 1:]
            total += F.cross_entropy(logits[take], ids[:, 1:][take], reduction="sum").item()
            count += int(take.sum())
    return total / max(count, 1)


def run_ours(
    backend_name: str,
    device: str,
    model_dir: Path,
    rows: list[Encoded],
    cfg: Config,
    steps: int,
    warmup: int,
    valid: list[Encoded] | None = None,
    pad_id: int = 0,
) -> dict:
    """Train `warmup + steps` optimizer steps with our loop on one backend/device; no eval during training (speed
    only). With `valid` (torch only), the answer-only valid loss afterwards, measured as for the Trainer."""
    from mlx_lora import backends

    cfg.train.max_steps = warmup + steps
    cfg.train.eval_every = 0
    if backend_name == "torch":
        cfg.backend.device = device
    backend = backends.get(backend_name)
    native = NativeMemory(backend_name, device)
    measure.reset_peak_rss()
    native.reset()
    events: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mlx-lora-bench-") as run_dir:
        load_s, loaded = measure.timed(backend.load, model_dir, None, cfg)
        loop.train(backend, loaded, rows, [], cfg, Path(run_dir), lambda e: events.append(e.to_dict()))
    replay = replay_steps(rows, cfg, warmup + steps)
    measured, consistent = _steps_from_events(events, replay)
    start = next(e for e in events if e["type"] == "start")
    row = {
        "load_s": load_s,
        "trainable_params": start["trainable_params"],
        "total_params": start["total_params"],
        "device_name": start["device"],
        "replay_matches_events": consistent,
        "peak_rss_mb": measure.peak_rss_mb(),
        **native.read(),
    }
    if backend_name == "torch":
        row["precision"] = start["device"].rsplit("(", 1)[-1].rstrip(")") if "(" in start["device"] else "fp32"
        if valid:
            row["valid_answer_loss"] = answer_loss(loaded.model, valid, pad_id, row["precision"] == "bf16")
    del loaded, backend
    gc.collect()
    return {**row, "steps_raw": measured}


class NativeMemory:
    """The framework's own peak-memory counter, reset per task: mlx's allocator, torch's CUDA/MPS allocator."""

    def __init__(self, backend_name: str, device: str):
        self.backend, self.device = backend_name, device

    def reset(self) -> None:
        if self.backend == "mlx":
            import mlx.core as mx

            mx.reset_peak_memory()
        elif self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict:
        if self.backend == "mlx":
            import mlx.core as mx

            return {"peak_mem_mb": mx.get_peak_memory() / 2**20, "peak_mem_kind": "mlx allocator peak"}
        if self.device == "cuda":
            import torch

            return {
                "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20,
                "peak_mem_kind": "torch.cuda.max_memory_allocated",
            }
        if self.device == "mps":
            import torch

            return {
                "peak_mem_mb": torch.mps.driver_allocated_memory() / 2**20,
                "peak_mem_kind": "torch.mps.driver_allocated_memory (at end)",
            }
        return {"peak_mem_mb": measure.peak_rss_mb(), "peak_mem_kind": "process peak RSS"}
