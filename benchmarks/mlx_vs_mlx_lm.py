"""Our MLX backend (`mlx_lora.training.run.train_run`) against mlx-lm's own `lora` path, on the same job.

Same tiny random Qwen2, same chat data, batch, rank, LoRA keys, layers and number of optimizer steps. Every run
is a fresh subprocess; ours and mlx-lm alternate (A B A B …) and ratios are medians over the repeats.

Three figures per run:
- train_s: the training loop alone. Ours: `elapsed_s` of the last step event (everything from the start of
  train() to the end of the last step: batching, events, metrics.jsonl, progress). mlx-lm: the iterations/s its
  trainer reports at the last step (`python -m mlx_lm lora`'s code path — load, load_dataset, train_model — run
  in-process so a TrainingCallback can read it). Its timer covers only the compiled step and its eval: batch
  building, its progress bar and callbacks fall outside it.
- loop_s: the same scope on both sides. Ours: train_s. mlx-lm: wall clock from the end of its step-1 eval to
  its last step's report, less the eval it runs before the last step.
- wall_s: the whole subprocess (imports, model load, eval, saving; ours also writes plots and a manifest).
A word-level tokenizer with one token per word makes every row 32 tokens, so mlx-lm's padding to 32·k+1
columns adds a single column; `--full-logits` makes ours compute logits at every position as mlx-lm does
(by default ours computes them only where the loss is taken). Like mlx-lm, ours compiles its step with
mx.compile and pads batches to a multiple of 32 columns (its loss positions too, with zero weights).

`--baseline DIR` also times our backend from another source tree (e.g. `git archive HEAD | tar -x -C DIR`),
interleaved A B C A B C, so a change to our loop is measured against its previous version in the same run.

    .venv/bin/python benchmarks/mlx_vs_mlx_lm.py      # ~2-3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [f"w{i}" for i in range(200)]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FIGURES = ("train_s", "loop_s", "wall_s")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL + ["user", "assistant", "system"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(SPECIAL)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "model_max_length": 4096,
            }
        )
    )
    (folder / "chat_template.jinja").write_text(CHATML)
    return len(vocab)


def build_model(folder: Path, hidden: int, layers: int) -> None:
    import mlx.core as mx
    from mlx_lm.models import qwen2
    from mlx_lm.utils import save_model

    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder)
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": 64 * (vocab // 64 + 1),
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "eos_token_id": SPECIAL.index("<|im_end|>"),
        "dtype": "float32",
    }
    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(folder, model)
    (folder / "config.json").write_text(json.dumps(config))


def build_data(folder: Path, rows: int, q_words: int, a_words: int) -> None:
    """Rows of exactly the same token count: 4 template tokens + question + answer + 2 end markers."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", rows), ("valid", 4)):
        with (folder / f"{name}.jsonl").open("w") as handle:
            for _ in range(n):
                question = " ".join(rng.choices(WORDS, k=q_words))
                answer = " ".join(rng.choices(WORDS, k=a_words))
                handle.write(
                    json.dumps(
                        {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
                    )
                    + "\n"
                )


def ours(args, steps: int, run_dir: Path) -> None:
    """Worker: our product path (manifest, listeners, metrics.jsonl, plots) with the MLX backend."""
    from mlx_lora.core.config import Config
    from mlx_lora.training.run import train_run

    if args.full_logits:
        from mlx_lora.backends.mlx import engine as trainer

        trainer.split_head = lambda model: None
    cfg = Config()
    cfg.model.path = str(args.work / "model")
    cfg.backend.name = "mlx"
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = args.rank, 2.0 * args.rank, 0.0
    cfg.data.system_prompt = None
    t = cfg.train
    t.batch_size, t.grad_accum, t.max_steps, t.epochs = args.batch, 1, steps, 10_000
    t.lr, t.warmup_steps, t.schedule, t.max_length = 1e-4, 0, "constant", 512
    t.eval_every = 10_000_000  # one eval, at the last step (mlx-lm evaluates at steps 1 and N)
    train_run(cfg, args.work / "data", run_dir, progress=False)


def theirs(args, steps: int, run_dir: Path) -> dict:
    """Worker: mlx-lm's `lora` command path (mlx_lm.lora.run minus its argument parsing) with a timing callback."""
    import types

    from mlx_lm import lora
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.utils import load

    class Timer(TrainingCallback):
        start, val_s = None, 0.0

        def on_val_loss_report(self, info):
            if self.start is None:  # the step-1 eval has just ended: the loop proper starts
                self.start = time.perf_counter()
            else:
                self.val_s += info["val_time"]

        def on_train_loss_report(self, info):
            self.train_s = info["iteration"] / info["iterations_per_second"]
            self.loop_s = time.perf_counter() - self.start - self.val_s

    cli = [
        "--model",
        str(args.work / "model"),
        "--train",
        "--data",
        str(args.work / "data"),
        "--iters",
        str(steps),
        "--batch-size",
        str(args.batch),
        "--num-layers",
        "-1",
        "--mask-prompt",
        "--learning-rate",
        "1e-4",
        "--optimizer",
        "adamw",
        "--val-batches",
        "1",
        "--steps-per-eval",
        "10000000",
        "--steps-per-report",
        str(steps),
        "--save-every",
        "10000000",
        "--adapter-path",
        str(run_dir),
    ]
    values = vars(lora.build_parser().parse_args(cli))
    values["lora_parameters"] = {
        "rank": args.rank,
        "scale": 2.0,
        "dropout": 0.0,
        "keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    }
    for key, value in lora.CONFIG_DEFAULTS.items():  # as mlx_lm.lora.main() fills unspecified options
        if values.get(key) is None:
            values[key] = value
    namespace = types.SimpleNamespace(**values)
    model, tokenizer = load(namespace.model)
    train_set, valid_set, _ = load_dataset(namespace, tokenizer)
    timer = Timer()
    lora.train_model(namespace, model, train_set, valid_set, timer)
    return {"train_s": timer.train_s, "loop_s": timer.loop_s}


def ours_train_s(run_dir: Path) -> dict:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = [e for e in events if e["type"] == "step"][-1]["elapsed_s"]
    return {"train_s": elapsed, "loop_s": elapsed}


def worker(args) -> None:
    kind, steps = args.worker.split(":")
    run_dir = args.out
    if kind == "ours":
        ours(args, int(steps), run_dir)
        result = ours_train_s(run_dir)
    else:
        result = theirs(args, int(steps), run_dir)
    (run_dir.parent / f"{run_dir.name}.json").write_text(json.dumps(result))


def timed(cmd: list[str], env: dict, result_file: Path) -> dict:
    tic = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - tic
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd[:6])} …\n{done.stderr[-2000:]}")
    return {**json.loads(result_file.read_text()), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--full-logits", action="store_true", help="ours: logits at every position, as mlx-lm")
    parser.add_argument("--baseline", type=Path, default=None, help="also time ours from this source tree")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args)

    args.work = args.work or Path(tempfile.mkdtemp(prefix="bench-mlx-"))
    build_model(args.work / "model", args.hidden, args.layers)
    build_data(args.work / "data", args.rows, q_words=10, a_words=16)  # 32 tokens a row
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    tools = ["ours", "mlx-lm"] + (["baseline"] if args.baseline else [])
    runs = {tool: [] for tool in tools}
    for repeat in range(args.repeats):
        for tool in tools:  # A B A B … (A B C with a baseline)
            run = args.work / f"{tool}-{repeat}"
            kind = "theirs" if tool == "mlx-lm" else "ours"
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                f"{kind}:{args.steps}",
                "--work",
                str(args.work),
                "--out",
                str(run),
                "--rank",
                str(args.rank),
                "--batch",
                str(args.batch),
            ]
            cmd += ["--full-logits"] if args.full_logits else []
            # The baseline's mlx_lora comes first on the path (the editable install's finder comes after it).
            extra = {"PYTHONPATH": str(args.baseline.resolve())} if tool == "baseline" else {}
            runs[tool].append(timed(cmd, {**env, **extra}, run.parent / f"{run.name}.json"))
        line = "; ".join(
            f"{tool} train {runs[tool][-1]['train_s']:.2f}s loop {runs[tool][-1]['loop_s']:.2f}s "
            f"wall {runs[tool][-1]['wall_s']:.1f}s"
            for tool in tools
        )
        print(f"repeat {repeat + 1}: {line}", file=sys.stderr)

    def ratios(a: str, b: str) -> dict:
        return {k: [x[k] / y[k] for x, y in zip(runs[a], runs[b])] for k in FIGURES}

    pairs = {"ours_over_mlx_lm": ratios("ours", "mlx-lm")}
    if args.baseline:
        pairs.update(baseline_over_mlx_lm=ratios("baseline", "mlx-lm"), ours_over_baseline=ratios("ours", "baseline"))
    result = {
        "job": {
            "hidden": args.hidden,
            "layers": args.layers,
            "rank": args.rank,
            "batch": args.batch,
            "tokens_per_row": 32,
            "rows": args.rows,
            "steps": args.steps,
            "full_logits": args.full_logits,
        },
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "baseline": str(args.baseline) if args.baseline else None,
        "median_s": {tool: {k: statistics.median(r[k] for r in rs) for k in FIGURES} for tool, rs in runs.items()},
        "median_ratio": {name: {k: statistics.median(v) for k, v in r.items()} for name, r in pairs.items()},
        "ratios": pairs,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
