"""The MLX backend's compiled training step against the same step run eagerly, on a real model, tracing excluded.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python benchmarks/mlx_compile.py --data runs/latest/data [--config configs/default.yaml] [--reps 5]
        [--groups 3] [--out FILE.json]

One process, one model, one LoRA and optimizer: the engine keeps both versions of its step (mx.compile'd and
plain) and alternates them, A B A B …, on the same fixed step groups (the config's batch size x grad_accum rows
each, the first rows of train.jsonl in length order, so each group has its own batch shape). Every group is
stepped once per version before timing: that is where tracing happens, and the trace counter is read before and
after the timed steps to show none happened inside them. Weights keep training across the steps (the work per
step does not depend on the values). Prints and writes per-version medians and ranges, the compiled / eager
ratio per repetition, threads, BLAS (LD_PRELOAD) and CPU flags.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlx_lora.core.environment import cpu_flags  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a built data folder (its train.jsonl)")
    parser.add_argument("--config", type=Path, default=REPO / "mlx_lora" / "samples" / "configs" / "default.yaml")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--groups", type=int, default=3, help="distinct step groups (batch shapes) cycled")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import mlx.core as mx

    from mlx_lora.backends.mlx import MLXBackend
    from mlx_lora.backends.mlx.engine import MLXEngine, compiled_step
    from mlx_lora.core.config_file import load_config
    from mlx_lora.core.model_store import local_model_dir
    from mlx_lora.data.fitting import fit_rows, prompt_length, with_lengths
    from mlx_lora.data.formats import encode_rows, read_examples
    from mlx_lora.data.render import ChatTokenizer

    mx.set_default_device(mx.cpu)
    cfg = load_config(args.config)
    model_dir = local_model_dir(cfg.model.path, cfg.model.cache_dir, True)
    tokenizer = ChatTokenizer.from_dir(model_dir)
    path = args.data / "train.jsonl"
    examples = read_examples(path)
    cfg = with_lengths(cfg, tokenizer, examples)
    examples, _ = fit_rows(examples, prompt_length(tokenizer), cfg.data, path, cfg.train.max_length)
    rows = [r for r in encode_rows(tokenizer, examples, cfg.train.max_length) if r.supervised > 0]
    rows.sort(key=lambda r: len(r.ids))
    per_batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    per_group = per_batch * accum
    # groups spread over the length range: short, middle and long rows give different batch shapes
    starts = [round(k * (len(rows) - per_group) / max(1, args.groups - 1)) for k in range(args.groups)]
    groups = [
        [rows[s + b * per_batch : s + (b + 1) * per_batch] for b in range(accum)] for s in starts
    ]  # fmt: skip

    engine = MLXEngine(MLXBackend().load(model_dir, None, cfg), cfg)
    versions = {"compiled": (engine._accumulate, engine._step)}
    _, plain_accumulate, plain_step = compiled_step(
        engine.model, engine.optimizer, engine.loss_sum, cfg.train.max_grad_norm, compile=False
    )
    versions["eager"] = (plain_accumulate, plain_step)  # counts its Python runs in a list of its own

    def use(version: str) -> None:
        engine._accumulate, engine._step = versions[version]

    step = 0
    for version in versions:  # warm-up: every group once per version (the compiled one traces here)
        use(version)
        for group in groups:
            engine.step(group, cfg.train.lr, step)
            step += 1
    traces_before = sum(engine.traces)
    times: dict[str, list[float]] = {v: [] for v in versions}
    for _ in range(args.reps):
        for version in versions:
            use(version)
            start = time.perf_counter()
            for group in groups:
                engine.step(group, cfg.train.lr, step)
                step += 1
            times[version].append((time.perf_counter() - start) / len(groups))
    traces_after = sum(engine.traces)

    ratios = [e / c for c, e in zip(times["compiled"], times["eager"])]
    result = {
        "model": str(cfg.model.path),
        "config": args.config.name,
        "rows_per_step": per_group,
        "group_tokens": [sum(len(r.ids) for b in g for r in b) for g in groups],
        "reps": args.reps,
        "seconds_per_step": {
            v: {"median": round(statistics.median(t), 3), "min": round(min(t), 3), "max": round(max(t), 3)}
            for v, t in times.items()
        },
        "compiled_speedup": {
            "median": round(statistics.median(ratios), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
        },
        # the compiled step's traces during warm-up (one per group and role at most); none may happen timed
        "traces_in_warmup": traces_before,
        "traces_in_timed_steps": traces_after - traces_before,
        "threads": os.cpu_count(),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": cpu_flags(),
        "mlx": mx.__version__,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
