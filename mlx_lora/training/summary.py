"""The run's summary: metrics.jsonl read back, the curves plotted, and a health verdict a user can act on."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from mlx_lora.core.environment import main_process
from mlx_lora.core.files import replaced_dir, write_json

EXPLODING_GRAD = 10.0
VANISHING_GRAD = 0.1
PLOTS = ("loss.png", "lr.png", "grad_norm.png")


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(steps, evals, other events); a step or eval repeated by a resumed run keeps its latest record."""
    path = Path(run_dir) / "metrics.jsonl"
    steps: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    other: list[dict] = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
            if event.get("type") == "step":
                steps[event["step"]] = event
            elif event.get("type") == "eval":
                evals[event["step"]] = event
            else:
                other.append(event)
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)], other


def _finite(values):
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def health(steps: list[dict], evals: list[dict], schedule: dict | None = None) -> dict:
    """A verdict a user can act on, from the curves: overfitting, exploding/vanishing gradients, flat LR,
    loss not falling. `schedule` (the run's train config) silences the flat-LR flag for a constant schedule."""
    flags = []

    def flag(code: str, message: str) -> None:
        flags.append({"code": code, "message": message})

    losses = [e["eval_loss"] for e in evals]
    if losses:
        best_i = min(range(len(losses)), key=losses.__getitem__)
        after = losses[best_i + 1 :]
        if len(after) >= 2 and all(v > losses[best_i] for v in after):
            flag(
                "overfitting",
                f"eval loss rose for {len(after)} evals after its best ({losses[best_i]:.4f} at step "
                f"{evals[best_i]['step']} → {after[-1]:.4f}); the best adapter was kept — "
                "fewer epochs, a lower lr or more data would help",
            )
    norms = _finite(e.get("grad_norm") for e in steps)
    # Sustained, not a spike: with small batches a hard row lifts one step's norm above 10 now and then (batch 2 on
    # grounded rows: 3 of 120 steps, the loss still falling to 0.003), and clipping already bounds that step.
    late = norms[len(norms) - max(1, len(norms) // 4) :]
    if late and statistics.median(late) > EXPLODING_GRAD:
        flag(
            "exploding_gradients",
            f"grad-norm stayed above {EXPLODING_GRAD:g} (median {statistics.median(late):.1f} over the last quarter "
            f"of steps, peak {max(norms):.1f}); lower train.lr",
        )
    if norms and statistics.median(norms) < VANISHING_GRAD:
        flag(
            "vanishing_gradients",
            f"median grad-norm {statistics.median(norms):.3g} (< {VANISHING_GRAD:g}): "
            "the adapter barely learns; raise train.lr or lora.rank",
        )
    lrs = _finite(e.get("lr") for e in steps)
    constant = bool(schedule) and schedule.get("schedule") == "constant" and not schedule.get("warmup_steps")
    if len(lrs) >= 3 and (max(lrs) <= 0 or (max(lrs) - min(lrs) <= 1e-12 * max(lrs) and not constant)):
        flag(
            "flat_lr",
            f"the learning rate stayed at {lrs[0]:g} for all {len(lrs)} steps; check train.lr, "
            "train.warmup_steps and train.schedule",
        )
    train = _finite(e.get("loss") for e in steps)
    if len(train) >= 4:
        quarter = max(1, len(train) // 4)
        first, last = statistics.mean(train[:quarter]), statistics.mean(train[-quarter:])
        if last > first * 0.95:  # under a 5% drop from the first to the last quarter
            flag(
                "loss_not_falling",
                f"train loss went {first:.4f} → {last:.4f} (first vs last quarter of steps, "
                "< 5% lower); raise train.lr or train longer, and check the data",
            )
    return {"verdict": "healthy" if not flags else "check", "flags": flags}


def write_plots(run_dir: str | Path) -> list[str]:
    """loss.png (train vs eval), lr.png, grad_norm.png under run_dir/plots; returns the file names written."""
    steps, evals, _ = read_metrics(run_dir)
    if not steps:
        return []
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    x = [e["step"] for e in steps]
    panels = [
        (
            "loss.png",
            "loss",
            [
                ("train", x, [e["loss"] for e in steps], "-"),
                ("eval", [e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-"),
            ],
        ),
        ("lr.png", "learning rate", [("lr", x, [e["lr"] for e in steps], "-")]),
        ("grad_norm.png", "grad-norm (before clipping)", [("grad-norm", x, [e["grad_norm"] for e in steps], "-")]),
    ]
    # The three plots change together (one generation of run_dir/plots, see files.replaced_dir).
    with replaced_dir(Path(run_dir) / "plots") as out:
        for name, title, series in panels:
            _plot(plt, out / name, title, series)
    return [name for name, _, _ in panels]


def _plot(plt, path: Path, title: str, series) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, xs, ys, style in series:
        if xs:
            ax.plot(xs, ys, style, label=label, markersize=4)
    if path.name == "grad_norm.png":
        for level in (VANISHING_GRAD, EXPLODING_GRAD):
            ax.axhline(level, color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _train_config(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))["config"]["train"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None


def finish(run_dir: str | Path, outcome) -> dict:
    """Write plots and summary.json (outcome, curves' key figures, health verdict); return the summary."""
    if not main_process():
        return {}
    run_dir = Path(run_dir)
    steps, evals, other = read_metrics(run_dir)
    start = next((e for e in reversed(other) if e.get("type") == "start"), {})
    speeds = _finite(e.get("tokens_per_s") for e in steps)
    sup_speeds = _finite(e.get("supervised_tokens_per_s") for e in steps)
    norms = _finite(e.get("grad_norm") for e in steps)
    summary = {
        "stopped": outcome.stopped,
        "steps": outcome.steps,
        "total_steps": start.get("total_steps"),
        "best_eval_loss": outcome.best_eval_loss,
        "best_step": outcome.best_step,
        "elapsed_s": steps[-1]["elapsed_s"] if steps else None,
        "backend": start.get("backend"),
        "device": start.get("device"),
        "trainable_params": start.get("trainable_params"),
        "total_params": start.get("total_params"),
        "train_loss_first": steps[0]["loss"] if steps else None,
        "train_loss_last": steps[-1]["loss"] if steps else None,
        "eval_losses": [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in evals],
        "tokens_per_s": statistics.median(speeds) if speeds else None,  # medians over steps
        "supervised_tokens_per_s": statistics.median(sup_speeds) if sup_speeds else None,
        "grad_norm": {"median": statistics.median(norms), "max": max(norms)} if norms else None,
        "peak_memory_mb": max(_finite(e.get("memory_mb") for e in steps), default=None),
        # MLX: how often the compiled step was traced; every new batch shape costs one (they are bucketed)
        **({"compile_traces": outcome.extra["compile_traces"]} if "compile_traces" in outcome.extra else {}),
        **({"refusal_bias": outcome.extra["refusal_bias"]} if "refusal_bias" in outcome.extra else {}),
        "warnings": [e["message"] for e in other if e.get("type") == "warning"],
        "health": health(steps, evals, _train_config(run_dir)),
        "plots": [f"plots/{name}" for name in write_plots(run_dir)],
    }
    if outcome.stopped == "non_finite":
        summary["health"]["flags"].append(
            {
                "code": "non_finite",
                "message": "the loss became NaN/Inf; the run "
                "stopped and kept the last good checkpoint — lower train.lr",
            }
        )
        summary["health"]["verdict"] = "check"
    write_json(run_dir / "summary.json", summary)
    return summary
