"""The MLX training engine: masked loss on gathered positions, a compiled accumulate/step, AdamW, its state."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlx_lora.backends.mlx import state
from mlx_lora.backends.mlx.lora import attach_lora
from mlx_lora.backends.mlx.model import MLXLoaded, adapter_weights, save_adapter
from mlx_lora.backends.protocol import StepResult, ValidResult
from mlx_lora.core.config import Config
from mlx_lora.data.batching import loss_weights, valid_batches, weight_sum
from mlx_lora.data.render import Encoded

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


def make_batch(rows: list[Encoded], pad_id: int, pad: bool = False, first: float = 1.0, lead: int = 1):
    """(inputs, targets, positions, weights, n): flat indices of the n target positions that carry loss, and their
    weights (train.first_token_weight on each answer's first `lead` tokens, else 1; n counts positions, not weight).

    Rows are right-padded to the longest as pad_batch() does; with pad, the width and the count of loss
    positions are rounded up by bucket() so the compiled step sees few shapes: extra columns come after every
    real token (causal attention: never seen) and extra positions weigh 0, so loss and gradients are unchanged."""
    width = max(len(r.ids) for r in rows) - 1  # inputs drop the last token, targets the first
    width = bucket(width, WIDTH_QUANTUM) if pad else width
    ids = np.full((len(rows), width + 1), pad_id, dtype=np.int32)
    weighted = np.zeros((len(rows), width + 1), dtype=np.float32)  # each token's loss weight, 0 off the answers
    for j, row in enumerate(rows):
        ids[j, : len(row.ids)] = row.ids
        weighted[j, : len(row.mask)] = loss_weights(row.mask, first, lead) if first != 1.0 else row.mask
    flat = weighted[:, 1:].reshape(-1)
    found = np.flatnonzero(flat)
    n = int(found.size)
    positions = np.zeros(bucket(n, POSITION_QUANTUM) if pad else n, dtype=np.uint32)  # extra: 0, weight 0
    positions[:n] = found
    weights = np.zeros(positions.size, dtype=np.float32)
    weights[:n] = flat[found]
    return mx.array(ids[:, :-1]), mx.array(ids[:, 1:].reshape(-1)), mx.array(positions), mx.array(weights), n


def make_logits(model: nn.Module):
    """(model, inputs, positions) -> logits at the flat `positions` only: the lm_head runs on those rows alone
    where the model lets its body and head be split."""
    split = split_head(model)

    def logits_at(model, inputs, positions):
        if split is not None:
            body, head = split
            hidden = body(inputs)
            return head(mx.take(hidden.reshape(-1, hidden.shape[-1]), positions, axis=0))
        logits = model(inputs)
        return mx.take(logits.reshape(-1, logits.shape[-1]), positions, axis=0)

    return logits_at


def make_loss(model: nn.Module):
    logits_at = make_logits(model)

    def loss_sum(model, inputs, targets, positions, weights, norm):
        logits = logits_at(model, inputs, positions)
        ce = (nn.losses.cross_entropy(logits.astype(mx.float32), mx.take(targets, positions)) * weights).sum()
        return ce / norm, ce

    return loss_sum


def first_margins(logits: mx.array, positions: np.ndarray, width: int, rows: int, token: int) -> list[float]:
    """Per row, `token`'s margin at the row's first supervised position (its answer's first token): its logit
    minus the highest other. `positions` are make_batch's flat indices (row-major over `width` columns)."""
    first = np.searchsorted(positions, np.arange(rows) * width)  # each row's first index among the positions
    picked = logits[mx.array(first)].astype(mx.float32)
    own = picked[:, token]
    others = mx.where(mx.arange(picked.shape[-1]) == token, -mx.inf, picked)
    return (own - others.max(axis=-1)).tolist()


def compiled_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    loss_sum,
    max_grad_norm: float | None,
    traces: list[int] | None = None,
    compile: bool = True,
):
    """(state, accumulate, step), compiled with mx.compile as mlx-lm's tuner compiles its step.

    accumulate adds one batch's loss and gradients to the running sums; step does the same for the group's last
    batch, clips and applies AdamW, in one graph (one eval a step); it returns (loss, pre-clip grad-norm).
    A compiled function sees arrays only through its arguments and `state` (weights, AdamW moments and
    learning rate, the dropout RNG key); anything else would be frozen into the graph when traced. So build this
    after a resume has replaced optimizer.state, and keep the model in train mode while stepping. Dropout draws
    from mx.random.state as eager code does, so reseeding per step still replays it exactly on resume.

    `traces` ([accumulate, step]) counts how often each body ran in Python: once per trace when compiled (every
    new input shape re-traces), once per call when not. compile=False runs the same bodies eagerly (a benchmark's
    baseline)."""
    value_and_grad = nn.value_and_grad(model, loss_sum)
    compiled_state = [model.state, optimizer.state, mx.random.state]
    traces = traces if traces is not None else [0, 0]

    def add(inputs, targets, positions, weights, norm, loss, grads, _which=0):
        traces[_which] += 1
        (value, _), g = value_and_grad(model, inputs, targets, positions, weights, norm)
        if grads is None:  # the group's first batch: a separate trace
            return value, g
        return loss + value, tree_map(mx.add, grads, g)

    def step(inputs, targets, positions, weights, norm, loss, grads):
        loss, grads = add(inputs, targets, positions, weights, norm, loss, grads, _which=1)
        # One concatenation and one reduction rather than one reduction per LoRA matrix: on a small model
        # the step's cost is the number of kernels more than their size.
        flat = mx.concatenate([g.astype(mx.float32).reshape(-1) for _, g in tree_flatten(grads)])
        grad_norm = mx.sqrt(mx.square(flat).sum())
        if max_grad_norm and max_grad_norm > 0:  # as optim.clip_grad_norm: scale down only above the limit
            scale = mx.where(grad_norm < max_grad_norm, 1.0, max_grad_norm / (grad_norm + 1e-6))
            grads = tree_map(lambda g: (g * scale).astype(g.dtype), grads)
        optimizer.update(model, grads)
        return loss, grad_norm

    if not compile:
        return compiled_state, add, step
    compile_ = partial(mx.compile, inputs=compiled_state, outputs=compiled_state)
    return compiled_state, compile_(add), compile_(step)


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
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(value, mx.array):
                slots.append((node, key))
            elif isinstance(value, (dict, list)):
                walk(value)

    walk(optimizer.state)
    return slots


class MLXEngine:
    """Engine protocol on an mlx-lm model with LoRA layers."""

    name = "mlx"
    rank, world = 0, 1
    precision = "fp32"  # train.precision applies to torch; MLX trains in the model's own dtype

    def __init__(self, loaded: MLXLoaded, cfg: Config, compile: bool = True):
        t = cfg.train
        self.loaded, self.cfg, self.model = loaded, cfg, loaded.model
        self.compile = compile
        # Python runs of the accumulate and step bodies: traces when compiled (benchmarks/mlx_compile.py)
        self.traces = [0, 0]
        self.device = str(mx.default_device())
        self.warnings = list(loaded.warnings)
        mx.random.seed(t.seed)  # lora_a's init is random: the same seed gives the same adapter start
        if loaded.lora is None:
            attach_lora(loaded, cfg.lora)
        else:  # continue training a loaded adapter: only its LoRA matrices learn
            self.model.freeze()
            self.model.unfreeze(keys=["lora_a", "lora_b", "m"], strict=False)  # m: DoRA magnitudes
        self.optimizer = optim.AdamW(
            learning_rate=t.lr, betas=[0.9, 0.999], eps=1e-8, weight_decay=t.weight_decay, bias_correction=True
        )  # mlx defaults to no bias correction; torch's has it
        self.loss_sum = make_loss(self.model)
        self.logits_at = make_logits(self.model)
        self.optimizer.init(self.model.trainable_parameters())
        self._build()
        self.model.train()

    def _build(self) -> None:
        # The compiled functions capture optimizer.state: rebuild them whenever a resume replaces it.
        self._state, self._accumulate, self._step = compiled_step(
            self.model, self.optimizer, self.loss_sum, self.cfg.train.max_grad_norm, self.traces, self.compile
        )
        self._slots = update_slots(self.model, self.optimizer)

    def param_counts(self) -> tuple[int, int]:
        trainable = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        return int(trainable), int(sum(v.size for _, v in tree_flatten(self.model.parameters())))

    def step(self, group: list[list[Encoded]], lr: float, step: int) -> StepResult:
        mx.random.seed(self.cfg.train.seed * 1_000_003 + step)  # dropout noise per step, reproducible on resume
        first, lead = self.cfg.train.first_token_weight, self.cfg.train.first_tokens
        prepared = [make_batch(rows, self.loaded.pad_id, pad=True, first=first, lead=lead) for rows in group]
        prepared = [p for p in prepared if p[4]]
        # the whole group's supervised tokens, first tokens weighted (as torch does)
        norm = weight_sum([r for rows in group for r in rows], first, lead)
        supervised = sum(p[4] for p in prepared)
        norm_array = mx.array(norm, mx.float32)  # an array, not a float: a Python number would retrace
        loss, grads = None, None
        for inputs, targets, positions, weights, _ in prepared[:-1]:
            loss, grads = self._accumulate(inputs, targets, positions, weights, norm_array, loss, grads)
            mx.eval(loss, grads)  # one batch's activations in memory at a time
        self.optimizer.learning_rate = lr
        before = [container[key] for container, key in self._slots]
        loss, grad_norm = self._step(*prepared[-1][:4], norm_array, loss, grads)
        mx.eval(loss, grad_norm, self._state)
        loss_value, norm_value = loss.item(), grad_norm.item()
        tokens = sum(len(r.ids) for rows in group for r in rows)
        applied = math.isfinite(loss_value) and math.isfinite(norm_value)
        if not applied:
            for (container, key), value in zip(self._slots, before):  # undo the update: weights and moments
                container[key] = value
        return StepResult(loss_value, norm_value, tokens, supervised, applied)

    def validate(self, rows: list[Encoded], token: int | None = None) -> ValidResult:
        self.model.eval()
        total, count = 0.0, 0
        margins: list[float] = [0.0] * len(rows)
        for batch in valid_batches(rows, self.cfg.train.batch_size):
            inputs, targets, positions, _, n = make_batch([rows[i] for i in batch], self.loaded.pad_id)
            if n:  # eager: a few batches, not worth compiling
                logits = self.logits_at(self.model, inputs, positions)
                ce = nn.losses.cross_entropy(logits.astype(mx.float32), mx.take(targets, positions)).sum()
                total += ce.item()
                count += n
                if token is not None:
                    found = np.array(positions)
                    for i, margin in zip(batch, first_margins(logits, found, inputs.shape[1], len(batch), token)):
                        margins[i] = margin
        self.model.train()
        return ValidResult(total / count if count else math.nan, margins if token is not None else None)

    def save_adapter(self, folder: Path) -> None:
        save_adapter(self.loaded, folder)

    def load_adapter(self, folder: Path) -> None:
        self.model.load_weights(list(mx.load(str(Path(folder) / "adapters.safetensors")).items()), strict=False)

    def save_state(self, folder: Path) -> None:
        state.save(self.optimizer, folder)

    def restore_state(self, folder: Path) -> None:
        state.restore(self.loaded, self.optimizer, folder, adapter_weights(self.model))
        self._build()

    def memory_mb(self) -> float:
        return mx.get_peak_memory() / 2**20

    def agree(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        pass

    def report(self) -> dict:
        """Figures for the run's summary: how often the compiled step was traced (one per batch shape is the aim)."""
        return {"compile_traces": sum(self.traces)} if self.compile else {}

    def close(self) -> None:
        self.model.eval()
