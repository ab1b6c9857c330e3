"""Prompt-lookup decoding against the plain greedy loop (torch), on a model with or without an adapter.

    python benchmarks/lookup.py --data runs/latest/data/valid.jsonl [--adapter runs/latest | none]
        [--batches 1,8] [--drafts 4,8,16] [--budgets 40] [--memory] [--reps 2] [--precision bf16]
        [--answerable-only]

Per batch size, the first rows of the data file are answered (100 new tokens at most) by the plain loop and by
prompt lookup at each draft size, in turn (plain, 4, 8, 16, plain, 4, …); prints the median seconds and their
range, the forward passes of the first repetition, the tokens, and how many rows came out identical to the plain
loop's. With several --budgets (lookup.STEP_BUDGET: tokens one pass may check, all rows together), each draft size
runs at each budget in the same rotation. With --memory, each also runs with an AnswerMemory holding the answers
to the next 8 rows of the file (answered once, untimed, as earlier requests would have been). 2 threads.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--adapter", default="runs/latest", help="a run folder, or none for the base model")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--drafts", default="4,8,16")
    parser.add_argument("--budgets", default="", help="STEP_BUDGET values to compare (default: the shipped one)")
    parser.add_argument("--memory", action="store_true", help="also draft from earlier answers (AnswerMemory)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--answerable-only", action="store_true", help="skip rows whose answer is the refusal")
    args = parser.parse_args()

    import functools

    import torch

    from mlx_lora.backends.loading import load_for_generation
    from mlx_lora.backends.torch import lookup as lookup_module
    from mlx_lora.backends.torch.generate import generate_batch as plain
    from mlx_lora.backends.torch.lookup import generate_batch as lookup
    from mlx_lora.backends.torch.precision import for_generation
    from mlx_lora.core.config import Config, GenerateConfig
    from mlx_lora.core.model_store import default_cache_dir
    from mlx_lora.data.formats import read_examples

    torch.set_num_threads(2)
    batches = [int(x) for x in args.batches.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")] if args.budgets else [lookup_module.STEP_BUDGET]
    remembered = (False, True) if args.memory else (False,)
    drafts = [(k, b, m) for k in (int(x) for x in args.drafts.split(",")) for b in budgets for m in remembered]
    cfg = Config()
    cfg.generate = GenerateConfig(max_new_tokens=100, precision=args.precision)
    adapter = None if args.adapter == "none" else args.adapter
    _, loaded, tok, system_prompt = load_for_generation(None, adapter, cfg, progress=False)
    for_generation(loaded, args.precision, default_cache_dir())
    rows = [r for r in read_examples(args.data) if r.meta.get("answerable") or not args.answerable_only]
    prompts = [tok.prompt_ids(r.prompt_messages(), system_prompt or cfg.data.system_prompt) for r in rows]
    model, stops, passes = loaded.model, tok.stop_ids(), [0]
    model.eval()
    forward = model.forward
    model.forward = functools.wraps(forward)(lambda *a, **kw: passes.__setitem__(0, passes[0] + 1) or forward(*a, **kw))
    for size in batches:
        batch, runs = prompts[:size], {}
        memory = lookup_module.AnswerMemory()
        if args.memory:  # earlier requests: the next 8 rows of the file, answered once
            earlier = prompts[size : size + 8]
            memory.add(plain(model, earlier, cfg.generate, stops, loaded.pad_id, loaded.device), 100, stops[0])
        for _ in range(args.reps):
            for k, budget, remember in [(0, None, False), *drafts]:
                passes[0] = 0
                lookup_module.STEP_BUDGET = budget or lookup_module.STEP_BUDGET
                start = time.perf_counter()
                if k:
                    got = memory if remember else None
                    out = lookup(model, batch, 100, k, stops, loaded.pad_id, loaded.device, memory=got)
                else:
                    out = plain(model, batch, cfg.generate, stops, loaded.pad_id, loaded.device)
                runs.setdefault((k, budget, remember), []).append((time.perf_counter() - start, passes[0], out))
        base = runs[0, None, False][0][2]
        for (k, budget, remember), got in runs.items():
            seconds = [s for s, _, _ in got]
            same = sum(a == b for a, b in zip(got[0][2], base))
            name = "plain" if k == 0 else f"lookup {k:2d} budget {budget}{' + memory' if remember else ''}"
            print(
                f"batch {size} {name}: {statistics.median(seconds):6.2f} s "
                f"({min(seconds):.2f}-{max(seconds):.2f}), {got[0][1]} passes, {sum(map(len, got[0][2]))} tokens, "
                f"{same}/{size} as plain",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
