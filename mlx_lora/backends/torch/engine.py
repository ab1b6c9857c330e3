"""The LoRA training loop: masked loss on gathered positions, accumulation, AdamW, eval, checkpoints, resume."""

from __future__ import annotations

import math
import resource
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from mlx_lora.backends import OnEvent, TrainOutcome
from mlx_lora.data.batching import epoch_batches, pad_batch
from mlx_lora.core.config import Config
from mlx_lora.core.errors import UserError
from mlx_lora.data.render import Encoded
from mlx_lora.training.schedule import lr_at

from mlx_lora.backends.torch import state as checkpoint

from mlx_lora.backends.torch import ddp
from mlx_lora.backends.torch.state import Position
from mlx_lora.backends.torch.generate import cache_kwarg, returned_cache


# A short shared prefix is not worth a pass of its own: ~21 shared tokens of ~85 measured only 1.03x (batch 4).
MIN_SHARED_PREFIX = 16


def shared_prefix(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Leading positions every row of the batch shares, with no loss on them or on the token after them.

    Chat rows all start with the same template and system prompt (~20 tokens of ~90 in the sample data). Returns
    0 when the batch has one row or shares too little to be worth a separate pass.
    """
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(dim=0) & (mask == 0).all(dim=0)
    run = int(same.int().cumprod(dim=0).sum())
    # Stop one short of the run: the hidden state at the run's last position predicts the first token after it,
    # which may carry loss, and the loss is gathered from the tail's hidden states only.
    prefix = min(run - 1, ids.shape[1] - 1)
    return prefix if prefix >= MIN_SHARED_PREFIX else 0


class MaskedLMLoss(torch.nn.Module):
    """Summed next-token loss over supervised positions only.

    The hidden states are gathered at the positions whose *next* token is supervised before the lm_head runs,
    so the vocabulary projection (the largest matmul of a small model) covers only those positions.
    Rows are right-padded, so causal attention alone keeps real tokens from seeing padding: no mask needed,
    which lets SDPA take its plain causal path.

    A prefix all rows share (template + system prompt) runs once, for one row; its keys and values are repeated
    for every row and the rest of each row attends to them as to a KV cache. Gradients flow back through the
    repeat, so loss and gradients equal the plain pass (to float rounding) with (rows - 1) x prefix fewer tokens
    of work.
    """

    def __init__(self, causal_lm: torch.nn.Module, share_prefix: bool = True):
        super().__init__()
        self.causal_lm, self.share_prefix = causal_lm, share_prefix

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        decoder = self.causal_lm.get_decoder()
        prefix = shared_prefix(ids, mask) if self.share_prefix else 0
        if prefix:
            name = cache_kwarg(decoder)
            head = decoder(input_ids=ids[:1, :prefix], use_cache=True)
            cache = returned_cache(head, name)
            cache.batch_repeat_interleave(ids.shape[0])
            positions = torch.arange(prefix, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
            hidden = decoder(input_ids=ids[:, prefix:], position_ids=positions, use_cache=True,
                             **{name: cache}).last_hidden_state
        else:
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        keep = mask[:, prefix + 1:].bool()
        logits = self.causal_lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
        return F.cross_entropy(logits, ids[:, prefix + 1:][keep], reduction="sum")


def supervised(row: Encoded) -> int:
    """Targets that carry loss: position t predicts token t+1, so the first mask entry never counts."""
    return sum(row.mask[1:])


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.current_allocated_memory() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 1024)


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], cfg: Config) -> torch.optim.AdamW:
    """AdamW with decay on weights (LoRA A/B, DoRA magnitudes) and none on biases, as HF's Trainer groups them."""
    decay = [p for n, p in named if not n.endswith("bias")]
    no_decay = [p for n, p in named if n.endswith("bias")]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.999), eps=1e-8)


class Trainer:
    def __init__(self, peft_model, train: list[Encoded], valid: list[Encoded], cfg: Config, run_dir: Path,
                 on_event: OnEvent, device: torch.device, pad_id: int, dist: ddp.Dist):
        if not train:
            raise UserError("no training rows with supervised tokens; check the data folder's train.jsonl")
        self.model, self.train_rows, self.valid_rows, self.cfg = peft_model, train, valid, cfg
        self.run_dir, self.device, self.pad_id, self.dist = Path(run_dir), device, pad_id, dist
        self._emit = on_event
        t = cfg.train
        if t.batch_size < 1 or t.grad_accum < 1 or t.epochs < 1:
            raise UserError("train.batch_size, train.grad_accum and train.epochs must be >= 1")
        self.named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in self.named]
        self.loss_fn = MaskedLMLoss(peft_model.get_base_model())
        self.wrapped = ddp.wrap(self.loss_fn, dist, device)
        self.optimizer = make_optimizer(self.named, cfg)
        n_batches = math.ceil(len(train) / t.batch_size)
        self.groups_per_epoch = math.ceil(math.ceil(n_batches / dist.world) / t.grad_accum)
        full = self.groups_per_epoch * t.epochs
        self.total = min(full, t.max_steps) if t.max_steps else full
        self.capped = self.total < full
        self.pos = Position()
        self.rng = checkpoint.rng_snapshot()

    # -- events and files: rank 0 only -------------------------------------------------------------------
    def emit(self, event: dict) -> None:
        if self.dist.main:
            self._emit(event)

    def fingerprint(self) -> dict:
        t = self.cfg.train
        return {"train_rows": len(self.train_rows), "batch_size": t.batch_size, "grad_accum": t.grad_accum,
                "epochs": t.epochs, "seed": t.seed, "world_size": self.dist.world, "total_steps": self.total}

    def save_checkpoint(self, sync: bool = True) -> None:
        if self.dist.main:
            path = checkpoint.save(self.run_dir / "checkpoints", self.model, self.optimizer, self.names, self.pos,
                                   self.rng, self.fingerprint())
            self.emit({"type": "checkpoint", "step": self.pos.step, "path": str(path)})
        if sync:
            ddp.barrier(self.dist)

    def save_adapter(self) -> None:
        if self.dist.main:
            checkpoint.save_adapter(self.model, self.run_dir / "adapter")

    # -- resume ------------------------------------------------------------------------------------------
    def resume(self, path: Path) -> None:
        path = checkpoint.resolve(path)
        pos, tensors, steps, rng, fingerprint, adapter_file = checkpoint.load(path)
        mismatch = {k: (v, fingerprint.get(k)) for k, v in self.fingerprint().items()
                    if k != "total_steps" and fingerprint.get(k) != v}
        if mismatch:
            detail = ", ".join(f"{k} now {a} vs {b} in the checkpoint" for k, (a, b) in mismatch.items())
            raise UserError(f"{path}: cannot resume with different settings ({detail})")
        try:
            result = set_peft_model_state_dict(self.model, load_file(str(adapter_file)))
        except RuntimeError:  # torch's size-mismatch report runs to dozens of lines
            raise UserError(f"{path}: checkpoint LoRA layout differs from the lora.* settings of this run (or another "
                            "base model); resume with the same model, rank, targets and num_layers") from None
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"{adapter_file}: adapter does not match this model/LoRA config")
        checkpoint.load_optimizer(self.optimizer, self.names, tensors, steps)
        checkpoint.restore_rng(rng)
        self.pos, self.rng = pos, rng
        old_adapter = path.parent.parent / "adapter"  # the best adapter so far lives in the old run folder
        if self.dist.main and old_adapter.is_dir() and not (self.run_dir / "adapter").exists():
            shutil.copytree(old_adapter, self.run_dir / "adapter")

    # -- one optimizer step ------------------------------------------------------------------------------
    def _tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def step(self, group: list[list[int]]) -> dict | None:
        """Forward/backward every micro-batch of the group, then clip and step; None when the loss is not finite."""
        rows = [[self.train_rows[i] for i in batch] for batch in group]
        local_sup = sum(supervised(r) for b in rows for r in b)
        local_tok = sum(len(r.ids) for b in rows for r in b)
        # The loss is a mean over the supervised tokens of the whole group on all ranks: each micro-batch's
        # sum is divided by that global count (× world, because DDP averages gradients over ranks).
        (global_sup,) = ddp.all_sum([local_sup], self.dist, self.device)
        scale = self.dist.world / max(global_sup, 1.0)
        loss_sum = 0.0
        for k, batch in enumerate(rows):
            ids, mask, _ = pad_batch(batch, self.pad_id)
            with ddp.no_sync(self.wrapped, skip=k < len(rows) - 1):
                part = self.wrapped(self._tensor(ids), self._tensor(mask))
                (part * scale).backward()
            loss_sum += part.item()
        loss_sum, sup, tok = ddp.all_sum([loss_sum, local_sup, local_tok], self.dist, self.device)
        params = [p for _, p in self.named]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm))
        loss = loss_sum / max(sup, 1.0)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return {"loss": loss, "grad_norm": grad_norm}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": grad_norm, "tokens": int(tok), "supervised_tokens": int(sup)}

    def set_lr(self) -> float:
        t = self.cfg.train
        lr = lr_at(self.pos.step, t.lr, t.warmup_steps, self.total, t.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    # -- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_loss(self) -> float:
        self.model.eval()
        order = sorted(range(len(self.valid_rows)), key=lambda i: len(self.valid_rows[i].ids))
        bs = self.cfg.train.batch_size
        batches = [order[i:i + bs] for i in range(0, len(order), bs)][self.dist.rank::self.dist.world]
        total, count = 0.0, 0
        for batch in batches:
            rows = [self.valid_rows[i] for i in batch]
            ids, mask, _ = pad_batch(rows, self.pad_id)
            total += self.loss_fn(self._tensor(ids), self._tensor(mask)).item()
            count += sum(supervised(r) for r in rows)
        total, count = ddp.all_sum([total, count], self.dist, self.device)
        self.model.train()
        return total / max(count, 1.0)

    def eval_due(self) -> bool:
        every = self.cfg.train.eval_every
        epoch_end = self.pos.group == 0 and self.pos.step > 0
        return self.pos.step == self.total or (every > 0 and self.pos.step % every == 0) or (not every and epoch_end)

    def evaluate_and_checkpoint(self) -> bool:
        """Eval (when there is a valid set), keep the best adapter, checkpoint; True when patience ran out."""
        pos = self.pos
        if self.valid_rows:
            loss = self.eval_loss()
            best = pos.best_eval_loss is None or loss < pos.best_eval_loss
            if best:
                pos.best_eval_loss, pos.best_step, pos.bad_evals = loss, pos.step, 0
                self.save_adapter()
            else:
                pos.bad_evals += 1
            self.emit({"type": "eval", "step": pos.step, "epoch": self._epoch_label(), "eval_loss": loss,
                       "best": best})
        pos.last_eval_step = pos.step
        self.save_checkpoint()
        patience = self.cfg.train.early_stopping_patience
        return bool(patience and self.valid_rows and pos.bad_evals >= patience)

    def _epoch_label(self) -> int:
        """1-based epoch of the last finished step."""
        return self.pos.epoch if self.pos.group == 0 and self.pos.step else self.pos.epoch + 1

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, resume: Path | None = None) -> TrainOutcome:
        t = self.cfg.train
        if resume is not None:
            self.resume(resume)
        trainable = sum(p.numel() for _, p in self.named)
        total_params = sum(p.numel() for p in self.model.parameters())
        self.emit({"type": "start", "total_steps": self.total, "epochs": t.epochs, "train_rows": len(self.train_rows),
                   "valid_rows": len(self.valid_rows), "trainable_params": trainable, "total_params": total_params,
                   "backend": "torch", "device": str(self.device)})
        self.model.train()
        started = time.perf_counter() - self.pos.elapsed_s
        stopped = "max_steps" if self.capped else "completed"
        try:
            if self.pos.step and self.pos.last_eval_step != self.pos.step and self.eval_due():
                if self.evaluate_and_checkpoint():  # interrupted during an eval: finish it first
                    stopped = "early_stopped"
            while stopped not in ("early_stopped", "non_finite") and self.pos.step < self.total:
                batches = ddp.shard(epoch_batches(self.train_rows, t.batch_size, t.seed, self.pos.epoch), self.dist)
                groups = [batches[i:i + t.grad_accum] for i in range(0, len(batches), t.grad_accum)]
                while self.pos.group < len(groups) and self.pos.step < self.total:
                    lr = self.set_lr()
                    tick = time.perf_counter()
                    result = self.step(groups[self.pos.group])
                    if "tokens" not in result:
                        stopped = "non_finite"
                        self.emit({"type": "warning", "message": self._non_finite_message(result)})
                        break
                    self.pos.step += 1
                    self.pos.group += 1
                    epoch_done = self.pos.group == len(groups)
                    if epoch_done:
                        self.pos.epoch, self.pos.group = self.pos.epoch + 1, 0
                    self.rng = checkpoint.rng_snapshot()
                    seconds = max(time.perf_counter() - tick, 1e-9)
                    self.pos.elapsed_s = time.perf_counter() - started
                    self.emit({"type": "step", "step": self.pos.step, "epoch": self._epoch_label(), "lr": lr,
                               **result, "tokens_per_s": result["tokens"] / seconds,
                               "supervised_tokens_per_s": result["supervised_tokens"] / seconds,
                               "elapsed_s": self.pos.elapsed_s, "memory_mb": memory_mb(self.device)})
                    if self.eval_due() and self.evaluate_and_checkpoint():
                        stopped = "early_stopped"
                        break
                    if epoch_done:
                        break  # the next epoch has its own batch order
        except KeyboardInterrupt:
            stopped = "interrupted"
            self.optimizer.zero_grad(set_to_none=True)  # a half-accumulated group is dropped, its data redone
            self.pos.elapsed_s = time.perf_counter() - started
            self.save_checkpoint(sync=False)  # other ranks may be mid-collective: no barrier
        if not self.valid_rows or not (self.run_dir / "adapter").exists():
            self.save_adapter()  # no eval to pick a best one: the final (or last good) weights
        elapsed = time.perf_counter() - started
        self.emit({"type": "done", "steps": self.pos.step, "stopped": stopped,
                   "best_eval_loss": self.pos.best_eval_loss, "best_step": self.pos.best_step, "elapsed_s": elapsed})
        return TrainOutcome(self.run_dir, self.pos.step, self.pos.best_eval_loss, self.pos.best_step, stopped,
                            extra={"total_steps": self.total, "elapsed_s": elapsed, "adapter_format": "peft",
                                   "position": asdict(self.pos)})

    def _non_finite_message(self, result: dict) -> str:
        kept = checkpoint.list_checkpoints(self.run_dir / "checkpoints")
        where = f"checkpoints/step-{kept[-1]}" if kept else "none yet; adapter/ holds the weights before the bad step"
        return (f"loss {result['loss']} / grad-norm {result['grad_norm']} is not finite at step {self.pos.step + 1}; "
                f"stopped without applying it. Last good checkpoint: {where}. Lower train.lr or check the data.")
