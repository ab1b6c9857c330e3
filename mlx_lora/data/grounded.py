"""Grounded chat turns: a question with its retrieved KB passages, and an answer that cites the passage it used."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from mlx_lora.core.config import DataConfig
from mlx_lora.data.retrieval import PassageIndex

# An answer that uses a passage starts with its doc id in brackets, as the passages are shown: "[vpn-setup] …".
# A doc id is a short slug; the pattern is anchored and has no nested repetition, so it cannot backtrack badly.
_CITATION = re.compile(r"\s*\[([A-Za-z0-9][A-Za-z0-9_.\-]{0,80})\]\s*")


def passages_text(passages: Sequence[tuple[str, str]], cfg: DataConfig) -> str:
    return "\n".join(cfg.passage_template.format(doc_id=doc_id, text=text) for doc_id, text in passages)


def user_turn(question: str, passages: Sequence[tuple[str, str]], cfg: DataConfig) -> str:
    """The user message of a grounded prompt (the question last: it is what the answer responds to)."""
    return cfg.grounded_template.format(passages=passages_text(passages, cfg), question=question)


def cited_answer(doc_id: str, answer: str) -> str:
    return f"[{doc_id}] {answer}"


def parse_citation(answer: str) -> tuple[str | None, str]:
    """(cited doc id or None, the answer without its citation)."""
    match = _CITATION.match(answer or "")
    if not match:
        return None, (answer or "").strip()
    return match.group(1), answer[match.end() :].strip()


def strip_citation(answer: str) -> str:
    return parse_citation(answer)[1]


def retrieve(index: PassageIndex, questions: Sequence[str], cfg: DataConfig, leave_out_own: bool = False):
    """Per question, the top data.passages docs as (doc_id, text)."""
    found = index.search(questions, cfg.passages, leave_out_own=leave_out_own)
    return [[(doc_id, index.kb_texts[doc_id]) for doc_id, _ in hits] for hits in found]


def reground(examples, index: PassageIndex, cfg: DataConfig) -> list:
    """Grounded examples with passages retrieved anew from `index` (the current KB): what the model would be
    shown today. With the KB and train questions the rows were built from, the prompts come out unchanged."""
    found = retrieve(index, [e.question for e in examples], cfg)
    out = []
    for example, passages in zip(examples, found):
        messages = [dict(m) for m in example.messages]
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last]["content"] = user_turn(example.question, passages, cfg)
        ids = [doc_id for doc_id, _ in passages]
        meta = {**example.meta, "passages": ids, "gold_in_passages": example.meta.get("doc_id") in ids}
        out.append(dataclasses.replace(example, messages=messages, meta=meta))
    return out


def ground_messages(messages: list[dict], passages: Sequence[tuple[str, str]], cfg: DataConfig) -> list[dict]:
    """A chat's messages with its last user turn replaced by the grounded turn for that question."""
    out = [dict(m) for m in messages]
    last = max(i for i, m in enumerate(out) if m["role"] == "user")
    out[last]["content"] = user_turn(out[last]["content"], passages, cfg)
    return out
