"""Docs added after training: train with some KB docs held out, then add them to the KB (no retraining) and score
their questions — the tuned model alone and with the route + answerability check, grounded vs closed-book.

    python benchmarks/docs_added.py --out runs/docs-added [--held 4] [--steps N] [--modes grounded,closed_book]
        [--config configs/default.yaml] [--set train.precision=bf16 ...]

Both modes train with --config (default: the main job's, grounded) and `data.mode` set per mode.

The held-out docs are a seeded sample of the KB. Training sees neither their passages nor any question about them;
at scoring time the KB holds every doc, so the passage index and the route are rebuilt from it, and the questions
are every phrasing of the held-out docs in the question bank (none of them was trained on). Unanswerable questions
of the valid split ride along, so a model that answers everything cannot look good. Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "mlx_lora" / "samples"


def cli(*args: str) -> None:
    """One mlx-lora command; its output goes to the terminal, a failure stops the benchmark."""
    subprocess.run([sys.executable, "-m", "mlx_lora", *args], check=True)


def held_out_kb(kb_path: Path, questions_path: Path, held: int, seed: int, out: Path) -> list[str]:
    """Write OUT/kb.jsonl and OUT/questions.yaml without `held` seeded docs; return the held doc ids."""
    rows = [json.loads(line) for line in kb_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    docs = random.Random(seed).sample(sorted(r["doc_id"] for r in rows), held)
    out.mkdir(parents=True, exist_ok=True)
    kept = [r for r in rows if r["doc_id"] not in docs]
    (out / "kb.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    bank = yaml.safe_load(questions_path.read_text(encoding="utf-8"))
    bank["docs"] = {d: v for d, v in bank["docs"].items() if d not in docs}
    (out / "questions.yaml").write_text(yaml.safe_dump(bank, allow_unicode=True), encoding="utf-8")
    return docs


def question(line: str) -> str:
    """A built row's question: grounded rows keep it in meta, closed-book rows are the last user turn."""
    row = json.loads(line)
    return row["meta"].get("question") or [m for m in row["messages"] if m["role"] == "user"][-1]["content"]


def added_rows(full_data: Path, docs: list[str], trained: Path, out: Path) -> dict:
    """OUT/added.jsonl: every row about a held-out doc (all splits) plus valid's unanswerable rows, less any
    question the training rows hold."""
    seen = {question(line) for line in trained.read_text(encoding="utf-8").splitlines()}
    rows, counts = [], {"answerable": 0, "unanswerable": 0}
    for split in ("train", "valid", "test"):
        for line in (full_data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            meta = json.loads(line)["meta"]
            if question(line) in seen:
                continue
            if meta.get("doc_id") in docs or (split == "valid" and not meta.get("answerable")):
                rows.append(line)
                counts["answerable" if meta.get("answerable") else "unanswerable"] += 1
    out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--held", type=int, default=4, help="docs held out of training")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--steps", type=int, help="training steps (default: the config's train.max_steps)")
    parser.add_argument("--config", type=Path, default=SAMPLES / "configs" / "default.yaml")
    parser.add_argument("--modes", default="grounded,closed_book")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()
    kb, questions = SAMPLES / "data" / "kb.jsonl", SAMPLES / "data" / "questions.yaml"
    out = args.out
    docs = held_out_kb(kb, questions, args.held, args.seed, out / "reduced")
    extra = [f"--set={o}" for o in args.overrides]
    results = {
        "held_out_docs": docs,
        "steps": args.steps,
        "config": args.config.name,
        "overrides": args.overrides,
        "modes": {},
    }
    previous = out / "results.json"  # a mode run earlier with the same settings is kept beside this one
    if previous.is_file():
        kept = json.loads(previous.read_text(encoding="utf-8"))
        same = (kept["held_out_docs"], kept["steps"], kept["overrides"], kept.get("config"))
        if same == (docs, args.steps, args.overrides, args.config.name):
            results["modes"] = kept["modes"]
    for mode in args.modes.split(","):
        config = ["-c", str(args.config)]
        mode_set = ["--set=data.mode=" + mode]
        data, full, run = out / mode / "data", out / mode / "full", out / mode / "run"
        reduced = ["--kb", str(out / "reduced" / "kb.jsonl"), "--questions", str(out / "reduced" / "questions.yaml")]
        cli("data", "build", *config, *mode_set, *extra, *reduced, "--out", str(data))
        cli(
            "data",
            "build",
            *config,
            *mode_set,
            *extra,
            "--kb",
            str(kb),
            "--questions",
            str(questions),
            "--out",
            str(full),
        )
        counts = added_rows(full, docs, data / "train.jsonl", out / mode / "added.jsonl")
        steps = [f"--set=train.max_steps={args.steps}"] if args.steps else []
        steps.append("--set=train.epochs=20")  # the step count, not the epochs, ends training (as in the main job)
        cli("train", *config, *mode_set, *steps, *extra, "--data", str(data), "--out", str(run), "--no-progress")
        report = out / mode / "eval"
        cli(
            "eval", *config, *mode_set, *extra, "--adapter", str(run), "--data", str(out / mode / "added.jsonl"),
            "--kb", str(kb), "--train", str(data / "train.jsonl"), "--valid", str(data / "valid.jsonl"),
            "--rules", "none", "--variants", "tuned,tuned_rules,retrieval,top_passage", "--out", str(report),
            "--set=eval.max_rows=null",  # every added question: the main job's config samples 40
            "--no-progress",
        )  # fmt: skip
        variants = json.loads((report / "report.json").read_text(encoding="utf-8"))["variants"]
        results["modes"][mode] = {"rows": counts, **{v: variants[v]["aggregate"] for v in variants}}
    (out / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2), encoding="utf-8")
    for mode, figures in results["modes"].items():
        for variant in ("tuned", "tuned_rules", "retrieval", "top_passage"):
            a = figures[variant]
            print(
                f"{mode:12s} {variant:12s} sim {a['mean_similarity']:5.1f}  refused {a['refusal_accuracy']:5.1f}  "
                f"answerable refused {a['answerable_refused']:5.1f}  carried {a.get('model_carried', 0):5.1f}"
            )


if __name__ == "__main__":
    main()
