"""The main job: build data from the KB → train LoRA → evaluate base/tuned/tuned+rules/retrieval → report."""

from __future__ import annotations

import time
from pathlib import Path

import click

from mlx_lora.core.config import Config
from mlx_lora.core.files import write_json
from mlx_lora.training.card import write_model_card


def _stage(name: str) -> None:
    click.secho(f"\n== {name}", bold=True, err=True)


def run_pipeline(cfg: Config, progress: bool = True) -> dict:
    """Run every stage into cfg.train.out; returns the summary that is also written to run_summary.json."""
    from mlx_lora.core.errors import UserError
    from mlx_lora.core.model_store import local_model_dir
    from mlx_lora.data.dataset import build_data, format_stats, stats_warnings
    from mlx_lora.evaluation.run import evaluate_run
    from mlx_lora.training.loop import EXIT_CODES
    from mlx_lora.training.run import train_run

    run_dir = Path(cfg.train.out)
    if (run_dir / "adapter").exists():
        raise UserError(f"{run_dir}: already holds a run; pass --out with a new directory or delete it")
    _preflight(cfg)
    timings = {}
    started = time.perf_counter()

    _stage("1/4 data")
    cfg.data.dir = str(run_dir / "data")
    stats = build_data(cfg.data, cfg.eval.embedder)
    click.echo(format_stats(stats, cfg.data.dir))
    for warning in stats_warnings(stats):
        click.echo(warning, err=True)
    timings["data_s"] = time.perf_counter() - started

    _stage("2/4 model")
    t = time.perf_counter()
    # Prepares the embedded model once (join + verify + convert); cached after.
    local_model_dir(cfg.model.path, cfg.model.cache_dir, progress)
    timings["model_s"] = time.perf_counter() - t

    _stage("3/4 train")
    t = time.perf_counter()
    outcome = train_run(cfg, cfg.data.dir, run_dir, progress=progress)
    timings["train_s"] = time.perf_counter() - t
    if outcome.stopped in EXIT_CODES:  # an unfinished adapter is not worth evaluating
        error = UserError(
            outcome.extra.get("error")
            or f"training {outcome.stopped} at step {outcome.steps}; resume "
            f"it with `mlx-lora train --out {run_dir} --resume {run_dir}`, then `mlx-lora eval`"
        )
        error.exit_code = EXIT_CODES[outcome.stopped]
        raise error

    _stage("4/4 evaluate")
    t = time.perf_counter()
    data_dir = Path(cfg.data.dir)
    report = evaluate_run(
        cfg,
        None,
        run_dir,
        data_dir / "test.jsonl",
        data_dir / "valid.jsonl",
        data_dir / "train.jsonl",
        cfg.data.kb,
        run_dir / "eval",
        progress=progress,
    )
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    summary = {
        "run_dir": str(run_dir),
        "variants": report["summary"],
        "train": {
            "steps": outcome.steps,
            "stopped": outcome.stopped,
            "best_eval_loss": outcome.best_eval_loss,
            **_train_figures(run_dir),
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    write_json(run_dir / "run_summary.json", summary)
    write_model_card(run_dir)
    print_summary(summary)
    return summary


def _preflight(cfg: Config) -> None:
    """What the later stages would reject, checked before minutes of training: backend, KB, rules, embedder."""
    from mlx_lora import backends as backend
    from mlx_lora.answer.rules import load_rules
    from mlx_lora.data.kb import load_kb
    from mlx_lora.data.similarity import make_scorer

    backend.resolve(cfg.backend.name)
    kb = load_kb(cfg.data.kb)
    if cfg.rules.path and Path(cfg.rules.path).is_file():
        load_rules(cfg.rules.path, kb)
    if cfg.eval.embedder not in ("use", "char"):  # a user-chosen model: load it once now rather than fail at eval
        make_scorer(cfg.eval.embedder)


def _train_figures(run_dir: Path) -> dict:
    import json

    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return {}
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    return {
        k: summary[k] for k in ("tokens_per_s", "supervised_tokens_per_s", "health", "refusal_bias") if k in summary
    }


def print_summary(summary: dict) -> None:
    click.secho("\n== summary", bold=True)
    keys = ("mean_similarity", "refusal_accuracy", "answerable_refused", "topic_accuracy", "model_carried")
    widths = (12, 13, 12, 8, 14)
    heads = ("similarity %", "refusals ok %", "ans. refused", "topic %", "model carried")
    click.echo(f"{'variant':<12} " + " ".join(f"{h:>{w}}" for h, w in zip(heads, widths)))
    for name, row in summary["variants"].items():
        cells = [row.get(k) for k in keys]
        click.echo(
            f"{name:<12} "
            + " ".join(f"{c:>{w}.1f}" if isinstance(c, (int, float)) else f"{'-':>{w}}" for c, w in zip(cells, widths))
        )
    train = summary["train"]
    speed = train.get("tokens_per_s")
    best = train.get("best_eval_loss")
    click.echo(
        f"train: {train['steps']} steps ({train['stopped']})"
        + (f", best valid loss {best:.4f}" if isinstance(best, (int, float)) else ", no valid loss")
        + (f", {speed:.0f} tok/s" if isinstance(speed, (int, float)) else "")
    )
    if train.get("refusal_bias"):
        from mlx_lora.training.refusal_bias import describe_bias

        click.echo(f"refusal bias: {describe_bias(train['refusal_bias'])}")
    t = summary["timings_s"]
    click.echo(
        f"time: {t['total_s']:.0f} s (model {t['model_s']:.0f}, train {t['train_s']:.0f}, eval {t['eval_s']:.0f})"
    )
    click.echo(f"report: {summary['run_dir']}/eval/report.md")
