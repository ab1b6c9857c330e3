"""Decide the fold runs' held questions again from the answers their tuned models already gave, under other
decision-layer settings: no model is loaded and nothing is generated, so a guard setting costs seconds per fold.

    python benchmarks/grounded/redecide.py NAME FOLDS_DIR OUT [--folds 0,1,2,3,4] [--set rules.answer_floor=-1 ...]

NAME and FOLDS_DIR as for fold.sh (its runs are /tmp/fr/NAME-fF, their `eval` output ev/); the model's answers are
read from each run's ev/audit.jsonl (the tuned+rules variant records the answer it decided on). OUT/fold-F gets
each fold's report; the pooled figures and guard tallies are printed as pooled.py prints them. The --set options
go to the config `eval` builds (another KB needs its data.kb here too); with none, the figures are the runs' own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.grounded.pooled import show  # noqa: E402
from mlx_lora.commands.options import build_config  # noqa: E402
from mlx_lora.evaluation.run import evaluate_run  # noqa: E402

RUNS = Path("/tmp/fr")


def saved_answers(run: Path) -> list[str]:
    """The tuned model's answers to the run's held questions, in their order (doc-id citations)."""
    lines = (run / "ev" / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["model_answer"] for r in map(json.loads, lines) if r["variant"] == "tuned_rules"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("folds_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    cfg = build_config(None, ("rules.path=null", *args.overrides))
    reports = []
    for f in args.folds.split(","):
        run, fold = RUNS / f"{args.name}-f{f}", args.folds_dir / f"fold-{f}"
        out = args.out / f"fold-{f}"
        evaluate_run(
            cfg,
            None,
            run,
            fold / "held.jsonl",
            fold / "valid.jsonl",
            fold / "train.jsonl",
            cfg.data.kb,
            out,
            variants=("tuned", "tuned_rules"),
            rules_path=None,
            progress=False,
            answers={"tuned": saved_answers(run)},
        )
        reports.append(str(out / "report.json"))
    show(reports)


if __name__ == "__main__":
    main()
