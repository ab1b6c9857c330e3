"""Batched generation with left padding and a KV cache: greedy by default, or temperature/top-p sampling."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mlx_lora.backends.torch import lookup
from mlx_lora.backends.torch.cache import biased, cache_kwarg, left_padded, returned_cache
from mlx_lora.core.config import GenerateConfig


def _penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style repetition penalty (as in HF): shrink the logit of every token already in the sequence."""
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def _pick(logits: torch.Tensor, cfg: GenerateConfig, generator: torch.Generator | None) -> torch.Tensor:
    if cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if 0 < cfg.top_p < 1:
        # stable: tied tokens keep index order, so a top_p that keeps one token keeps argmax's (bf16 logits tie)
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        # Drop a token when the tokens ranked above it already cover top_p; the top token always stays.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > cfg.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_batch(
    model,
    prompts: list[list[int]],
    cfg: GenerateConfig,
    stop_ids: list[int],
    pad_id: int,
    device: torch.device,
    on_token: Callable[[int, int], None] | None = None,
    offset: int = 0,
    generator: torch.Generator | None = None,
    first_bias: dict[int, float] | None = None,
    biased_rows: list[bool] | None = None,
) -> list[list[int]]:
    """One left-padded batch: prefill once, then one token per step from the cache until every row stops.

    A row that stops leaves the batch (and the cache): eval answers differ a lot in length, and without this the
    longest answer would keep every finished row computing to the end.
    """
    ids, attention = left_padded(prompts, pad_id, device)
    # Positions count real tokens only, so a left-padded row sees the same positions as it would alone.
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    seen = None
    if cfg.repetition_penalty != 1.0:
        vocab = model.get_output_embeddings().weight.shape[0]
        seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, attention.bool())
    stops = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    out: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # original row of each batch row still generating
    cache, cache_name = None, cache_kwarg(model)
    step_ids, step_pos = ids, positions
    for step in range(cfg.max_new_tokens):
        result = model(
            input_ids=step_ids,
            attention_mask=attention,
            position_ids=step_pos,
            use_cache=True,
            # The last position, as an index tensor rather than the int 1: transformers slices an int as a strided
            # view, and on CPU the lm_head of that [batch, 1, hidden] view ran as a bmm against the vocabulary
            # matrix copied once per row (batch x 896 x 152k): 11 of a 16-prompt bf16 prefill's 21 s on the 0.5B
            # (8.3 s in all after). Indexing makes the hidden state contiguous and the lm_head one matmul.
            logits_to_keep=torch.tensor([step_ids.shape[1] - 1], device=device),
            **{cache_name: cache},
        )
        cache = returned_cache(result, cache_name)
        logits = result.logits[:, -1, :].float()
        if step == 0:
            logits = biased(logits, first_bias, biased_rows)
        if seen is not None:
            logits = _penalise(logits, seen, cfg.repetition_penalty)
        chosen = _pick(logits, cfg, generator)
        stopped = torch.isin(chosen, stops)
        for row, (token, stop) in enumerate(zip(chosen.tolist(), stopped.tolist())):
            if not stop:
                out[active[row]].append(token)
                if on_token is not None:
                    on_token(offset + active[row], token)
        if bool(stopped.all()):
            break
        if bool(stopped.any()):
            keep = (~stopped).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)  # in place: later steps compute only the rows still writing
            active = [active[k] for k in keep.tolist()]
            chosen, attention, step_pos = chosen[keep], attention[keep], step_pos[keep]
            if seen is not None:
                seen = seen[keep]
        if seen is not None:
            seen.scatter_(1, chosen[:, None], True)
        step_ids = chosen[:, None]
        step_pos = step_pos[:, -1:] + 1
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
    return out


def _lookup(cfg: GenerateConfig, rows: int) -> bool:
    """Prompt-lookup decoding applies: greedy, no repetition penalty, and room to draft at this batch size."""
    plain_greedy = cfg.temperature <= 0 and cfg.repetition_penalty == 1.0
    return plain_greedy and cfg.prompt_lookup > 0 and lookup.draft_size(rows, cfg.prompt_lookup) > 0


def generate(
    model,
    prompts: list[list[int]],
    cfg: GenerateConfig,
    stop_ids: list[int],
    pad_id: int,
    device: torch.device,
    on_token: Callable[[int, int], None] | None = None,
    seed: int = 0,
    memory=None,
    first_bias: dict[int, float] | None = None,
    biased: list[bool] | None = None,
) -> list[list[int]]:
    """New token ids per prompt (stop token excluded), in batches of cfg.batch_size; on_token streams them.
    `memory` (a lookup.AnswerMemory the caller keeps between calls) collects answers that prompt lookup drafts
    from later; `first_bias` is added to the logits of the first new token (token id → bias) of the prompts
    flagged in `biased` (None: all)."""
    was_training = model.training
    model.eval()
    generator = None
    if cfg.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    results: list[list[int]] = []
    size = max(1, cfg.batch_size)
    try:
        for start in range(0, len(prompts), size):
            batch = prompts[start : start + size]
            if _lookup(cfg, len(batch)):  # greedy with prompt-lookup drafts: the same tokens in fewer passes
                answers = lookup.generate_batch(
                    model,
                    batch,
                    cfg.max_new_tokens,
                    cfg.prompt_lookup,
                    stop_ids,
                    pad_id,
                    device,
                    on_token,
                    start,
                    memory=memory,
                    first_bias=first_bias,
                    biased_rows=None if biased is None else biased[start : start + size],
                )
                if memory is not None:
                    memory.add(answers, cfg.max_new_tokens, stop_ids[0] if stop_ids else None)
                results += answers
                continue
            results += generate_batch(
                model,
                batch,
                cfg,
                stop_ids,
                pad_id,
                device,
                on_token,
                offset=start,
                generator=generator,
                first_bias=first_bias,
                biased_rows=None if biased is None else biased[start : start + size],
            )
    finally:
        model.train(was_training)
    return results


@torch.no_grad()
def token_margins(model, prompts: list[list[int]], token: int, pad_id: int, device, batch_size: int) -> list[float]:
    """Per prompt, the logit of `token` as its first new token minus the highest other logit (> 0: greedy
    decoding starts with it), with no first-token bias applied."""
    was_training = model.training
    model.eval()
    margins: list[float] = [0.0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding per batch
    try:
        for start in range(0, len(order), max(1, batch_size)):
            rows = order[start : start + max(1, batch_size)]
            ids, attention = left_padded([prompts[i] for i in rows], pad_id, device)
            logits = (
                model(
                    input_ids=ids,
                    attention_mask=attention,
                    position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
                    logits_to_keep=torch.tensor([ids.shape[1] - 1], device=device),  # an index: see generate_batch
                )
                .logits[:, -1, :]
                .float()
            )
            own = logits[:, token].clone()
            logits[:, token] = float("-inf")
            for i, margin in zip(rows, (own - logits.max(dim=-1).values).tolist()):
                margins[i] = margin
    finally:
        model.train(was_training)
    return margins
