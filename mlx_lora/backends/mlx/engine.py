"""Our MLX LoRA loop: epochs, grad accumulation, warmup+cosine, clipping, eval, early stopping, best, resume."""

from __future__ import annotations

import math
import shutil
import signal
import time
from functools import partial
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlx_lora.backends import TrainOutcome
from mlx_lora.data.batching import epoch_batches, steps_per_epoch, total_steps
from mlx_lora.core.config import Config
from mlx_lora.core.errors import UserError
from mlx_lora.data.render import Encoded
from mlx_lora.training.schedule import lr_at
from mlx_lora.backends.mlx import state as checkpoint
from mlx_lora.backends.mlx.model import MLXLoaded, attach_lora, save_adapter

# Architectures whose __call__ is exactly `head(model.model(x))`: there we take logits only where the loss is
# (a 150k-word vocabulary makes the full lm_head the largest matmul of a step; same loss, less work).
_SPLIT_HEAD = {"qwen2", "qwen3", "llama", "mistral"}


def split_head(model: nn.Module):
    args = getattr(model, "args", None)
    if getattr(model, "model_type", None) not in _SPLIT_HEAD or args is None:
        return None
    if getattr(args, "tie_word_embeddings", False):
        return model.model, model.model.embed_tokens.as_linear
    if "lm_head" in model:
        return model.model, model.lm_head
    return None


# Compiled-step shapes: widths in steps of 8 (padding costs a full forward/backward per column), loss
# positions in steps of 32 (a padded position costs only its lm_head row). On 453 real chat rows (batch 4)
# this is 4% more token columns than no padding (12% with mlx-lm's steps of 32) and 15 shapes in 3 epochs.
WIDTH_QUANTUM, POSITION_QUANTUM = 8, 32


def bucket(n: int, quantum: int) -> int:
    """n rounded up to a multiple of quantum, or of 1/16 of its power of two when that is larger (<= 6.25%)."""
    step = max(quantum, (1 << (max(n, 1).bit_length() - 1)) // 16)
    return -(-n // step) * step


def make_batch(rows: list[Encoded], pad_id: int, pad: bool = False):
    """(inputs, targets, positions, weights, n): flat indices of the n target positions that carry loss.

    Rows are right-padded to the longest as pad_batch() does; with pad, the width and the count of loss
    positions are rounded up by bucket() so the compiled step sees few shapes: extra columns come after every
    real token (causal attention: never seen) and extra positions weigh 0, so loss and gradients are unchanged."""
    width = max(len(r.ids) for r in rows) - 1  # inputs drop the last token, targets the first
    width = bucket(width, WIDTH_QUANTUM) if pad else width
    ids = np.full((len(rows), width + 1), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), width + 1), dtype=bool)
    for j, row in enumerate(rows):
        ids[j, :len(row.ids)] = row.ids
        mask[j, :len(row.mask)] = row.mask
    found = np.flatnonzero(mask[:, 1:].reshape(-1))
    n = int(found.size)
    positions = np.zeros(bucket(n, POSITION_QUANTUM) if pad else n, dtype=np.uint32)  # extra: 0, weight 0
    positions[:n] = found
    weights = (np.arange(positions.size) < n).astype(np.float32)
    return mx.array(ids[:, :-1]), mx.array(ids[:, 1:].reshape(-1)), mx.array(positions), mx.array(weights), n


def make_loss(model: nn.Module):
    split = split_head(model)

    def loss_sum(model, inputs, targets, positions, weights, norm):
        if split is not None:
            body, head = split
            hidden = body(inputs)
            logits = head(mx.take(hidden.reshape(-1, hidden.shape[-1]), positions, axis=0))
        else:
            logits = model(inputs)
            logits = mx.take(logits.reshape(-1, logits.shape[-1]), positions, axis=0)
        ce = (nn.losses.cross_entropy(logits.astype(mx.float32), mx.take(targets, positions)) * weights).sum()
        return ce / norm, ce

    return loss_sum


def compiled_step(model: nn.Module, optimizer: optim.Optimizer, loss_sum, max_grad_norm: float | None):
    """(state, accumulate, step), compiled with mx.compile as mlx-lm's tuner compiles its step.

    accumulate adds one batch's loss and gradients to the running sums; step does the same for the group's last
    batch, clips and applies AdamW, in one graph (one eval a step); it returns (loss, pre-clip grad-norm).
    A compiled function sees arrays only through its arguments and `state` (weights, AdamW moments and
    learning rate, the dropout RNG key); anything else would be frozen into the graph when traced. So build this
    after a resume has replaced optimizer.state, and keep the model in train mode while stepping. Dropout draws
    from mx.random.state as eager code does, so reseeding per step still replays it exactly on resume."""
    value_and_grad = nn.value_and_grad(model, loss_sum)
    state = [model.state, optimizer.state, mx.random.state]

    def add(inputs, targets, positions, weights, norm, loss, grads):
        (value, _), g = value_and_grad(model, inputs, targets, positions, weights, norm)
        if grads is None:  # the group's first batch: a separate trace
            return value, g
        return loss + value, tree_map(mx.add, grads, g)

    def step(inputs, targets, positions, weights, norm, loss, grads):
        loss, grads = add(inputs, targets, positions, weights, norm, loss, grads)
        # One concatenation and one reduction rather than one reduction per LoRA matrix: on a small model
        # the step's cost is the number of kernels more than their size.
        flat = mx.concatenate([g.astype(mx.float32).reshape(-1) for _, g in tree_flatten(grads)])
        grad_norm = mx.sqrt(mx.square(flat).sum())
        if max_grad_norm and max_grad_norm > 0:  # as optim.clip_grad_norm: scale down only above the limit
            scale = mx.where(grad_norm < max_grad_norm, 1.0, max_grad_norm / (grad_norm + 1e-6))
            grads = tree_map(lambda g: (g * scale).astype(g.dtype), grads)
        optimizer.update(model, grads)
        return loss, grad_norm

    return (state, partial(mx.compile, inputs=state, outputs=state)(add),
            partial(mx.compile, inputs=state, outputs=state)(step))


def update_slots(model: nn.Module, optimizer: optim.Optimizer) -> list[tuple[dict | list, str | int]]:
    """(container, key) of each trainable weight and optimizer-state array, found once.

    The step writes new arrays into these same containers, so saving `[c[k] for c, k in slots]` before it and
    writing them back undoes it (when its loss is not finite) without walking the module tree every step."""
    slots: list[tuple[dict | list, str | int]] = []
    for path, _ in tree_flatten(model.trainable_parameters()):
        node = model
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        slots.append((node, leaf))

    def walk(node):
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(value, mx.array):
                slots.append((node, key))
            elif isinstance(value, (dict, list)):
                walk(value)

    walk(optimizer.state)
    return slots


def evaluate(loaded: MLXLoaded, rows: list[Encoded], batch_size: int, loss_sum) -> float | None:
    """Token-weighted mean loss over all supervised tokens (batches of similar length, fixed order)."""
    if not rows:
        return None
    loaded.model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        inputs, targets, positions, weights, n = make_batch([rows[i] for i in order[start:start + batch_size]],
                                                            loaded.pad_id)
        if n:  # eager: a few batches, not worth compiling
            _, ce = loss_sum(loaded.model, inputs, targets, positions, weights, 1.0)
            total += ce.item()
            count += n
    loaded.model.train()
    return total / count if count else None


class _Interrupt:
    """First Ctrl-C asks the loop to stop after the current step (and save); a second one aborts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _fingerprint(train_rows: list[Encoded], cfg: Config) -> dict:
    t = cfg.train
    return {"train_rows": len(train_rows), "batch_size": t.batch_size, "grad_accum": t.grad_accum,
            "epochs": t.epochs, "seed": t.seed}


def _resume(loaded, optimizer, resume: Path, run_dir: Path, fingerprint: dict) -> tuple[Path, dict]:
    folder = checkpoint.find(resume)
    saved = checkpoint.restore(loaded, optimizer, folder)
    mismatch = [f"{k} now {v} vs {saved['fingerprint'].get(k)} in the checkpoint"
                for k, v in fingerprint.items() if saved.get("fingerprint", {}).get(k) != v]
    if mismatch:
        raise UserError(f"{folder}: cannot resume with different settings ({', '.join(mismatch)})")
    old_adapter = folder.parent.parent / "adapter"  # the best adapter so far lives in the old run folder
    if old_adapter.is_dir() and not (run_dir / "adapter").exists():
        shutil.copytree(old_adapter, run_dir / "adapter")
    return folder, saved


def train(loaded: MLXLoaded, train_rows: list[Encoded], valid_rows: list[Encoded], cfg: Config, run_dir: Path,
          on_event: Callable[[dict], None], resume: Path | None = None) -> TrainOutcome:
    t = cfg.train
    if not train_rows:
        raise UserError("no training rows with supervised tokens; check the data folder's train.jsonl")
    if t.batch_size < 1 or t.grad_accum < 1 or t.epochs < 1:
        raise UserError("train.batch_size, train.grad_accum and train.epochs must be >= 1")
    model = loaded.model
    mx.random.seed(t.seed)  # lora_a's init is random: the same seed gives the same adapter start
    if loaded.lora is None:
        attach_lora(loaded, cfg.lora)
    else:  # continue training a loaded adapter: only its LoRA matrices learn
        model.freeze()
        model.unfreeze(keys=["lora_a", "lora_b", "m"], strict=False)  # m: DoRA magnitudes
    optimizer = optim.AdamW(learning_rate=t.lr, betas=[0.9, 0.999], eps=1e-8, weight_decay=t.weight_decay,
                            bias_correction=True)  # mlx defaults to no bias correction; torch's AdamW has it
    per_epoch = steps_per_epoch(len(train_rows), t.batch_size, t.grad_accum)
    total = total_steps(len(train_rows), t.batch_size, t.grad_accum, t.epochs, t.max_steps)
    fingerprint = _fingerprint(train_rows, cfg)
    state = {"step": 0, "best_eval_loss": None, "best_step": None, "bad_evals": 0, "elapsed_s": 0.0}
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume is not None:
        folder, saved = _resume(loaded, optimizer, Path(resume), run_dir, fingerprint)
        state.update({k: saved[k] for k in state if k in saved})
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    on_event({"type": "start", "total_steps": total, "epochs": t.epochs, "train_rows": len(train_rows),
              "valid_rows": len(valid_rows), "trainable_params": int(trainable), "total_params": int(total_params),
              "backend": "mlx", "device": str(mx.default_device())})
    for note in loaded.warnings:
        on_event({"type": "warning", "message": note})
    if resume is not None:
        on_event({"type": "warning", "message": f"resumed from {folder} at step {state['step']}"})

    loss_sum = make_loss(model)
    optimizer.init(model.trainable_parameters())  # no-op after a resume; the compiled update needs the moments
    compiled_state, accumulate, train_step = compiled_step(model, optimizer, loss_sum, t.max_grad_norm)
    slots = update_slots(model, optimizer)
    started = time.perf_counter() - state["elapsed_s"]
    stopped = "completed"
    step = state["step"]
    evaluated_at = step if resume is not None else None

    def epoch_of(s: int) -> int:  # 1-based epoch of the last finished step
        return min(max(s - 1, 0) // per_epoch + 1, t.epochs)

    def eval_and_checkpoint(with_eval: bool = True) -> None:
        """Evaluate (not when interrupted), write the best adapter to run_dir/adapter, checkpoint."""
        nonlocal stopped, evaluated_at
        evaluated_at = step
        eval_loss = evaluate(loaded, valid_rows, t.batch_size, loss_sum) if with_eval else None
        if eval_loss is not None:
            best = math.isfinite(eval_loss) and (state["best_eval_loss"] is None or eval_loss < state["best_eval_loss"])
            if best:
                state.update(best_eval_loss=eval_loss, best_step=step, bad_evals=0)
                save_adapter(loaded, run_dir / "adapter")
            else:
                state["bad_evals"] += 1
            on_event({"type": "eval", "step": step, "epoch": epoch_of(step), "eval_loss": eval_loss, "best": best})
        state.update(step=step, elapsed_s=time.perf_counter() - started)
        path = checkpoint.save(loaded, optimizer, run_dir, step,
                               {**state, "total_steps": total, "fingerprint": fingerprint})
        checkpoint.prune(run_dir, {step, state["best_step"]} - {None})  # the latest (to resume) and the best
        on_event({"type": "checkpoint", "step": step, "path": str(path)})
        if t.early_stopping_patience and valid_rows and state["bad_evals"] >= t.early_stopping_patience:
            stopped = "early_stopped"

    model.train()
    with _Interrupt() as interrupt:
        groups, groups_epoch = [], None
        while step < total and stopped == "completed":
            if interrupt.requested:
                stopped = "interrupted"
                break
            epoch = step // per_epoch
            if epoch != groups_epoch:  # the shared, seeded batch order: both backends see the same groups
                batches = epoch_batches(train_rows, t.batch_size, t.seed, epoch)
                groups = [batches[i:i + t.grad_accum] for i in range(0, len(batches), t.grad_accum)]
                groups_epoch = epoch
            group = groups[step - epoch * per_epoch]
            tic = time.perf_counter()
            mx.random.seed(t.seed * 1_000_003 + step)  # dropout noise per step, reproducible on resume
            prepared = [make_batch([train_rows[i] for i in rows], loaded.pad_id, pad=True) for rows in group]
            prepared = [p for p in prepared if p[4]]
            norm = sum(p[4] for p in prepared)  # the whole group's supervised tokens (as torch does)
            norm_array = mx.array(norm, mx.float32)  # an array, not a float: a Python number would retrace
            loss, grads = None, None
            for inputs, targets, positions, weights, _ in prepared[:-1]:
                loss, grads = accumulate(inputs, targets, positions, weights, norm_array, loss, grads)
                mx.eval(loss, grads)  # one batch's activations in memory at a time
            optimizer.learning_rate = lr = lr_at(step, t.lr, t.warmup_steps, total, t.schedule)
            before = [container[key] for container, key in slots]
            loss, grad_norm = train_step(*prepared[-1][:4], norm_array, loss, grads)
            mx.eval(loss, grad_norm, compiled_state)
            loss_value, norm_value = loss.item(), grad_norm.item()
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                for (container, key), value in zip(slots, before):  # undo the update: weights and moments
                    container[key] = value
                on_event({"type": "warning", "message": f"loss {loss_value} / grad-norm {norm_value} is not finite "
                          f"at step {step + 1}; stopped without applying it. Lower train.lr or check the data."})
                stopped = "non_finite"
                break
            step += 1
            seconds = max(time.perf_counter() - tic, 1e-9)
            tokens = sum(len(train_rows[i].ids) for rows in group for i in rows)
            on_event({"type": "step", "step": step, "epoch": epoch + 1, "loss": loss_value, "lr": lr,
                      "grad_norm": norm_value, "tokens": tokens, "supervised_tokens": int(norm),
                      "tokens_per_s": tokens / seconds, "supervised_tokens_per_s": norm / seconds,
                      "elapsed_s": time.perf_counter() - started, "memory_mb": mx.get_peak_memory() / 2 ** 20})
            epoch_done = step % per_epoch == 0
            if step == total or (t.eval_every and step % t.eval_every == 0) or (not t.eval_every and epoch_done):
                eval_and_checkpoint()
        if stopped == "completed" and total < per_epoch * t.epochs:
            stopped = "max_steps"
        if stopped == "interrupted" and evaluated_at != step and step > 0:
            eval_and_checkpoint(with_eval=False)  # so the run can resume from here

    final = run_dir / "adapter"
    if not valid_rows or not final.exists():
        save_adapter(loaded, final)  # no eval picked a best one: the final (or last good) weights
    elif state["best_step"] is not None and state["best_step"] != step:
        # Later generation with this loaded model should use the kept (best) adapter, as the run dir does.
        loaded.model.load_weights(list(mx.load(str(final / "adapters.safetensors")).items()), strict=False)
    elapsed = time.perf_counter() - started
    on_event({"type": "done", "steps": step, "stopped": stopped, "best_eval_loss": state["best_eval_loss"],
              "best_step": state["best_step"], "elapsed_s": elapsed})
    model.eval()
    return TrainOutcome(run_dir, step, state["best_eval_loss"], state["best_step"], stopped,
                        {"adapter": str(final), "adapter_format": "mlx", "total_steps": total,
                         "trainable_params": int(trainable), "total_params": int(total_params),
                         "elapsed_s": elapsed})
