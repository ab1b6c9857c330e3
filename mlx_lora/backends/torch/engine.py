"""The torch training engine: masked loss on gathered positions (shared prefix once), accumulation, AdamW, DDP."""

from __future__ import annotations

import contextlib
import math
import resource
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mlx_lora.backends.protocol import StepResult, ValidResult
from mlx_lora.backends.torch import ddp, state
from mlx_lora.backends.torch.cache import cache_kwarg, returned_cache
from mlx_lora.backends.torch.lora import attach
from mlx_lora.backends.torch.model import Loaded
from mlx_lora.backends.torch.precision import resolve
from mlx_lora.core.config import Config
from mlx_lora.core.model_store import default_cache_dir
from mlx_lora.data.batching import loss_weights, pad_batch, valid_batches, weight_sum
from mlx_lora.data.render import Encoded

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

    def supervised_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(fp32 logits at every position whose next token carries loss, row-major; those targets; the shared
        prefix's length)."""
        decoder = self.causal_lm.get_decoder()
        prefix = shared_prefix(ids, mask) if self.share_prefix else 0
        if prefix:
            name = cache_kwarg(decoder)
            head = decoder(input_ids=ids[:1, :prefix], use_cache=True)
            cache = returned_cache(head, name)
            cache.batch_repeat_interleave(ids.shape[0])
            positions = torch.arange(prefix, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
            hidden = decoder(
                input_ids=ids[:, prefix:], position_ids=positions, use_cache=True, **{name: cache}
            ).last_hidden_state
        else:
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        keep = mask[:, prefix + 1 :].bool()
        logits = self.causal_lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
        return logits, ids[:, prefix + 1 :][keep], prefix

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        logits, targets, prefix = self.supervised_logits(ids, mask)
        if weights is None:
            return F.cross_entropy(logits, targets, reduction="sum")
        ce = F.cross_entropy(logits, targets, reduction="none")
        return (ce * weights[:, prefix + 1 :][mask[:, prefix + 1 :].bool()]).sum()


def first_margins(logits: torch.Tensor, mask: torch.Tensor, token: int) -> list[float]:
    """Per row, `token`'s margin at the row's first supervised position (its answer's first token): its logit minus
    the highest other. `logits` are supervised_logits' rows, row-major, so row r's first one follows the
    supervised positions of the rows before it."""
    counts = mask[:, 1:].sum(dim=1)  # the shared prefix never holds a supervised position: counting from 1 is the same
    first = torch.cumsum(counts, 0) - counts
    picked = logits[first]
    own = picked[:, token].clone()
    picked[:, token] = float("-inf")
    return (own - picked.max(dim=-1).values).tolist()


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


class TorchEngine:
    """Engine protocol on a PEFT model; data-parallel across ranks under torchrun."""

    name = "torch"

    def __init__(self, loaded: Loaded, cfg: Config):
        from peft import PeftModel

        self.dist = ddp.from_env(loaded.device.type)
        loaded.device = ddp.device_for(self.dist, loaded.device)
        self.rank, self.world = self.dist.rank, self.dist.world
        self.loaded, self.cfg, self.device_ = loaded, cfg, loaded.device
        self.warnings: list[str] = []
        torch.manual_seed(cfg.train.seed)  # before attaching: lora_A's initialisation is random
        model = loaded.model.to(loaded.device)
        if isinstance(model, PeftModel):  # continue training a loaded adapter
            for name, param in model.named_parameters():
                param.requires_grad = "lora_" in name
        else:
            model = attach(model, cfg.lora)
        loaded.model = self.model = model
        self.precision = resolve(cfg.train.precision, loaded.device, default_cache_dir())
        if self.precision == "bf16":
            # Frozen weights are only read: bf16 halves their memory traffic and runs the matmuls on the bf16
            # units. The LoRA weights stay fp32 (autocast computes in bf16 from them, AdamW updates fp32).
            for param in model.parameters():
                if not param.requires_grad:
                    param.data = param.data.to(torch.bfloat16)
            loaded.dtype = torch.bfloat16
        self.device = f"{loaded.device} ({self.precision})"
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in self.named]
        self.loss_fn = MaskedLMLoss(model.get_base_model())
        self.wrapped = ddp.wrap(self.loss_fn, self.dist, loaded.device)
        self.optimizer = make_optimizer(self.named, cfg)
        model.train()

    def _arithmetic(self):
        if self.precision == "bf16":
            return torch.autocast(self.device_.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def param_counts(self) -> tuple[int, int]:
        return sum(p.numel() for _, p in self.named), sum(p.numel() for p in self.model.parameters())

    def _tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device_)

    def step(self, group: list[list[Encoded]], lr: float, step: int) -> StepResult:
        first, lead = self.cfg.train.first_token_weight, self.cfg.train.first_tokens
        local_sup = sum(supervised(r) for b in group for r in b)
        local_tok = sum(len(r.ids) for b in group for r in b)
        local_weight = weight_sum([r for b in group for r in b], first, lead)
        # The loss is a (weighted) mean over the supervised tokens of the whole group on all ranks: each
        # micro-batch's sum is divided by that global weight (× world, because DDP averages gradients over ranks).
        (global_weight,) = ddp.all_sum([local_weight], self.dist, self.device_)
        scale = self.world / max(global_weight, 1.0)
        loss_sum = 0.0
        for k, batch in enumerate(group):
            ids, mask, _ = pad_batch(batch, self.loaded.pad_id)
            weights = None
            if first != 1.0:
                weights = torch.tensor([loss_weights(m, first, lead) for m in mask], device=self.device_)
            with ddp.no_sync(self.wrapped, skip=k < len(group) - 1):
                with self._arithmetic():
                    part = self.wrapped(self._tensor(ids), self._tensor(mask), weights)
                (part * scale).backward()
            loss_sum += part.item()
        loss_sum, sup, tok = ddp.all_sum([loss_sum, local_sup, local_tok], self.dist, self.device_)
        loss = loss_sum / max(global_weight, 1.0)
        params = [p for _, p in self.named]
        # train.max_grad_norm 0 means no clipping (as on MLX); torch would scale every gradient to zero.
        limit = self.cfg.train.max_grad_norm if self.cfg.train.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
        applied = math.isfinite(loss) and math.isfinite(grad_norm)
        if applied:  # else the gradients are dropped: weights and moments stay as they were
            for group_ in self.optimizer.param_groups:
                group_["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, int(tok), int(sup), applied)

    @torch.no_grad()
    def validate(self, rows: list[Encoded], token: int | None = None) -> ValidResult:
        self.model.eval()
        batches = valid_batches(rows, self.cfg.train.batch_size)[self.rank :: self.world]
        total, count = 0.0, 0
        margins: list[float] = [0.0] * len(rows)
        for batch in batches:
            chunk = [rows[i] for i in batch]
            ids, mask, _ = pad_batch(chunk, self.loaded.pad_id)
            ids_t, mask_t = self._tensor(ids), self._tensor(mask)
            with self._arithmetic():
                logits, targets, _ = self.loss_fn.supervised_logits(ids_t, mask_t)
            total += F.cross_entropy(logits, targets, reduction="sum").item()
            count += sum(supervised(r) for r in chunk)
            if token is not None:
                for i, margin in zip(batch, first_margins(logits, mask_t, token)):
                    margins[i] = margin
        total, count = ddp.all_sum([total, count], self.dist, self.device_)
        self.model.train()
        seen_all = token is not None and self.world == 1  # under DDP each rank scored only its share of the rows
        return ValidResult(total / count if count else math.nan, margins if seen_all else None)

    def save_adapter(self, folder: Path) -> None:
        state.save_adapter(self.model, folder)

    def load_adapter(self, folder: Path) -> None:
        state.load_adapter(self.model, Path(folder))

    def save_state(self, folder: Path) -> None:
        state.save(folder, self.optimizer, self.names)

    def restore_state(self, folder: Path) -> None:
        state.restore(folder, self.model, self.optimizer, self.names)

    def memory_mb(self) -> float:
        return memory_mb(self.device_)

    def agree(self, flag: bool) -> bool:
        (count,) = ddp.all_sum([float(flag)], self.dist, self.device_)
        return count > 0

    def barrier(self) -> None:
        ddp.barrier(self.dist)

    def report(self) -> dict:
        return {}  # nothing traced or compiled to count

    def close(self) -> None:
        ddp.shutdown(self.dist)
        self.model.eval()
