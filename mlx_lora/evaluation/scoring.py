"""Score answers against expected ones and aggregate them into report.json / report.md / report.html."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from mlx_lora.core.config import parse_threshold
from mlx_lora.core.files import write_dir, write_jsonl
from mlx_lora.core.jsonl import json_text, jsonl_text
from mlx_lora.data.grounded import own_citation_removed
from mlx_lora.data.similarity import REFUSAL, CharScorer, LabelIndex, example_labels
from mlx_lora.evaluation.report_html import html_page
from mlx_lora.evaluation.report_text import EM, PLAIN, STRONG, SUMMARY_COLUMNS, fmt, intro, notes
from mlx_lora.evaluation.variants import VARIANTS

BUCKETS = ("≥85", "70–84", "50–69", "<50")


def bucket(similarity: float) -> str:
    return (
        BUCKETS[0]
        if similarity >= 85
        else BUCKETS[1]
        if similarity >= 70
        else BUCKETS[2]
        if similarity >= 50
        else BUCKETS[3]
    )


def _pct(value: float) -> float:
    return round(100.0 * value, 1)


NO_ANSWER = "(empty answer)"  # the topic of an answer with no text: no doc and not the refusal


def score_rows(examples, answers, scorer, index: LabelIndex, char: CharScorer | None = None) -> list[dict]:
    """One row per (example, answer). `answers` holds strings or Decision-like objects (answer/source/detail).

    A generated answer *is a refusal* when its nearest neighbour among {each KB doc's answer, the refusal text}
    is the refusal; its *topic* is that nearest label (an empty answer has none: NO_ANSWER). Both use the primary
    measure.
    """
    char = char or CharScorer()
    texts = [a if isinstance(a, str) else (a.answer or "") for a in answers]
    # A grounded row's expected answer cites its doc: the citation is how, the text is what is scored.
    expected = [own_citation_removed(e) for e in examples]
    if hasattr(scorer, "embed"):  # one batched encode instead of one call per row
        scorer.embed(texts + expected)
    primary = [float(scorer.matrix([t], [x])[0, 0]) for t, x in zip(texts, expected)]
    chars = [char.pair(t, x) for t, x in zip(texts, expected)]
    labels = example_labels(examples, index)
    nearest = index.nearest(texts)
    rows = []
    for i, example in enumerate(examples):
        answer = answers[i]
        similarity = _pct(primary[i])
        j, score = nearest[i]
        # An empty answer is near nothing: its "nearest" label would be whichever comes first (a doc's topic).
        predicted, score = (index.labels[j], score) if texts[i].strip() else (NO_ANSWER, 0.0)
        rows.append(
            {
                "question": example.question,
                "expected": expected[i],
                "generated": texts[i],
                "expected_doc": labels[i],
                "answerable": labels[i] != REFUSAL,
                "similarity": similarity,
                "char": _pct(chars[i]),
                "bucket": bucket(similarity),
                "predicted_doc": predicted,
                "predicted_score": _pct(score),
                "refused": predicted == REFUSAL,
                "source": "MODEL_GENERATED" if isinstance(answer, str) else answer.source,
                "detail": {} if isinstance(answer, str) else answer.detail,
            }
        )
    return rows


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 1) if values else None


def _share(flags) -> float | None:
    flags = list(flags)
    return _pct(sum(flags) / len(flags)) if flags else None


def aggregate(rows: list[dict], threshold: float) -> dict:
    """Summary figures of one variant, all in percent (None where the rows give no basis, e.g. no refusals)."""
    sims = [r["similarity"] for r in rows]
    answerable = [r for r in rows if r["answerable"]]
    unanswerable = [r for r in rows if not r["answerable"]]
    counts = Counter(r["bucket"] for r in rows)
    return {
        "rows": len(rows),
        "mean_similarity": _mean(sims),
        "min_similarity": min(sims) if sims else None,
        "max_similarity": max(sims) if sims else None,
        "mean_char": _mean(r["char"] for r in rows),
        "refusal_accuracy": _share(r["refused"] for r in unanswerable),
        "topic_accuracy": _share(r["predicted_doc"] == r["expected_doc"] for r in answerable),
        "answerable_refused": _share(r["refused"] for r in answerable),
        "pass_rate": _share(s >= threshold for s in sims),
        "passed": bool(sims) and sum(sims) / len(sims) >= threshold,
        "buckets": {name: counts.get(name, 0) for name in BUCKETS},
        "sources": dict(Counter(r["source"] for r in rows).most_common()),
        # Final answers the model itself carried (its text kept, the passage it cited, or its own refusal);
        # whatever a rule, the route or the answerability check decided does not count.
        "model_carried": _share(_carried(r) for r in rows),
        "model_carried_answers": sum(_carried(r) and not r["refused"] for r in rows),
        "model_carried_refusals": sum(_carried(r) and r["refused"] for r in rows),
    }


def _carried(row: dict) -> bool:
    return (row.get("detail") or {}).get("by") == "model"


def confused_pairs(rows: list[dict], top: int = 10) -> list[dict]:
    """(expected, predicted) label pairs that differ, most frequent first, with up to 3 example questions."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for r in rows:
        if r["predicted_doc"] != r["expected_doc"]:
            groups[(r["expected_doc"], r["predicted_doc"])].append(r["question"])
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [{"expected": e, "predicted": p, "count": len(qs), "questions": qs[:3]} for (e, p), qs in ranked[:top]]


def worst(rows: list[dict], n: int) -> list[dict]:
    return sorted(rows, key=lambda r: r["similarity"])[:n]


def build_report(
    variant_rows: dict[str, list[dict]], threshold_spec, measure: dict, worst_n: int = 10, meta: dict | None = None
) -> dict:
    """report.json's content: `summary` {variant: figures}, then per-variant aggregate, confusions, worst and rows."""
    label, value = parse_threshold(threshold_spec)
    order = [v for v in VARIANTS if v in variant_rows] + [v for v in variant_rows if v not in VARIANTS]
    variants = {}
    for name in order:
        rows = variant_rows[name]
        variants[name] = {
            "aggregate": aggregate(rows, value),
            "confused_pairs": confused_pairs(rows),
            "worst": worst(rows, worst_n),
            "rows": rows,
        }
    return {
        "summary": {name: variants[name]["aggregate"] for name in order},
        "threshold": {"name": label, "percent": value},
        "measure": measure,
        "meta": meta or {},
        "variants": variants,
    }


def _cell(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown(report: dict) -> str:
    marks = {PLAIN: "", STRONG: "**", EM: "*"}
    lines = ["# Evaluation report", ""]
    lines += ["".join(f"{marks[style]}{text}{marks[style]}" for style, text in line) for line in intro(report)]
    lines += [f"- {key}: {value}" for key, value in notes(report)]
    lines += [
        "",
        "| variant | rows | " + " | ".join(h for _, h in SUMMARY_COLUMNS) + " | buckets ≥85/70–84/50–69/<50 "
        "| verdict |",
        "|" + "---|" * (len(SUMMARY_COLUMNS) + 4),
    ]
    for name, s in report["summary"].items():
        cells = [fmt(s.get(k)) for k, _ in SUMMARY_COLUMNS]
        buckets = "/".join(str(s["buckets"][b]) for b in BUCKETS)
        lines.append(
            f"| {name} | {s['rows']} | " + " | ".join(cells) + f" | {buckets} | {'PASS' if s['passed'] else 'FAIL'} |"
        )
    for name, v in report["variants"].items():
        sources = ", ".join(f"{k} {n}" for k, n in v["aggregate"]["sources"].items())
        lines += ["", f"## {name}", "", f"Sources: {sources}", ""]
        if v["confused_pairs"]:
            lines += ["Confused topics (expected → answered):", ""]
            lines += [
                f"- {c['expected']} → {c['predicted']}: {c['count']} (e.g. {_cell(c['questions'][0], 40)})"
                for c in v["confused_pairs"]
            ]
            lines.append("")
        lines += ["| sim | char | question | generated | source |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['similarity']:g} | {r['char']:g} | {_cell(r['question'], 40)} | {_cell(r['generated'])} "
            f"| {r['source']} |"
            for r in v["worst"]
        ]
    return "\n".join(lines) + "\n"


def write_report(
    report: dict, out_dir: str | Path, audit: list[dict] | None = None, audit_name: str | None = "audit.jsonl"
) -> Path:
    """report.json/.md/.html and the audit log replace the folder's earlier ones together (one generation, see
    files.replaced_dir); files `diagnose` wrote into the folder are carried over."""
    out_dir = Path(out_dir)
    files = {"report.json": json_text(report), "report.md": markdown(report), "report.html": html_page(report)}
    inside = bool(audit_name) and Path(audit_name).name == audit_name  # a plain name, not a path elsewhere
    owns = [*files, *([audit_name] if inside else [])]
    if audit and inside:
        files[audit_name] = jsonl_text(audit)
    write_dir(out_dir, files, owns=owns, allowed=[*owns, "diagnose.json", "diagnose.md", "proposal.yaml"])
    if audit and audit_name and not inside:  # a log kept elsewhere: its own file, after the report
        write_jsonl(out_dir / audit_name, audit)
    return out_dir / "report.json"
