"""report.html: the evaluation report as one self-contained page of HTML tables and an SVG chart whose labels fit."""

from __future__ import annotations

import html
import unicodedata

from mlx_lora.evaluation.report_text import EM, STRONG, SUMMARY_COLUMNS, fmt, intro, notes

# Latin first, then the CJK faces of macOS, Windows and Linux: KB text is mostly Traditional Chinese.
FONTS = (
    'system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans CJK TC", "PingFang TC", "Microsoft JhengHei", '
    '"WenQuanYi Micro Hei", sans-serif'
)

STYLE = f"""
:root{{color-scheme:light}}
body{{font-family:{FONTS};max-width:1200px;margin:1.5rem auto;padding:0 1rem;color:#1f2328;line-height:1.45}}
h1{{font-size:1.6rem;margin-bottom:.4rem}} h2{{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #d0d7de}}
h3{{font-size:1rem;margin:1.2rem 0 .4rem}}
p.intro{{margin:.2rem 0;color:#444}} nav a{{margin-right:.8rem}}
.scroll{{overflow-x:auto}}
table{{border-collapse:collapse;margin:.4rem 0 1rem;font-size:13px}}
th,td{{border:1px solid #d0d7de;padding:4px 8px;vertical-align:top;text-align:left}}
th{{background:#f3f5f7;font-weight:600}} tbody tr:nth-child(even){{background:#fafbfc}}
td.num{{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}} th.num{{text-align:right}}
td.text{{max-width:28rem;white-space:pre-wrap;overflow-wrap:anywhere}}
td.pass{{color:#1a7f37;font-weight:600}} td.fail{{color:#cf222e;font-weight:600}}
svg.chart{{max-width:100%;height:auto;font-family:{FONTS}}}
"""

# (aggregate key, label, colour) of each bar drawn per variant.
CHART_METRICS = (
    ("mean_similarity", "mean sim", "#4472c4"),
    ("topic_accuracy", "topic acc", "#70ad47"),
    ("refusal_accuracy", "refusal acc", "#ed7d31"),
)
NAME_SIZE, VALUE_SIZE = 13, 11  # font sizes (px) of the variant names and of the figures after each bar
BAR_SPAN, BAR_HEIGHT, GAP, PAD = 360, 16, 12, 6  # px: a 100% bar, one bar's row, between variants, the margins


def text_width(text: str, size: float) -> float:
    """An upper estimate of `text`'s width in px: SVG cannot ask the browser, so wide (CJK) characters count a
    full em and the others 0.62 em, a little wider than the sans-serif faces in FONTS draw them."""
    width = 0.0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += size if unicodedata.east_asian_width(ch) in ("W", "F") else 0.62 * size
    return width


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def bar_chart(summary: dict) -> str:
    """Inline SVG: mean similarity, topic and refusal accuracy per variant, sized to fit its longest labels."""
    if not summary:
        return ""
    left = PAD + max(text_width(name, NAME_SIZE) for name in summary) + 10
    bars, right = [], left
    for name, s in summary.items():
        for key, label, colour in CHART_METRICS:
            value = s.get(key)
            w = BAR_SPAN * min(max(value or 0.0, 0.0), 100.0) / 100
            caption = f"{label} {fmt(value)}"
            bars.append((name, w, colour, caption))
            right = max(right, left + w + 4 + text_width(caption, VALUE_SIZE))
    width = int(right + PAD + 0.5)
    parts, y = [], PAD
    per_variant = len(CHART_METRICS)
    for i in range(0, len(bars), per_variant):
        name = bars[i][0]
        middle = y + per_variant * BAR_HEIGHT / 2
        parts.append(f'<text class="name" x="{PAD}" y="{middle + 4:.1f}" font-size="{NAME_SIZE}">{_e(name)}</text>')
        for _, w, colour, caption in bars[i : i + per_variant]:
            parts.append(
                f'<rect x="{left:.1f}" y="{y}" width="{w:.1f}" height="{BAR_HEIGHT - 3}" fill="{colour}"/>'
                f'<text class="value" x="{left + w + 4:.1f}" y="{y + BAR_HEIGHT - 5}" font-size="{VALUE_SIZE}">'
                f"{_e(caption)}</text>"
            )
            y += BAR_HEIGHT
        y += GAP
    height = y - GAP + PAD
    return (
        f'<svg class="chart" id="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="mean similarity, topic and refusal accuracy per '
        f'variant"><line x1="{left:.1f}" y1="0" x2="{left:.1f}" y2="{height}" stroke="#999"/>{"".join(parts)}</svg>'
    )


def _segments(line: list[tuple[str, str]]) -> str:
    tags = {STRONG: "strong", EM: "em"}
    return "".join(f"<{tags[s]}>{_e(t)}</{tags[s]}>" if s in tags else _e(t) for s, t in line)


def _table(table_id: str, head: list[str], rows: list[list[tuple[str, str]]], numeric=frozenset(), thead="") -> str:
    """A table from already escaped cells: `rows` holds (css class, html) per cell; `thead` replaces the one-row
    header made from `head`."""
    ths = "".join(f"<th{' class=num' if i in numeric else ''}>{h}</th>" for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{c}">{v}</td>' for c, v in row) + "</tr>" for row in rows)
    table = f'<table id="{table_id}"><thead>{thead or f"<tr>{ths}</tr>"}</thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table}</div>'  # a wide table scrolls instead of widening the page


def summary_table(summary: dict) -> str:
    """One row per variant: its figures, its rows per similarity bucket and its verdict."""
    if not summary:
        return '<p id="summary">No variant was evaluated.</p>'
    buckets = list(next(iter(summary.values()))["buckets"])
    one = "".join(f'<th rowspan="2">{_e(h)}</th>' for h in ["variant", "rows", *(h for _, h in SUMMARY_COLUMNS)])
    thead = (
        f'<tr>{one}<th colspan="{len(buckets)}">rows by similarity</th><th rowspan="2">verdict</th></tr>'
        f"<tr>{''.join(f'<th class=num>{_e(b)}</th>' for b in buckets)}</tr>"
    )
    rows = []
    for name, s in summary.items():
        cells = [("name", _e(name)), ("num", _e(s["rows"]))]
        cells += [("num", _e(fmt(s.get(k)))) for k, _ in SUMMARY_COLUMNS]
        cells += [("num", _e(s["buckets"].get(b, 0))) for b in buckets]
        cells.append(("pass", "PASS") if s["passed"] else ("fail", "FAIL"))
        rows.append(cells)
    return _table("summary", [], rows, thead=thead)


def variant_section(name: str, v: dict) -> str:
    """A variant's answer sources, confused topics and worst answers."""
    slug = _e(name)
    out = [f'<section id="variant-{slug}" data-variant="{slug}"><h2>{slug}</h2><h3>Sources</h3>']
    sources = [[("name", _e(k)), ("num", _e(n))] for k, n in v["aggregate"]["sources"].items()]
    out.append(_table(f"sources-{slug}", ["source", "answers"], sources, numeric={1}))
    if v["confused_pairs"]:
        out.append("<h3>Confused topics (expected → answered)</h3>")
        pairs = [
            [
                ("name", _e(c["expected"])),
                ("name", _e(c["predicted"])),
                ("num", _e(c["count"])),
                ("text", "<br>".join(_e(q) for q in c["questions"])),
            ]
            for c in v["confused_pairs"]
        ]
        out.append(_table(f"confused-{slug}", ["expected", "answered", "count", "e.g."], pairs, numeric={2}))
    out.append("<h3>Worst answers</h3>")
    worst = [
        [
            ("num", _e(fmt(r["similarity"]))),
            ("num", _e(fmt(r["char"]))),
            ("text", _e(r["question"])),
            ("text", _e(r["expected"])),
            ("text", _e(r["generated"])),
            ("name", _e(r["source"])),
        ]
        for r in v["worst"]
    ]
    out.append(
        _table(f"worst-{slug}", ["sim", "char", "question", "expected", "generated", "source"], worst, numeric={0, 1})
    )
    return "".join(out) + "</section>"


def html_page(report: dict) -> str:
    """The whole page: notes, summary table, chart, then one section per variant. Every user text is escaped."""
    paragraphs = "".join(f'<p class="intro">{_segments(line)}</p>' for line in intro(report))
    note_items = "".join(f"<li><strong>{_e(k)}</strong>: {_e(v)}</li>" for k, v in notes(report))
    links = "".join(f'<a href="#variant-{_e(name)}">{_e(name)}</a>' for name in report["variants"])
    sections = "".join(variant_section(name, v) for name, v in report["variants"].items())
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>mlx-lora evaluation</title><style>{STYLE}</style></head><body>"
        f"<h1>Evaluation report</h1>{paragraphs}"
        + (f'<ul id="notes">{note_items}</ul>' if note_items else "")
        + f"<h2>Summary</h2>{summary_table(report['summary'])}{bar_chart(report['summary'])}"
        + (f"<nav>Variants: {links}</nav>" if links else "")
        + f"{sections}</body></html>\n"
    )
