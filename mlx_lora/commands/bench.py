"""`mlx-lora bench`: training and generation speed per backend against HF Trainer / mlx-lm / HF generate."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from mlx_lora.commands.options import build_config, config_option, set_option
from mlx_lora.core.errors import UserError


def _benchmarks(module: str = "run"):
    """The benchmarks package lives beside mlx_lora in a source checkout (it is not installed with the wheel)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / f"{module}.py").is_file():
        raise UserError("bench needs a source checkout of mlx-lora (benchmarks/ beside mlx_lora/)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"benchmarks.{module}")


def _steps(values: tuple[str, ...]) -> dict[str, int]:
    """`--steps 8 --steps mlx-cpu=1` → {"": 8, "mlx-cpu": 1}."""
    out: dict[str, int] = {}
    for value in values:
        engine, _, number = value.rpartition("=")
        if not number.isdigit() or int(number) < 1:
            raise UserError(f"--steps {value!r}: expected N or BACKEND=N with N >= 1, e.g. --steps mlx-cpu=1")
        out[engine] = int(number)
    return out


@click.command()
@config_option
@set_option
@click.option(
    "--quick",
    is_flag=True,
    help="Small, fast defaults (2 reps, 2 measured steps, 1 thread, tasks grouped per process).",
)
@click.option(
    "--backends",
    help="Comma list: torch-cpu, torch-cuda, torch-mps, mlx-metal, mlx-cpu, "
    "mlx-cpu+openblas, mlx-cuda (default: every one available here).",
)
@click.option(
    "--model",
    "model",
    default="tiny",
    show_default=True,
    help="tiny (random, built in code), embedded (Qwen2.5-Coder-0.5B) or an HF model folder.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Output folder (default benchmarks/results/<date>-<machine>-<model>[-quick]).",
)
@click.option("--data", type=click.Path(file_okay=False), help="Data folder (default: built from data/).")
@click.option(
    "--steps",
    multiple=True,
    metavar="N|BACKEND=N",
    help="Measured optimizer steps per repetition; "
    "BACKEND=N sets one backend's (and its baseline's), e.g. --steps mlx-cpu=1.",
)
@click.option("--warmup", type=int, help="Steps run first and dropped (default 1 quick, 2 full).")
@click.option("--reps", type=int, help="Repetitions, interleaved across engines (default 2 quick, 3 full).")
@click.option(
    "--threads",
    type=int,
    help="CPU threads for torch and BLAS (default: all cores; 1 with --quick, "
    "where torch's small ops are erratic with more threads on a busy machine).",
)
@click.option("--gen-batch", type=int, help="Prompts per generation batch (default 4 quick, 8 full).")
@click.option("--gen-tokens", type=int, help="New tokens per prompt (default 8 quick, 32 full).")
@click.option("--no-baselines", is_flag=True, help="Skip HF Trainer / mlx-lm / HF generate.")
@click.option("--no-training", is_flag=True)
@click.option("--no-generation", is_flag=True)
@click.option("--no-roofline", is_flag=True)
@click.option(
    "--isolate/--group",
    default=None,
    help="One process per task (clean peak memory; default) or one per backend (faster; default with --quick).",
)
@click.option(
    "--serve",
    "serve_load",
    is_flag=True,
    help="Load-test `mlx-lora serve` instead: concurrent openai clients on 127.0.0.1 (see --adapter, --clients).",
)
@click.option(
    "--adapter",
    type=click.Path(exists=True, file_okay=False),
    help="With --serve: the run to serve (default: a --model run trained 2 steps on the sample KB); otherwise the "
    "generation tasks load this run's adapter (ours, and HF generate through PEFT).",
)
@click.option("--clients", type=int, default=8, show_default=True, help="With --serve: concurrent clients.")
@click.option("--requests", type=int, default=64, show_default=True, help="With --serve: requests in the load test.")
@click.option(
    "--seconds", type=float, default=120.0, show_default=True, help="With --serve: time limit of the load test."
)
def bench(
    config_path,
    overrides,
    quick,
    backends,
    model,
    out,
    data,
    steps,
    warmup,
    reps,
    threads,
    gen_batch,
    gen_tokens,
    no_baselines,
    no_training,
    no_generation,
    no_roofline,
    isolate,
    serve_load,
    adapter,
    clients,
    requests,
    seconds,
):
    """Benchmark LoRA training and generation per backend; writes rows.jsonl, results.json, report.md, chart.png.

    Training uses the config's LoRA/train settings (reference defaults) on the same data for every engine.
    """
    if serve_load:
        if min(clients, requests) < 1 or seconds <= 0:
            raise UserError("--clients and --requests must be >= 1 and --seconds > 0")
        serve = _benchmarks("serve")
        cfg = build_config(config_path, overrides)
        settings = serve.ServeBench(
            Path(adapter) if adapter else None, model, clients, requests, seconds, out=Path(out) if out else None
        )
        click.echo(serve.report(serve.run_serve_bench(settings, cfg)))
        return
    run = _benchmarks()
    cfg = build_config(config_path, overrides, samples=False)
    for name, value in (
        ("--warmup", warmup),
        ("--reps", reps),
        ("--threads", threads),
        ("--gen-batch", gen_batch),
        ("--gen-tokens", gen_tokens),
    ):
        if value is not None and value < (0 if name == "--warmup" else 1):
            raise UserError(f"{name} must be >= {0 if name == '--warmup' else 1}, got {value}")
    if gen_tokens is not None and gen_tokens < 2:
        raise UserError("--gen-tokens must be >= 2 (decode speed needs more than the first token)")
    settings = run.Settings(
        model=model,
        quick=quick,
        baselines=not no_baselines,
        training=not no_training,
        generation=not no_generation,
        roofline=not no_roofline,
        reps=reps,
        warmup=warmup,
        steps=_steps(steps),
        gen_batch=gen_batch,
        gen_tokens=gen_tokens,
        threads=threads,
        isolate=isolate,
        out=Path(out) if out else None,
        data=Path(data) if data else None,
        adapter=Path(adapter) if adapter else None,
        backends=[b.strip() for b in backends.split(",") if b.strip()] if backends else None,
    )
    folder = run.run_bench(settings, cfg)
    click.echo(f"wrote {folder}/report.md, results.json, rows.jsonl, chart.png")
    click.echo((folder / "report.md").read_text(encoding="utf-8"))
