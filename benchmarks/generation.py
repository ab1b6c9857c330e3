"""Generation speed: prefill and decode tokens/s of our backends' batched generate and of HF `generate`."""

from __future__ import annotations

import gc
import hashlib
import json
import time
from pathlib import Path

from benchmarks import measure
from benchmarks.training import NativeMemory
from mlx_lora.core.config import Config, GenerateConfig
from mlx_lora.data.formats import read_examples
from mlx_lora.data.render import ChatTokenizer

# Prefill and decode are separated by timing the same batch twice: once for 1 new token (prefill + one
# step) and once for N (no stop token, so every row makes exactly N). Then
#   prefill tok/s = prompt tokens / T(1),   decode tok/s = batch·(N−1) / (T(N) − T(1)).
# On a tiny model T(N) − T(1) is a few milliseconds, below this machine's noise (one run measured T(N) < T(1)),
# so the pair is repeated, interleaved, until MIN_PAIRS_S is spent, and each is its fastest repetition; and on,
# up to MAX_PAIRS, while the fastest T(N) is still not above the fastest T(1) (it was not, after 1 s, once beside
# two training jobs on the 2 cores). A real model's pair already takes longer than that: it runs once.
# Decode without a stop token times every row for N tokens, past where an answer ends: a fair kernel figure, but
# not the product's. A grounded answer copies its passage, which prompt lookup drafts, and then stops; after its
# end a row writes text no prompt predicts. So each task also answers the batch once with the stop tokens (what
# `eval` and `serve` do) and reports those answers' tokens per second, end to end.
METHOD = (
    "prefill = prompt tokens / T(1 new token); decode = batch·(N−1) / (T(N) − T(1)); no stop token; "
    "T = fastest of interleaved repetitions lasting ≥ 1 s together; answers = the tokens each row writes before "
    "its stop token (N at most) / the time the batch takes, prefill included, once"
)
MIN_PAIRS_S = 1.0
MAX_PAIRS = 50


def prompts(model_dir: Path, data_dir: Path, batch: int, adapter: Path | None = None) -> list[list[int]]:
    """The first `batch` test questions, rendered as generation prompts; with an adapter, with the system prompt
    its run was trained with (as `generate` and `serve` render them)."""
    tokenizer = ChatTokenizer.from_dir(model_dir)
    source = data_dir / "test.jsonl" if (data_dir / "test.jsonl").is_file() else data_dir / "valid.jsonl"
    examples = read_examples(source)[:batch]
    system_prompt = None
    if adapter is not None:
        from mlx_lora.backends.loading import adapter_location

        _, run = adapter_location(adapter)
        system_prompt = (run or {}).get("system_prompt")
    return [tokenizer.prompt_ids(e.prompt_messages(), system_prompt) for e in examples]


def _adapter_folder(adapter: Path | None) -> Path | None:
    from mlx_lora.backends.loading import adapter_location

    return adapter_location(adapter)[0] if adapter is not None else None


def _ours(backend_name: str, device: str, model_dir: Path, cfg: Config, precision: str, adapter: Path | None):
    from mlx_lora import backends

    if backend_name == "torch":
        cfg.backend.device = device
        if precision == "fp32":  # else a CUDA model loads in bf16 (model.dtype auto)
            cfg.model.dtype = "float32"
    backend = backends.get(backend_name)
    loaded = backend.load(model_dir, _adapter_folder(adapter), cfg)

    def run(batch: list[list[int]], new_tokens: int, stop_ids=()) -> list[list[int]]:
        gen = GenerateConfig(max_new_tokens=new_tokens, temperature=0.0, batch_size=len(batch), precision=precision)
        # Every timed call answers the same batch again: the torch backend's answer memory (prompt lookup drafts
        # from earlier answers) would draft it from its own previous copy. Each call starts without it.
        getattr(loaded, "extra", {}).pop("lookup_memory", None)
        return backend.generate(loaded, batch, gen, stop_ids=list(stop_ids))

    return run, loaded


def _hf(device: str, model_dir: Path, pad_id: int, precision: str, adapter: Path | None = None):
    """Plain transformers: AutoModelForCausalLM + generate (greedy, KV cache, left padding), as a user would; with
    an adapter, PEFT's PeftModel on top (the whole model in the task's precision, as ours generates)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from mlx_lora.backends.torch.cache import left_padded

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, trust_remote_code=False)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(_adapter_folder(adapter))).to(dtype)
    model.to(device).eval()

    @torch.no_grad()
    def run(batch: list[list[int]], new_tokens: int, stop_ids=()) -> list[list[int]]:
        ids, attention = left_padded(batch, pad_id, device)
        width = ids.shape[1]
        eos = list(stop_ids) or None
        config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad_id)
        out = model.generate(input_ids=ids, attention_mask=attention, generation_config=config)
        return [_before_stop(row, stop_ids) for row in out[:, width:].tolist()]

    return run, model


def _before_stop(tokens: list[int], stop_ids) -> list[int]:
    """A row's tokens before its first stop token (HF pads a finished row after it; ours returns none of them)."""
    stops = set(stop_ids)
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure_generation(
    engine: str,
    backend_name: str,
    device: str,
    model_dir: Path,
    data_dir: Path,
    cfg: Config,
    batch: int,
    new_tokens: int,
    pad_id: int,
    precision: str = "fp32",
    adapter: Path | None = None,
) -> dict:
    """One repetition in fp32 or bf16 weights, with or without a trained adapter: warm up, then T(1) and T(N) on
    the same batch of prompts."""
    batch_prompts = prompts(model_dir, data_dir, batch, adapter)
    native = NativeMemory(backend_name, device)
    measure.reset_peak_rss()
    native.reset()
    tic = time.perf_counter()
    if engine == "hf-generate":
        run, handle = _hf(device, model_dir, pad_id, precision, adapter)
    else:
        run, handle = _ours(backend_name, device, model_dir, cfg, precision, adapter)
    load_s = time.perf_counter() - tic
    run(batch_prompts, 2)  # warm-up: allocator, thread pools, lazy compilation
    _sync(device)
    t1, tn, spent, pairs = float("inf"), float("inf"), 0.0, 0
    while pairs < 1 or ((spent < MIN_PAIRS_S or tn <= t1) and pairs < MAX_PAIRS):
        tic = time.perf_counter()
        run(batch_prompts, 1)
        _sync(device)
        one = time.perf_counter() - tic
        tic = time.perf_counter()
        out = run(batch_prompts, new_tokens)
        _sync(device)
        many = time.perf_counter() - tic
        t1, tn, spent, pairs = min(t1, one), min(tn, many), spent + one + many, pairs + 1
    made = sum(len(o) for o in out)
    tic = time.perf_counter()
    answers = run(batch_prompts, new_tokens, ChatTokenizer.from_dir(model_dir).stop_ids())
    _sync(device)
    answer_s = time.perf_counter() - tic
    answer_tokens = sum(len(a) for a in answers)
    prompt_tokens = sum(len(p) for p in batch_prompts)
    row = {
        "precision": precision if backend_name == "torch" else None,  # MLX generates in the model's own dtype
        "adapter": str(adapter) if adapter is not None else None,
        "batch": len(batch_prompts),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "generated_tokens": made,
        "load_s": load_s,
        "t1_s": t1,
        "tn_s": tn,
        "timed_pairs": pairs,
        "prefill_tokens_per_s": prompt_tokens / t1,
        "decode_tokens_per_s": len(batch_prompts) * (new_tokens - 1) / (tn - t1) if tn > t1 else None,
        "outputs_sha": hashlib.sha256(json.dumps(out).encode()).hexdigest()[:16],
        "answer_s": answer_s,
        "answer_tokens": answer_tokens,
        "answer_tokens_per_s": answer_tokens / answer_s if answer_tokens else None,
        "answers_sha": hashlib.sha256(json.dumps(answers).encode()).hexdigest()[:16],
        "peak_rss_mb": measure.peak_rss_mb(),
        **native.read(),
    }
    del run, handle
    gc.collect()
    return row
