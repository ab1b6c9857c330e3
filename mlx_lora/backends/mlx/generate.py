"""Batched generation through mlx-lm's BatchGenerator (greedy or sampled), streamed token by token."""

from __future__ import annotations

import sys
from collections.abc import Callable

from mlx_lora.backends.mlx.model import MLXLoaded
from mlx_lora.core.config import GenerateConfig
from mlx_lora.core.errors import UserError

_warned = False


def _first_step(bias: dict[int, float]):
    import mlx.core as mx

    ids, values, calls = mx.array(list(bias)), mx.array(list(bias.values())), [0]

    def add(context, logits):
        calls[0] += 1
        return logits.at[..., ids].add(values.astype(logits.dtype)) if calls[0] == 1 else logits

    return add


def generate(
    loaded: MLXLoaded,
    prompts: list[list[int]],
    cfg: GenerateConfig,
    stop_ids: list[int],
    on_token: Callable[[int, int], None] | None = None,
    biased: list[bool] | None = None,
) -> list[list[int]]:
    """Batched generation through mlx-lm's BatchGenerator; the stop token itself is not returned. The loaded
    model's first_token_bias applies to the prompts flagged in `biased` (None: all)."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    global _warned
    if loaded.warnings and not _warned:
        _warned = True
        print(f"warning: {loaded.warnings[0]}", file=sys.stderr)
    if not prompts:
        return []
    if any(not p for p in prompts):
        raise UserError("generate: every prompt needs at least one token")
    loaded.model.eval()
    sampler = make_sampler(temp=cfg.temperature, top_p=cfg.top_p if 0 < cfg.top_p < 1 else 0.0)
    # mlx-lm penalises the last 20 tokens by default; torch (as HF) penalises everything seen, prompt included.
    processors = make_logits_processors(
        repetition_penalty=cfg.repetition_penalty if cfg.repetition_penalty != 1.0 else None,
        repetition_context_size=max(len(p) for p in prompts) + cfg.max_new_tokens,
    )
    size = max(1, cfg.batch_size)
    # One processor per prompt that adds the bias to its first new token's logits and then stands aside (a call
    # count, not the context's length: what context mlx-lm passes differs between its versions).
    flags = [True] * len(prompts) if biased is None else biased
    per_row = [
        [*processors, *([_first_step(loaded.first_token_bias)] if loaded.first_token_bias and flag else [])]
        for flag in flags
    ]
    gen = BatchGenerator(
        loaded.model,
        max_tokens=cfg.max_new_tokens,
        stop_tokens=[[t] for t in stop_ids] or None,
        sampler=sampler,
        logits_processors=processors,
        completion_batch_size=size,
        prefill_batch_size=size,
    )
    results: list[list[int]] = [[] for _ in prompts]
    try:
        uids = gen.insert([list(p) for p in prompts], logits_processors=per_row)
        index = {uid: i for i, uid in enumerate(uids)}
        while responses := gen.next_generated():
            for response in responses:
                if response.finish_reason == "stop":
                    continue
                i = index[response.uid]
                results[i].append(int(response.token))
                if on_token is not None:
                    on_token(i, int(response.token))
    finally:
        gen.close()
    return results


def token_margins(loaded: MLXLoaded, prompts: list[list[int]], token: int) -> list[float]:
    """Per prompt, the logit of `token` as its first new token minus the highest other logit, unbiased; one
    prompt at a time (no padding to get right, and calibration scores a valid split's few dozen prompts)."""
    import mlx.core as mx

    loaded.model.eval()
    margins = []
    for prompt in prompts:
        logits = loaded.model(mx.array([prompt]))[0, -1].astype(mx.float32)
        own = logits[token]
        others = mx.where(mx.arange(logits.shape[-1]) == token, -mx.inf, logits)
        margins.append(float(own - others.max()))
    return margins
