"""The question bank: per doc, phrasings grouped by style; a pool of unanswerable questions; the refusal."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlx_lora.core.errors import UserError, located
from mlx_lora.core.textnorm import compact
from mlx_lora.core.userfiles import load_yaml
from mlx_lora.data.kb import Doc

STYLES = ("short", "full", "formal", "mixed")


@dataclass
class QuestionBank:
    refusal: str
    by_doc: dict[str, dict[str, list[str]]]  # doc_id → style → phrasings
    unanswerable: list[str] = field(default_factory=list)

    def phrasings(self, doc_id: str) -> list[tuple[str, str]]:
        """(style, question) pairs of one doc, styles in a fixed order."""
        styles = self.by_doc.get(doc_id, {})
        return [(style, q) for style in styles for q in styles[style]]


def _line_of(node_map: dict, key) -> int | None:
    node = node_map.get(key)
    return node.start_mark.line + 1 if node is not None else None


def _strings(value, path, line, what) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise located(path, line, f"{what} must be a list of non-empty strings")
    return [v.strip() for v in value]


def load_questions(path: str | Path, kb: dict[str, Doc] | None = None) -> QuestionBank:
    """Parse and validate the bank; with a KB, every doc_id must exist in it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path}: question bank not found; write one for your KB (`mlx-lora init DIR` copies the sample's) or name "
            "it with --questions / --set data.questions=PATH"
        )
    data, root = load_yaml(path)
    if not isinstance(data, dict):
        raise located(path, None, "expected a mapping with keys refusal, docs, unanswerable")
    lines = {k.value: v for k, v in root.value}
    unknown = set(data) - {"refusal", "docs", "unanswerable"}
    if unknown:
        raise located(path, None, f"unknown key(s) {sorted(unknown)}; valid keys: refusal, docs, unanswerable")
    refusal = data.get("refusal")
    if not isinstance(refusal, str) or not refusal.strip():
        raise located(path, None, '"refusal" must be the non-empty refusal answer')
    docs = data.get("docs")
    if not isinstance(docs, dict) or not docs:
        raise located(path, None, '"docs" must map each doc_id to its phrasings by style')
    doc_lines = {k.value: k.start_mark.line + 1 for k, _ in lines["docs"].value}
    by_doc: dict[str, dict[str, list[str]]] = {}
    seen: dict[str, str] = {}
    for doc_id, styles in docs.items():
        line = doc_lines.get(doc_id)
        if kb is not None and doc_id not in kb:
            raise located(path, line, f"doc_id {doc_id!r} is not in the knowledge base")
        if not isinstance(styles, dict):
            raise located(path, line, f"{doc_id}: expected styles ({', '.join(STYLES)}) mapping to lists")
        bad = set(styles) - set(STYLES)
        if bad:
            raise located(path, line, f"{doc_id}: unknown style(s) {sorted(bad)}; valid styles: {', '.join(STYLES)}")
        by_doc[doc_id] = {s: _strings(v, path, line, f"{doc_id}.{s}") for s, v in styles.items()}
        for _, question in QuestionBank(refusal, by_doc).phrasings(doc_id):
            key = compact(question)
            if key in seen and seen[key] != doc_id:
                raise located(path, line, f"question {question!r} is listed for both {seen[key]!r} and {doc_id!r}")
            seen[key] = doc_id
    unanswerable = _strings(data.get("unanswerable") or [], path, _line_of(lines, "unanswerable"), "unanswerable")
    for question in unanswerable:
        if compact(question) in seen:
            raise located(
                path,
                _line_of(lines, "unanswerable"),
                f"unanswerable question {question!r} is also a phrasing of {seen[compact(question)]!r}",
            )
    return QuestionBank(refusal.strip(), by_doc, unanswerable)
