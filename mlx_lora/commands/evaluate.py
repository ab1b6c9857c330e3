"""`mlx-lora eval` and `mlx-lora diagnose`: score base / tuned / tuned+rules / retrieval; find weak topics."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlx_lora.commands.options import build_config, config_option, set_option
from mlx_lora.evaluation.variants import DIAGNOSE_PREFERENCE, VARIANTS


def _sibling(data: str | None, name: str, given: str | None) -> str | None:
    """--train / --valid default to train.jsonl / valid.jsonl beside the test file, when they exist."""
    if given is not None or data is None:
        return given
    candidate = Path(data).with_name(name)
    return str(candidate) if candidate.is_file() else None


def _variants(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        from mlx_lora.core.errors import UserError

        raise UserError(f"--variants: unknown {bad[0]!r}; choose from {', '.join(VARIANTS)}")
    return names


def eval_options(func):
    for option in reversed(
        [
            config_option,
            set_option,
            click.option(
                "--model",
                help="Base model: embedded, an HF folder, a .gguf or a cached hub id (default: the run's model).",
            ),
            click.option("--adapter", help="Run directory (or adapter folder) to evaluate as `tuned`."),
            click.option("--data", required=True, help="Test JSONL (chat rows; built data carries doc ids)."),
            click.option("--kb", help="KB JSONL (default data.kb)."),
            click.option("--rules", "rules_path", help="Rules YAML (default rules.path; 'none' for the route only)."),
            click.option(
                "--train",
                type=click.Path(exists=True, dir_okay=False),
                help="Train JSONL for the retrieval baseline and route (default: beside --data).",
            ),
            click.option(
                "--valid",
                type=click.Path(exists=True, dir_okay=False),
                help="Valid JSONL; with --train, calibrates the route out-of-fold (default: beside --data).",
            ),
            click.option("--threshold", help="faq (85) | chatbot (80) | critical (90) | a number."),
            click.option("--embedder", help="use (default) | char | a sentence-transformers model folder or id."),
            click.option("--max-rows", type=int, help="Evaluate a seeded sample of this many test rows."),
            click.option("--variants", help=f"Comma list from {', '.join(VARIANTS)} (default: all that apply)."),
            click.option("--out", required=True, help="Output directory for report.json/.md/.html and audit log."),
            click.option("--no-progress", is_flag=True, help="No progress bars."),
            click.option(
                "--strict",
                is_flag=True,
                help="Refuse, instead of warning, a base model that differs from the run's manifest.",
            ),
        ]
    ):
        func = option(func)
    return func


def _run(
    config_path,
    overrides,
    model,
    adapter,
    data,
    kb,
    rules_path,
    train,
    valid,
    threshold,
    embedder,
    max_rows,
    variants,
    out,
    no_progress,
    forced_variants=None,
    strict=False,
) -> tuple[dict, object]:
    from mlx_lora.evaluation.run import evaluate_run

    cfg = build_config(
        config_path, overrides, eval__threshold=threshold, eval__embedder=embedder, eval__max_rows=max_rows, data__kb=kb
    )
    rules = "config" if rules_path is None else None if rules_path.lower() == "none" else rules_path
    if rules not in (None, "config") and not Path(rules).is_file():
        from mlx_lora.core.errors import UserError

        raise UserError(f"{rules}: rules file not found")
    report = evaluate_run(
        cfg,
        model,
        adapter,
        data,
        _sibling(data, "valid.jsonl", valid),
        _sibling(data, "train.jsonl", train),
        cfg.data.kb,
        out,
        variants=forced_variants or _variants(variants),
        rules_path=rules,
        progress=not no_progress,
        strict=strict,
    )
    return report, cfg


def print_summary(report: dict) -> None:
    m = report["measure"]
    click.echo(f"similarity: {m['name']} (char score: chrF){' — ' + m['fallback'] if m.get('fallback') else ''}")
    click.echo(
        f"{'variant':<12} {'sim %':>6} {'char %':>6} {'topic %':>8} {'refusal %':>9} {'ans.refused %':>13}  pass"
    )
    for name, s in report["summary"].items():
        cells = [
            s.get(k)
            for k in ("mean_similarity", "mean_char", "topic_accuracy", "refusal_accuracy", "answerable_refused")
        ]
        text = " ".join(
            f"{c:>{w}.1f}" if isinstance(c, (int, float)) else f"{'-':>{w}}" for c, w in zip(cells, (6, 6, 8, 9, 13))
        )
        click.echo(f"{name:<12} {text}  {'PASS' if s['passed'] else 'FAIL'}")


@click.command("eval")
@eval_options
def eval_cmd(
    config_path,
    overrides,
    model,
    adapter,
    data,
    kb,
    rules_path,
    train,
    valid,
    threshold,
    embedder,
    max_rows,
    variants,
    out,
    no_progress,
    strict,
):
    """Generate (batched, greedy) and score: base vs tuned vs tuned+rules vs retrieval, in one report."""
    report, _ = _run(
        config_path,
        overrides,
        model,
        adapter,
        data,
        kb,
        rules_path,
        train,
        valid,
        threshold,
        embedder,
        max_rows,
        variants,
        out,
        no_progress,
        strict=strict,
    )
    print_summary(report)
    click.echo(f"report: {Path(out) / 'report.md'} (and report.json, report.html)")


REPORT_ROW_KEYS = ("question", "expected_doc", "predicted_doc", "similarity")


def _load_report(path) -> dict:
    """An `mlx-lora eval` report.json, checked for what diagnose reads; anything else is a one-line error."""
    from mlx_lora.core.errors import UserError
    from mlx_lora.core.userfiles import read_text

    try:
        report = json.loads(read_text(path))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable report.json ({exc})") from None
    variants = report.get("variants") if isinstance(report, dict) else None
    rows_ok = (
        isinstance(variants, dict)
        and variants
        and all(
            isinstance(v, dict)
            and isinstance(v.get("rows"), list)
            and all(isinstance(r, dict) and all(k in r for k in REPORT_ROW_KEYS) for r in v["rows"])
            for v in variants.values()
        )
    )
    if not rows_ok:
        raise UserError(
            f"{path}: not an `mlx-lora eval` report.json (expected variants.<name>.rows with "
            f"{', '.join(REPORT_ROW_KEYS)}); pass the report.json that `mlx-lora eval --out DIR` wrote"
        )
    return report


@click.command()
@config_option
@set_option
@click.option("--report", "report_path", help="An existing report.json to diagnose (no model needed).")
@click.option("--variant", help="Variant to diagnose (default: tuned if present, else base).")
@click.option("--model", help="Base model (when no --report).")
@click.option("--adapter", help="Run directory to evaluate (when no --report).")
@click.option("--data", help="Eval JSONL (when no --report): the whole eval set is run.")
@click.option("--kb", help="KB JSONL (default data.kb).")
@click.option("--train", help="Train JSONL: proposals skip questions already in it (default: beside --data).")
@click.option("--threshold", help="faq | chatbot | critical | a number: below it a topic counts as weak.")
@click.option("--out", required=True, help="Directory for diagnose.md/.json and proposal.yaml.")
@click.option("--no-progress", is_flag=True)
def diagnose(
    config_path, overrides, report_path, variant, model, adapter, data, kb, train, threshold, out, no_progress
):
    """Rank weak questions and confused topics; write proposal.yaml for `data build --extra-questions`."""
    from mlx_lora.core.config import parse_threshold
    from mlx_lora.core.errors import UserError
    from mlx_lora.data.formats import read_examples
    from mlx_lora.data.kb import load_kb
    from mlx_lora.evaluation.diagnose import diagnose as run_diagnosis
    from mlx_lora.evaluation.diagnose import write_diagnosis

    if report_path:
        report = _load_report(report_path)
        cfg = build_config(config_path, overrides, eval__threshold=threshold, data__kb=kb)
        train = train or report.get("meta", {}).get("train")
    elif data:
        forced = ("tuned",) if adapter else ("base",)
        report, cfg = _run(
            config_path,
            overrides,
            model,
            adapter,
            data,
            kb,
            "none",
            train,
            None,
            threshold,
            None,
            None,
            None,
            out,
            no_progress,
            forced_variants=forced,
        )
        train = _sibling(data, "train.jsonl", train)
    else:
        raise UserError("diagnose needs --report REPORT.json, or --data EVAL.jsonl (with --model/--adapter)")
    variants = report.get("variants", {})
    name = variant or next((v for v in DIAGNOSE_PREFERENCE if v in variants), None)
    if name not in variants:
        raise UserError(f"variant {name!r} is not in the report; it has: {', '.join(variants) or 'none'}")
    kb_docs = load_kb(cfg.data.kb)
    train_questions = [e.question for e in read_examples(train)] if train and Path(train).is_file() else []
    _, value = parse_threshold(cfg.eval.threshold)
    result = run_diagnosis(variants[name]["rows"], kb_docs, train_questions, value, cfg.eval.worst_n * 2)
    proposal = write_diagnosis(result, out, name)
    weak = [t["doc_id"] for t in result["topics"] if t["weak"]]
    click.echo(f"{name}: {len(result['weak_questions'])} weak questions; weak topics: {', '.join(weak) or 'none'}")
    for pair in result["confused_pairs"][:5]:
        click.echo(f"  confused: {pair['expected']} → {pair['predicted']} ({pair['count']})")
    click.echo(
        f"proposal: {proposal} ({sum(len(v) for v in result['proposal'].values())} questions) — review it, "
        f"then `mlx-lora data build --extra-questions {proposal}`"
    )
