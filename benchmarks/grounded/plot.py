"""Plot the grounded sweep (results.jsonl from sweep.sh): quality of the tuned model alone vs training rows seen.

    python plot.py sweep.jsonl out.png [cpu.jsonl]

The optional third file holds the 2-core CPU runs (one.sh lines with their --set overrides), drawn per step size.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROWS_PER_STEP = 8  # batch 4 x grad-accum 2

# --set overrides in a CPU run's extra arguments that make it a variant of the main job's recipe, and their labels
VARIANTS = (
    ("lora.targets", ", all linear layers"),
    ("first_tokens=2", ", 2 tokens weighted"),
    ("lora.dropout=0", ", no LoRA dropout"),
)


def _setting(extra: str, key: str, default: int) -> int:
    """A --set train.KEY=N override in a run's extra arguments, else the sweep's fixed value."""
    for part in extra.split():
        if part.startswith(f"train.{key}="):
            return int(part.split("=", 1)[1])
    return default


def _read(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "error" not in r and "tuned" in r]


def main(results: Path, out: Path, cpu: Path | None = None) -> None:
    rows = [r for r in _read(results) if not r["extra"]]
    curves = defaultdict(list)
    for r in rows:
        r["rows_per_step"] = ROWS_PER_STEP
        curves[f"{r['data']}, first-token weight {r['weight']:g}"].append(r)
    for r in _read(cpu) if cpu else []:
        r["rows_per_step"] = _setting(r["extra"], "batch_size", 4) * _setting(r["extra"], "grad_accum", 2)
        # one curve per data folder, step size, seed and recipe variant: the same settings at different lengths
        variant = "".join(label for marker, label in VARIANTS if marker in r["extra"])
        seed = _setting(r["extra"], "seed", 42)
        curves[f"2 CPU cores, {r['data']}, {r['rows_per_step']} rows a step, seed {seed}{variant}"].append(r)
    fig, axes = plt.subplots(1, 3, figsize=(15, 6.8))
    metrics = [
        ("mean_similarity", "mean similarity (tuned alone)"),
        ("refusal_accuracy", "% unanswerable refused"),
        ("answerable_refused", "% answerable refused"),
    ]
    for ax, (key, title) in zip(axes, metrics):
        for label, points in sorted(curves.items()):
            points.sort(key=lambda r: r["steps"])
            if len(points) < 2 and not label.startswith("2 CPU"):
                continue
            xs = [p["steps"] * p["rows_per_step"] for p in points]
            ax.plot(xs, [p["tuned"][key] for p in points], "s--" if label.startswith("2 CPU") else "o-", label=label)
        baseline = rows[0].get("retrieval", {}).get(key)
        if baseline is not None:
            ax.axhline(baseline, color="grey", linestyle="--", label="retrieval baseline")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training rows seen")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()  # one legend under the panels: it would hide a curve
    fig.suptitle("Grounded LoRA on the sample KB, valid split (64 rows), no hand-written rules")
    fig.tight_layout(rect=(0, 0.34, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
