"""Seconds per optimizer step: our torch loop vs a seed-style HF Trainer (pad to 192, every-token loss), same rows.

    python benchmarks/train_vs_trainer.py --model ~/.cache/mlx-lora/hf/<model> --data DIR --threads 2 1

Runs A B A B … per thread count (the machines are noisy) and prints medians; `--autocast` adds our loop under
bf16 autocast, `--no-sharing` our loop without the shared-prefix pass,
`--compile` our loop under torch.compile. Batch 4, grad-accum 1, r 16 on q/k/v/o, the first --rows rows of
DIR/train.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from mlx_lora.backends.torch import lora
from mlx_lora.backends.torch.engine import TorchEngine
from mlx_lora.backends.torch.model import load
from mlx_lora.core.config import Config
from mlx_lora.data.batching import epoch_batches
from mlx_lora.data.formats import encode_all, read_examples
from mlx_lora.data.render import ChatTokenizer


class Autocast(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(*args)


def ours(base, rows, cfg, steps, autocast=False, share_prefix=True, compile=False):
    """Times of `steps` optimizer steps of our engine (after one warm-up step; three when compiling)."""
    from mlx_lora.backends.torch.model import Loaded
    from mlx_lora.training.schedule import lr_at

    loaded = Loaded(base, torch.device("cpu"), torch.float32, "bench", pad_id=0)
    engine = TorchEngine(loaded, cfg)  # seeds torch and attaches LoRA as training does
    model = engine.model
    engine.loss_fn.share_prefix = share_prefix
    if autocast:
        engine.wrapped = Autocast(engine.wrapped)
    warmup = 1
    if compile:  # inductor, dynamic shapes (every batch pads to its own length); the KV-cache prefix pass is off
        engine.loss_fn.share_prefix = False
        engine.wrapped = torch.compile(engine.wrapped, dynamic=True)
        warmup = 3
    batches = epoch_batches(rows, cfg.train.batch_size, cfg.train.seed, 0)
    times, losses, tokens = [], [], []
    t = cfg.train
    for i in range(steps + warmup):
        lr = lr_at(i, t.lr, t.warmup_steps, steps + warmup, t.schedule)
        tick = time.perf_counter()
        result = engine.step([[rows[j] for j in batches[(i - warmup + 1) % len(batches)]]], lr, i)
        if i >= warmup:
            times.append(time.perf_counter() - tick)
            tokens.append(result.tokens)
        losses.append(result.loss)
    return times, tokens, losses, model.unload()


def seed_trainer(base, tokenizer, examples, cfg, steps):
    """The seed's recipe: ChatML text padded to 192, LM collator (labels = input ids, pad → -100), HF Trainer."""
    from peft import get_peft_model
    from transformers import Trainer as HFTrainer
    from transformers import TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(base, lora.peft_config(cfg.lora, base))
    pad = tokenizer.token_id("<|endoftext|>")
    data = []
    for example in examples:
        ids = tokenizer.encode(tokenizer.apply_chat_template(example.messages))[:192]
        data.append(
            {
                "input_ids": ids + [pad] * (192 - len(ids)),
                "attention_mask": [1] * len(ids) + [0] * (192 - len(ids)),
                "labels": ids + [-100] * (192 - len(ids)),
            }
        )
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.tick = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.tick)

    args = TrainingArguments(
        output_dir="/tmp/bench-hf",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=steps + 1,
        learning_rate=cfg.train.lr,
        warmup_steps=0,
        weight_decay=0.01,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    HFTrainer(model=model, args=args, train_dataset=data, callbacks=[Clock()]).train()
    real_tokens = [
        sum(sum(data[(i * 4 + k) % len(data)]["attention_mask"]) for k in range(4)) for i in range(1, steps + 1)
    ]
    return times[1:], real_tokens, model.unload()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per block (one warm-up step more)")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds per thread count")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--autocast", action="store_true", help="also time our loop under bf16 autocast")
    parser.add_argument("--skip-trainer", action="store_true")
    parser.add_argument("--no-sharing", action="store_true", help="also time our loop without the shared-prefix pass")
    parser.add_argument(
        "--compile", action="store_true", help="also time our loop under torch.compile (needs a C++ compiler)"
    )
    parser.add_argument("--only-ours", action="store_true", help="skip our default loop (time only the extra variants)")
    args = parser.parse_args()

    cfg = Config()
    cfg.train.batch_size, cfg.train.grad_accum, cfg.train.max_length = 4, 1, 192
    cfg.lora.dropout = 0.05
    tokenizer = ChatTokenizer.from_dir(args.model)
    examples = read_examples(Path(args.data) / "train.jsonl")[: args.rows]
    rows, _ = encode_all(tokenizer, examples, 192)
    base = load(args.model, None, cfg).model
    results = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for _ in range(args.rounds):
            variants = [] if args.only_ours else [("ours", partial(ours, base, rows, cfg, args.steps))]
            if args.compile:
                variants.append(("ours_compiled", partial(ours, base, rows, cfg, args.steps, compile=True)))
            if args.no_sharing:
                variants.append(
                    ("ours_no_prefix_sharing", partial(ours, base, rows, cfg, args.steps, share_prefix=False))
                )
            if args.autocast:
                variants.append(("ours_bf16_autocast", partial(ours, base, rows, cfg, args.steps, autocast=True)))
            if not args.skip_trainer:
                variants.append(
                    ("hf_trainer_pad192", partial(seed_trainer, base, tokenizer, examples, cfg, args.steps))
                )
            for name, fn in variants:
                out = fn()
                times, tokens, base = out[0], out[1], out[-1]
                entry = results.setdefault(f"{name}@{threads}t", {"times": [], "tokens": [], "losses": []})
                entry["times"] += times
                entry["tokens"] += tokens
                if name.startswith("ours"):
                    entry["losses"].append(out[2])
                print(f"{name} threads={threads}: " + " ".join(f"{t:.2f}s" for t in times), flush=True)
    report = {}
    for key, entry in results.items():
        step = statistics.median(entry["times"])
        report[key] = {
            "s_per_step": round(step, 3),
            "samples_per_s": round(4 / step, 3),
            "real_tokens_per_s": round(sum(entry["tokens"]) / sum(entry["times"]), 1),
            "first_losses": [round(x, 4) for x in entry["losses"][0]] if entry["losses"] else None,
        }
    for threads in args.threads:
        a, b = report.get(f"ours@{threads}t"), report.get(f"hf_trainer_pad192@{threads}t")
        if a and b:
            report[f"speedup@{threads}t"] = round(b["s_per_step"] / a["s_per_step"], 2)
        d = report.get(f"ours_no_prefix_sharing@{threads}t")
        if a and d:
            report[f"prefix_sharing_speedup@{threads}t"] = round(d["s_per_step"] / a["s_per_step"], 2)
        e = report.get(f"ours_compiled@{threads}t")
        if d and e:
            report[f"compile_vs_no_sharing@{threads}t"] = round(d["s_per_step"] / e["s_per_step"], 2)
        c = report.get(f"ours_bf16_autocast@{threads}t")
        if a and c:
            report[f"autocast_speedup@{threads}t"] = round(a["s_per_step"] / c["s_per_step"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
