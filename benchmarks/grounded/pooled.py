"""Pooled figures over out-of-fold reports (fold.sh's /tmp/fr/NAME-fF/ev/report.json): each variant's mean
similarity, unanswerable and answerable questions refused, and the right doc, over every held row of the folds;
then, per guard of the decision layer, how often it overruled the model and who was right (the reports' guards).

    python benchmarks/grounded/pooled.py '/tmp/fr/base-f*/ev/report.json' '/tmp/fr/nm15-f*/ev/report.json'

Each pattern is one recipe; compare recipes on the same folds only.
"""

from __future__ import annotations

import glob
import json
import sys


def pooled(paths: list[str]) -> dict[str, dict]:
    rows: dict[str, list[dict]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for name, variant in json.load(f)["variants"].items():
                rows.setdefault(name, []).extend(variant["rows"])
    out = {}
    for name, found in rows.items():
        answerable = [r for r in found if r["answerable"]]
        unanswerable = [r for r in found if not r["answerable"]]
        out[name] = {
            "rows": len(found),
            "mean_similarity": round(sum(r["similarity"] for r in found) / len(found), 1),
            "unanswerable_refused": f"{sum(r['refused'] for r in unanswerable)}/{len(unanswerable)}",
            "answerable_refused": f"{sum(r['refused'] for r in answerable)}/{len(answerable)}",
            "right_doc": f"{sum(r['predicted_doc'] == r['expected_doc'] for r in answerable)}/{len(answerable)}",
        }
    return out


def guards(paths: list[str]) -> dict[str, dict]:
    """Per decided variant and guard: overruled, guard right where the model was wrong, model right where the guard
    was wrong, summed over the folds (the rest of the overrules changed nothing that scoring can tell)."""
    out: dict[str, dict] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            found = json.load(f)["meta"].get("guards") or {}
        for variant, by_guard in found.items():
            for guard, counts in by_guard.items():
                total = out.setdefault(variant, {}).setdefault(guard, dict.fromkeys(counts, 0))
                for key, value in counts.items():
                    total[key] = total.get(key, 0) + value
    return out


def show(paths: list[str]) -> None:
    """Print the pooled figures, then the guards' tally."""
    for name, figures in pooled(paths).items():
        print(f"  {name:<12} " + "  ".join(f"{k} {v}" for k, v in figures.items()))
    for variant, by_guard in guards(paths).items():
        for guard, counts in by_guard.items():
            print(f"  {variant} {guard}: " + "  ".join(f"{k} {v}" for k, v in counts.items()))


def main() -> None:
    for pattern in sys.argv[1:]:
        paths = sorted(glob.glob(pattern))
        print(f"{pattern}: {len(paths)} folds")
        show(paths)


if __name__ == "__main__":
    main()
