"""What both decoding loops share: left-padded prompt batches, the first step's bias, and the KV cache argument
under this transformers version's name."""

from __future__ import annotations

import inspect

import torch


def cache_kwarg(model) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache` (the old name still works, with a warning)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def returned_cache(result, name: str):
    """The KV cache a forward pass with use_cache=True returned, under either name."""
    return result[name] if name in result else result.past_key_values


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of prompts padded on the left to the longest: every row's last token is the last
    column, where its first new token is read from."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, attention


def biased(logits: torch.Tensor, bias: dict[int, float] | None, rows: list[bool] | None = None) -> torch.Tensor:
    """The first step's logits with the run's calibrated first-token bias added (training/refusal_bias.py), to
    the rows flagged True in `rows` (None: every row)."""
    if not bias or (rows is not None and not any(rows)):
        return logits
    add = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    add[list(bias)] = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    if rows is None:
        return logits + add
    return logits + torch.tensor(rows, dtype=logits.dtype, device=logits.device)[:, None] * add
