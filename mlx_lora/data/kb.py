"""The knowledge base: JSONL rows of {doc_id, text, text_hash}, validated and hash-checked."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mlx_lora.core.errors import located
from mlx_lora.core.jsonl import read_jsonl


@dataclass(frozen=True)
class Doc:
    doc_id: str
    text: str
    text_hash: str


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_kb(path: str | Path) -> dict[str, Doc]:
    """Docs by id, in file order. Duplicate ids, empty texts and wrong hashes are errors with the line number."""
    docs: dict[str, Doc] = {}
    for line, row in read_jsonl(path):
        doc_id, text = row.get("doc_id"), row.get("text")
        unknown = sorted(set(row) - {"doc_id", "text", "text_hash"})
        also = f"; unknown key(s) {unknown} (a KB row has doc_id, text, text_hash)" if unknown else ""
        if not isinstance(doc_id, str) or not doc_id.strip():
            what = "missing" if "doc_id" not in row else f"{json.dumps(doc_id)}, not a non-empty string"
            raise located(path, line, f'"doc_id" is {what}{also}')
        if not isinstance(text, str) or not text.strip():
            what = "missing" if "text" not in row else "empty" if isinstance(text, str) else "not a string"
            raise located(path, line, f'doc {doc_id!r}: "text" is {what}{also}')
        if doc_id in docs:
            raise located(path, line, f"duplicate doc_id {doc_id!r}; each document needs its own id")
        actual = text_sha256(text)
        stated = row.get("text_hash")
        if stated is not None and stated != actual:
            raise located(
                path,
                line,
                f"text_hash of {doc_id!r} does not match its text (sha256 {actual[:12]}…); "
                "the text was edited: update or remove text_hash",
            )
        docs[doc_id] = Doc(doc_id, text, actual)
    if not docs:
        raise located(path, None, "the knowledge base is empty")
    return docs
