"""Diagnosis of an evaluated variant: weak questions, weak topics, confused pairs, proposed training questions."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import yaml

from mlx_lora.core.files import write_dir
from mlx_lora.core.jsonl import json_text
from mlx_lora.core.textnorm import compact
from mlx_lora.data.similarity import REFUSAL
from mlx_lora.evaluation.scoring import confused_pairs

_CLAUSE = re.compile(r"[，。；;！？!?]")  # not ":" (9:30) nor "、" (lists)
_LEADING = "並且或再"
# A clause opening with one of these leans on the one before it ("…小心翻閱，以免損壞"): as a question on its own
# ("以免損壞嗎？") it asks nothing, so it is not drafted.
_DEPENDENT = ("以免", "以防", "以便", "否則", "但", "因此", "所以", "若", "如果", "如有", "除非", "即使", "才")
_NOUNS = ("請假", "請款", "請購", "請問", "請示", "請求")
PROPOSAL_HEADER = """\
# Extra training questions proposed by `mlx-lora diagnose` for the weakest topics.
# They are machine-made drafts from the KB text: read them, fix or delete any that sound wrong,
# add your own phrasings, then rebuild the data:
#   mlx-lora data build --kb KB --questions QUESTIONS --extra-questions THIS_FILE --out DIR
# Questions already in the training split are left out; `data build` also drops any that are held out.
"""


def weak_topics(rows: list[dict], threshold: float) -> list[dict]:
    """Per expected topic: rows, mean similarity, topic accuracy; below-threshold topics first, worst first."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["expected_doc"]].append(r)
    topics = []
    for doc_id, items in groups.items():
        mean = sum(r["similarity"] for r in items) / len(items)
        right = sum(r["predicted_doc"] == doc_id for r in items)
        topics.append(
            {
                "doc_id": doc_id,
                "rows": len(items),
                "mean_similarity": round(mean, 1),
                "topic_accuracy": round(100 * right / len(items), 1),
                "weak": mean < threshold,
                "answered_as": sorted({r["predicted_doc"] for r in items if r["predicted_doc"] != doc_id}),
            }
        )
    return sorted(topics, key=lambda t: (t["mean_similarity"], t["doc_id"]))


def _clauses(text: str) -> list[str]:
    parts = [p.strip() for p in _CLAUSE.split(text)]
    return [p for p in parts if 4 <= len(compact(p)) <= 40]


def _as_question(clause: str) -> str:
    """A KB statement clause as a yes/no question; an instruction ("請…") becomes "需要…嗎？"."""
    clause = clause.rstrip("。.").lstrip(_LEADING)
    if clause.startswith("請") and not clause.startswith(_NOUNS):  # 請假 is a noun, 請攜帶 an instruction
        clause = "需要" + clause[1:].lstrip("於在")
    return f"{clause}嗎？"


def draft_questions(doc_id: str, doc_text: str, limit: int = 8) -> list[str]:
    """Question drafts: the doc id as a mixed-language topic, the title ("X：…"), each clause as a yes/no question."""
    topic = doc_id.replace("-", " ").replace("_", " ")
    drafts = [f"{topic} 的規定是什麼？"]
    title = doc_text.split("：", 1)[0] if "：" in doc_text[:20] else None
    if title:
        drafts += [f"{title}要怎麼處理？", f"請問{title}的規定為何？"]
    body = doc_text.split("：", 1)[1] if title else doc_text
    drafts += [_as_question(c) for c in _clauses(body) if not c.lstrip(_LEADING).startswith(_DEPENDENT)]
    drafts.append(f"請問 {topic} 有什麼要注意的？")
    return drafts[:limit]


def propose(
    topics: list[dict], kb: dict, train_questions: list[str], per_topic: int = 8, max_topics: int = 10
) -> dict[str, list[str]]:
    """{doc_id: [new questions]} for the weak topics (answerable ones), minus questions already in train."""
    known = {compact(q) for q in train_questions}
    proposal: dict[str, list[str]] = {}
    for topic in [t for t in topics if t["weak"] and t["doc_id"] not in (REFUSAL, None)][:max_topics]:
        doc = kb.get(topic["doc_id"])
        if doc is None:
            continue
        fresh = [q for q in draft_questions(topic["doc_id"], doc.text, per_topic * 2) if compact(q) not in known]
        if fresh:
            proposal[topic["doc_id"]] = list(dict.fromkeys(fresh))[:per_topic]
    return proposal


def diagnose(rows: list[dict], kb: dict, train_questions: list[str], threshold: float, worst_n: int = 20) -> dict:
    topics = weak_topics(rows, threshold)
    return {
        "threshold": threshold,
        "rows": len(rows),
        "weak_questions": [
            {k: r[k] for k in ("question", "expected_doc", "predicted_doc", "similarity", "generated")}
            for r in sorted(rows, key=lambda r: r["similarity"])
            if r["similarity"] < threshold
        ][:worst_n],
        "topics": topics,
        "confused_pairs": confused_pairs(rows, top=20),
        "proposal": propose(topics, kb, train_questions),
    }


def markdown(result: dict, variant: str) -> str:
    lines = [
        f"# Diagnosis of `{variant}` ({result['rows']} rows, threshold {result['threshold']:g}%)",
        "",
        "## Topics (weakest first)",
        "",
        "| topic | rows | mean sim | topic acc | answered as |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {t['doc_id']}{' ⚠' if t['weak'] else ''} | {t['rows']} | {t['mean_similarity']:g} | "
        f"{t['topic_accuracy']:g} | {', '.join(t['answered_as'])} |"
        for t in result["topics"]
    ]
    lines += ["", "## Confused pairs (expected → answered)", ""]
    lines += [
        f"- {c['expected']} → {c['predicted']}: {c['count']} — {' / '.join(c['questions'])}"
        for c in result["confused_pairs"]
    ] or ["(none)"]
    lines += ["", "## Weak questions", ""]
    lines += [
        f"- {w['similarity']:g} {w['question']} (expected {w['expected_doc']}, answered {w['predicted_doc']})"
        for w in result["weak_questions"]
    ] or ["(none)"]
    count = sum(len(v) for v in result["proposal"].values())
    lines += [
        "",
        f"## Proposal: {count} extra training questions for {len(result['proposal'])} topics (proposal.yaml)",
        "",
    ]
    return "\n".join(lines) + "\n"


def write_diagnosis(result: dict, out_dir: str | Path, variant: str) -> Path:
    """diagnose.json, diagnose.md and proposal.yaml (the `data build --extra-questions` input), replacing the
    folder's earlier three together; an eval report in the same folder is carried over."""
    out_dir = Path(out_dir)
    body = (
        yaml.safe_dump(result["proposal"], allow_unicode=True, sort_keys=False, width=1000)
        if result["proposal"]
        else "{}\n"
    )
    files = {
        "diagnose.json": json_text({"variant": variant, **result}),
        "diagnose.md": markdown(result, variant),
        "proposal.yaml": PROPOSAL_HEADER + body,
    }
    write_dir(out_dir, files, owns=files, allowed=[*files, "report.json", "report.md", "report.html", "audit.jsonl"])
    return out_dir / "proposal.yaml"
