"""Grounded chat turns: a question with its retrieved KB passages, and an answer that cites the passage it used."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from mlx_lora.core.config import DataConfig
from mlx_lora.core.textnorm import compact
from mlx_lora.data.retrieval import PassageIndex

# An answer that uses a passage starts with its label in brackets, as the passages are shown: "[2] …" (data.cite
# number) or "[vpn-setup] …" (doc_id). A label is a short slug; the pattern is anchored and has no nested
# repetition, so it cannot backtrack badly.
_CITATION = re.compile(r"\s*\[([A-Za-z0-9][A-Za-z0-9_.\-]{0,80})\]\s*")


# Where a KB text splits into parts for a near-miss row: its sentences, or its comma clauses when it is one
# sentence. Single characters in a character class: linear, cannot hang.
_SENTENCES = re.compile(r"[；;。！？!?\n]")
_COMMAS = re.compile(r"[，,]")
MIN_PART_CHARS = 4  # shorter pieces (a list item, "等") are not a part of their own
# A near-miss row needs a question that clearly asks about some part of its text more than about the part kept:
# relevance (embedding cosine + the share of the question's character bigrams found in the part) of the best part
# at least this much above the kept one's. On the sample's train questions 243 of 340 qualify; read by hand, about
# 1 in 10 of a sample of 30 kept parts still (partly) answered the question.
NEAR_MISS_MARGIN = 0.2


def _bigrams(text: str) -> set[str]:
    key = compact(text)
    return {key[i : i + 2] for i in range(len(key) - 1)}


def _parts(text: str) -> list[str]:
    for boundary in (_SENTENCES, _COMMAS):
        parts = [p.strip() for p in boundary.split(text) if len(compact(p)) >= MIN_PART_CHARS]
        if len(parts) > 1:
            return parts
    return []


def without_answer(question: str, text: str, scorer) -> str | None:
    """A KB text cut down to its part least related to `question` — on topic, but (most likely) not what was
    asked: the passage of a near-miss row, whose answer is the refusal. None when the text has one part, or no
    part stands out as what the question asks about (NEAR_MISS_MARGIN)."""
    parts = _parts(text)
    if not parts:
        return None
    asked = _bigrams(question)
    relevance = [len(asked & _bigrams(p)) / max(len(asked), 1) for p in parts]
    if hasattr(scorer, "embed"):
        vectors = scorer.embed([question, *parts])
        relevance = [r + float(v @ vectors[0]) for r, v in zip(relevance, vectors[1:])]
    if max(relevance) - min(relevance) < NEAR_MISS_MARGIN:
        return None
    kept = parts[relevance.index(min(relevance))]
    return kept if kept[-1] in "。.!?！？" else kept + "。"


def labels(doc_ids: Sequence[str], cfg: DataConfig) -> list[str]:
    """What the prompt calls each passage, and what an answer cites: its place (1..k) or its doc id."""
    return [str(i + 1) for i in range(len(doc_ids))] if cfg.cite == "number" else list(doc_ids)


def passages_text(passages: Sequence[tuple[str, str]], cfg: DataConfig) -> str:
    names = labels([doc_id for doc_id, _ in passages], cfg)
    return "\n".join(
        cfg.passage_template.format(label=label, n=i + 1, doc_id=doc_id, text=text)
        for i, (label, (doc_id, text)) in enumerate(zip(names, passages))
    )


def user_turn(question: str, passages: Sequence[tuple[str, str]], cfg: DataConfig) -> str:
    """The user message of a grounded prompt (the question last: it is what the answer responds to)."""
    return cfg.grounded_template.format(passages=passages_text(passages, cfg), question=question)


def cited_answer(doc_id: str, answer: str, shown: Sequence[str], cfg: DataConfig) -> str:
    """The answer citing doc_id by its label among the shown passages' doc ids; by the doc id itself when it is not
    shown (an answer from memory, or a held-out row whose passages missed its doc)."""
    label = labels(shown, cfg)[list(shown).index(doc_id)] if doc_id in shown else doc_id
    return f"[{label}] {answer}"


def parse_citation(answer: str) -> tuple[str | None, str]:
    """(cited label or None, the answer without its citation)."""
    match = _CITATION.match(answer or "")
    if not match:
        return None, (answer or "").strip()
    return match.group(1), answer[match.end() :].strip()


def with_doc_id(answer: str, shown: Sequence[str], cfg: DataConfig) -> str:
    """A model's answer with its citation turned into the doc id it names ("[2] …" → "[vpn-setup] …") from the
    doc ids of the passages its prompt showed; unchanged when it cites no shown passage (or cites doc ids)."""
    label, text = parse_citation(answer)
    names = labels(shown, cfg)
    if cfg.cite != "number" or label not in names:
        return answer
    return f"[{shown[names.index(label)]}] {text}"


def own_citation_removed(example) -> str:
    """A built row's answer without its citation when it cites the row's own doc (by doc id, or by its number
    among the row's passages); else the answer as it is."""
    meta = example.meta or {}
    label, text = parse_citation(example.answer)
    doc_id, shown = meta.get("doc_id"), meta.get("passages") or []
    if label is None or doc_id is None:
        return example.answer
    by_number = doc_id in shown and label == str(shown.index(doc_id) + 1)
    return text if label == doc_id or by_number else example.answer


def familiar(shown: Sequence[str], index: PassageIndex | None) -> bool:
    """Whether the run's refusal bias (training/refusal_bias.py) applies to a prompt showing these docs: every one
    is a doc some training question asks for (a closed-book prompt shows none). A model hesitates over a doc added
    after training because it is new, not because the question is unanswerable: on the docs-added benchmark a bias
    of 1.0 applied to every prompt refused 25% of the new docs' answerable questions, against 11% unbiased."""
    return index is None or all(doc_id in index.asked for doc_id in shown)


def retrieve(index: PassageIndex, questions: Sequence[str], cfg: DataConfig, leave_out_own: bool = False):
    """Per question, the top data.passages docs as (doc_id, text)."""
    found = index.search(questions, cfg.passages, leave_out_own=leave_out_own)
    return [[(doc_id, index.kb_texts[doc_id]) for doc_id, _ in hits] for hits in found]


def recited(example, shown: Sequence[str], cfg: DataConfig) -> str:
    """A built row's answer citing its own doc as the passages `shown` label it (cited_answer); the answer as it is
    when it cites no doc of its own (a refusal)."""
    answer, text = example.answer, own_citation_removed(example)
    if text == answer:
        return answer
    return cited_answer(example.meta["doc_id"], text, shown, cfg)


def reground(examples, index: PassageIndex, cfg: DataConfig) -> list:
    """Grounded examples with passages retrieved anew from `index` (the current KB): what the model would be
    shown today, and the expected answer citing its doc as that prompt labels it. With the KB and train
    questions the rows were built from, the prompts come out unchanged (before fitting.fit_prompts)."""
    found = retrieve(index, [e.question for e in examples], cfg)
    out = []
    for example, passages in zip(examples, found):
        messages = [dict(m) for m in example.messages]
        ids = [doc_id for doc_id, _ in passages]
        last_user(messages)["content"] = user_turn(example.question, passages, cfg)
        answer = recited(example, ids, cfg)
        if answer != example.answer:
            last_assistant(messages)["content"] = answer
        meta = {**example.meta, "passages": ids, "gold_in_passages": example.meta.get("doc_id") in ids}
        out.append(dataclasses.replace(example, messages=messages, meta=meta))
    return out


def ground_messages(messages: list[dict], passages: Sequence[tuple[str, str]], cfg: DataConfig) -> list[dict]:
    """A chat's messages with its last user turn replaced by the grounded turn for that question."""
    out = [dict(m) for m in messages]
    last = max(i for i, m in enumerate(out) if m["role"] == "user")
    out[last]["content"] = user_turn(out[last]["content"], passages, cfg)
    return out


def last_user(messages: list[dict]) -> dict:
    return messages[max(i for i, m in enumerate(messages) if m["role"] == "user")]


def last_assistant(messages: list[dict]) -> dict:
    return messages[max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
