"""Plot the grounded sweep (results.jsonl from sweep.sh): quality of the tuned model alone vs training rows seen."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROWS_PER_STEP = 8  # batch 4 x grad-accum 2


def main(results: Path, out: Path) -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "error" not in r and "tuned" in r and not r["extra"]]
    curves = defaultdict(list)
    for r in rows:
        curves[f"{r['data']}, first-token weight {r['weight']:g}"].append(r)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    metrics = [
        ("mean_similarity", "mean similarity (tuned alone)"),
        ("refusal_accuracy", "% unanswerable refused"),
        ("answerable_refused", "% answerable refused"),
    ]
    for ax, (key, title) in zip(axes, metrics):
        for label, points in sorted(curves.items()):
            points.sort(key=lambda r: r["steps"])
            if len(points) < 2:
                continue
            ax.plot([p["steps"] * ROWS_PER_STEP for p in points], [p["tuned"][key] for p in points], "o-", label=label)
        baseline = rows[0].get("retrieval", {}).get(key)
        if baseline is not None:
            ax.axhline(baseline, color="grey", linestyle="--", label="retrieval baseline")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training rows seen")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Grounded LoRA on the sample KB, valid split (64 rows), no hand-written rules")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
