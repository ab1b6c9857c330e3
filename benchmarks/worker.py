"""One benchmark process: runs a list of tasks (training, generation, matmul) and appends a JSON row per task.

Run as `python -m benchmarks.worker SPEC.json ROWS.jsonl`; the parent (benchmarks/run.py) chooses the process
environment (threads, LD_PRELOAD for OpenBLAS), so each BLAS setting and each isolated task gets its own process.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from benchmarks import roofline
from mlx_lora.core.config import Config, apply_mapping

VALID_ROWS = 32  # enough to compare losses after a few steps, ~5 s of forward passes on the 0.5B


class Context:
    """What the tasks of one process share: config, model, encoded training rows (read once)."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.model_dir = Path(spec["model_dir"])
        self.data_dir = Path(spec["data_dir"])
        self.threads = int(spec["threads"])
        self.model_config = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
        self.shape = roofline.model_shape(self.model_config)
        self._rows = None

    def cfg(self) -> Config:
        return apply_mapping(Config(), self.spec["config"], "benchmark spec")

    def rows(self):
        if self._rows is None:
            from mlx_lora.data.formats import encode_all, read_examples
            from mlx_lora.data.render import ChatTokenizer

            tokenizer = ChatTokenizer.from_dir(self.model_dir)
            self._rows, _ = encode_all(
                tokenizer, read_examples(self.data_dir / "train.jsonl"), self.cfg().train.max_length
            )
        return self._rows

    def valid_rows(self, n: int = VALID_ROWS):
        """The first n rows of valid.jsonl: the answer-only valid loss every torch implementation is held to."""
        from mlx_lora.data.formats import encode_all, read_examples
        from mlx_lora.data.render import ChatTokenizer

        path = self.data_dir / "valid.jsonl"
        if not path.is_file():
            return None
        rows, _ = encode_all(ChatTokenizer.from_dir(self.model_dir), read_examples(path), self.cfg().train.max_length)
        return rows[:n]

    def eos_id(self) -> int:
        from mlx_lora.data.render import ChatTokenizer

        return ChatTokenizer.from_dir(self.model_dir).token_id("<|im_end|>")

    def pad_id(self) -> int:
        pad = self.model_config.get("pad_token_id")
        eos = self.model_config.get("eos_token_id")
        return pad if isinstance(pad, int) else (eos[0] if isinstance(eos, list) else eos) or 0


def setup_frameworks(task: dict, threads: int) -> None:
    """Thread count for torch; the mlx device (cpu vs gpu) for mlx tasks."""
    if task.get("backend") == "torch" or task.get("framework") == "torch":
        import torch

        torch.set_num_threads(threads)
    if task.get("backend") == "mlx" or task.get("framework") == "mlx":
        import mlx.core as mx

        mx.set_default_device(mx.cpu if task.get("device") == "cpu" else mx.gpu)


def run_task(ctx: Context, task: dict) -> dict:
    from benchmarks import baselines, generation, training

    setup_frameworks(task, ctx.threads)
    suite, impl = task["suite"], task.get("impl")
    if suite == "roofline":
        if task["framework"] == "torch":
            return roofline.torch_matmul(
                task["n"], task["dtype"], task["threads"], task["reps"], task["budget_s"], task["device"]
            )
        return roofline.mlx_matmul(task["n"], task["dtype"], task["reps"], task["budget_s"])
    cfg = ctx.cfg()
    if suite == "generation":
        return generation.measure_generation(
            "hf-generate" if impl.startswith("hf-generate") else "ours",
            task["backend"],
            task["device"],
            ctx.model_dir,
            ctx.data_dir,
            cfg,
            task["batch"],
            task["new_tokens"],
            ctx.pad_id(),
            task.get("precision", "fp32"),
            Path(task["adapter"]) if task.get("adapter") else None,
        )
    steps, warmup = task["steps"], task["warmup"]
    precision = task.get("precision", "fp32")
    valid = ctx.valid_rows() if task["backend"] == "torch" else None
    if impl in ("ours", "ours-bf16"):
        cfg.train.precision = precision
        result = training.run_ours(
            task["backend"], task["device"], ctx.model_dir, ctx.rows(), cfg, steps, warmup, valid, ctx.eos_id()
        )
    elif impl.startswith("hf-trainer"):
        style = "tuned" if impl.startswith("hf-trainer-tuned") else "seed"
        result = baselines.hf_trainer(
            ctx.model_dir, ctx.rows(), cfg, steps, warmup, task["device"], ctx.eos_id(), style, precision, valid
        )
    elif impl == "mlx-lm":
        result = baselines.mlx_lm_lora(ctx.model_dir, ctx.data_dir, cfg, steps, warmup)
    else:
        raise ValueError(f"unknown training implementation {impl!r}")
    lora = {"rank": cfg.lora.rank, "targets": cfg.lora.targets, "num_layers": cfg.lora.num_layers}
    raw = result.pop("steps_raw")
    row = {**result, **training.summarize(raw, warmup, ctx.shape, lora)}
    # The machine's speed drifts with other users' load: take the matmul peak right here, in the same process
    # and minute as the steps it is compared with.
    if task["backend"] == "torch":  # the peak of the arithmetic the task used
        dtype = "bfloat16" if result.get("precision", precision) == "bf16" else "float32"
        threads = ctx.threads if task["device"] == "cpu" else None
        if task["device"] == "cpu" and "linears" in ctx.shape:
            peak = roofline.torch_model_matmul(ctx.shape, dtype, threads)
        else:
            peak = roofline.torch_matmul(2048, dtype, threads, 3, 1.5, task["device"])
    else:
        peak = roofline.mlx_matmul(2048, "float32", 3, 1.5)
    row["peak_matmul"] = {k: peak.get(k) for k in ("n", "shape", "dtype", "seconds_median", "flops_per_s")}
    if row.get("train_flops_per_s"):
        row["fraction_of_peak"] = row["train_flops_per_s"] / peak["flops_per_s"]
    return row


def main(argv: list[str]) -> int:
    spec_path, rows_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    ctx = Context(spec)
    failures = 0
    for task in spec["tasks"]:
        tic = time.perf_counter()
        row = {**spec["common"], **task, "pid": os.getpid()}
        try:
            row.update(run_task(ctx, task))
        except Exception as exc:  # one engine failing must not lose the others' rows
            failures += 1
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            traceback.print_exc(file=sys.stderr)
        row["wall_s"] = time.perf_counter() - tic
        with rows_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
