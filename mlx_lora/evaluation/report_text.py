"""What report.md and report.html both say: the summary columns, number format and the notes above the tables."""

from __future__ import annotations

# (key in a variant's aggregate, column heading), in the order both reports show them.
SUMMARY_COLUMNS = (
    ("mean_similarity", "mean sim"),
    ("mean_char", "mean char"),
    ("min_similarity", "min"),
    ("max_similarity", "max"),
    ("pass_rate", "pass rate"),
    ("topic_accuracy", "topic acc"),
    ("refusal_accuracy", "refusal acc"),
    ("answerable_refused", "answerable refused"),
    ("model_carried", "model carried"),  # final answers that are the model's own (its text, cited passage, refusal)
)

# A segment's style: plain text, strong or emphasised. Each report turns segments into its own markup, so user
# text (a measure's description, a rules path, a note) is escaped by the HTML page and never parsed as Markdown.
PLAIN, STRONG, EM = "", "strong", "em"


def fmt(value) -> str:
    """A figure as both reports print it: "–" for none, floats without trailing zeros."""
    return "–" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def intro(report: dict) -> list[list[tuple[str, str]]]:
    """The sentences above the summary table, one list of (style, text) segments per line."""
    m, t = report["measure"], report["threshold"]
    lines = [
        [
            (PLAIN, "Similarity: "),
            (STRONG, str(m["name"])),
            (PLAIN, f" — {m['description']}. Character score (always shown): {m['char']}."),
        ],
        [(PLAIN, f"Threshold: {t['name']} = {t['percent']:g}% mean similarity. All figures in percent.")],
        [
            (
                PLAIN,
                "Topic of an answer = its nearest KB answer or the refusal (same measure; an empty answer has "
                "none); it ",
            ),
            (EM, "is a refusal"),
            (
                PLAIN,
                " when the refusal text is nearest. Topic accuracy counts answerable rows, refusal accuracy "
                "unanswerable ones.",
            ),
        ],
    ]
    if m.get("fallback"):
        lines.append([(PLAIN, f"Note: {m['fallback']}.")])
    meta = report.get("meta") or {}
    if meta.get("route"):
        r, c = meta["route"], meta.get("calibration")
        text = (
            f"Semantic route ({r.get('classifier') or 'nearest neighbours'}, trained on "
            f"{r['training_questions']} training questions and {r['kb_texts']} KB texts): refuse below "
            f"similarity {r['low']:g} or at refusal probability ≥ {r.get('refuse_at', 1.01):g}; answer from "
            f"the KB at topic probability ≥ {r['high']:g}; otherwise the model answers"
            + (f"; thresholds calibrated by {c['method']}" if c and c.get("method") else "")
            + "."
        )
        lines.append([(PLAIN, text)])
    biased = {name: b for name, b in (meta.get("refusal_bias") or {}).items() if b}
    if biased:
        shown = ", ".join(f"{name} {b:+g}" for name, b in biased.items())
        lines.append(
            [(PLAIN, f"Refusal bias (logit of the refusal's first token, calibrated on the valid split): {shown}.")]
        )
    if meta.get("rules"):
        rules = meta["rules"]
        lines.append(
            [
                (
                    PLAIN,
                    f"Rules: {rules['count']} from {rules['path']}; KB_MATCH at ≥ {rules['kb_match_threshold']:g} "
                    "similarity.",
                )
            ]
        )
    return lines


def notes(report: dict) -> list[tuple[str, str]]:
    """The run's notes (an input that was missing, a baseline skipped) as (key, text) pairs."""
    return [(str(k), str(v)) for k, v in ((report.get("meta") or {}).get("notes") or {}).items()]
