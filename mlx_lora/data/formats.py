"""Read chat datasets in mlx-lm's formats (text, messages, prompt/completion) and OpenAI chat fine-tuning JSONL."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mlx_lora.core.errors import UserError, located
from mlx_lora.core.jsonl import read_jsonl
from mlx_lora.data.render import ChatTokenizer, Encoded, encode_messages, encode_text

ROLES = {"system", "user", "assistant", "tool"}
_CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", re.S)


@dataclass
class Example:
    """One row, whatever its file format: chat messages, or raw text when it is not a chat."""

    messages: list[dict] | None
    text: str | None = None
    meta: dict = field(default_factory=dict)
    line: int = 0

    @property
    def question(self) -> str:
        """The question asked: a grounded row's bare question (its user turn also shows passages), else the last
        user turn."""
        if isinstance(self.meta.get("question"), str):
            return self.meta["question"]
        return next((m["content"] for m in reversed(self.messages or []) if m["role"] == "user"), "")

    @property
    def grounded(self) -> bool:
        """Built with retrieved passages (data.mode grounded): its prompt is rebuilt from the current KB."""
        return isinstance(self.meta.get("passages"), list) and isinstance(self.meta.get("question"), str)

    @property
    def answer(self) -> str:
        """The last assistant turn (the expected answer)."""
        return next((m["content"] for m in reversed(self.messages or []) if m["role"] == "assistant"), "")

    def prompt_messages(self) -> list[dict]:
        """The conversation up to (not including) the last assistant turn: what generation is given."""
        messages = list(self.messages or [])
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        return [{"role": m["role"], "content": m["content"]} for m in messages]


def _check_messages(messages, path, line) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise located(path, line, '"messages" must be a non-empty list of {role, content}')
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise located(path, line, f"each message needs a role in {sorted(ROLES)}, got {message!r:.60}")
        if not isinstance(message.get("content"), str):
            raise located(path, line, f"message content must be a string (role {message.get('role')})")
    if not any(m["role"] == "assistant" for m in messages):
        raise located(path, line, "a chat row needs at least one assistant message to learn from")
    return _check_answer(messages, path, line)


def _check_answer(messages: list[dict], path, line, what: str = "the last assistant message") -> list[dict]:
    """An empty last answer would teach the model to answer with nothing but the end token; `what` names it as the
    row's format does."""
    if not next(m["content"] for m in reversed(messages) if m["role"] == "assistant").strip():
        raise located(path, line, f"{what} is empty: give the answer to learn, or drop the row")
    return messages


def parse_row(row: dict, path, line: int) -> Example:
    meta = row.get("meta") or {}
    if not isinstance(meta, dict):
        raise located(path, line, '"meta" must be an object, e.g. {"doc_id": "vpn-setup", "answerable": true}')
    if not isinstance(meta.get("doc_id"), (str, type(None))):
        raise located(path, line, 'meta "doc_id" must be a KB doc id (a string) or null')
    if not isinstance(meta.get("answerable", True), bool):
        raise located(path, line, 'meta "answerable" must be true or false')
    if "messages" in row:
        return Example(_check_messages(row["messages"], path, line), meta=meta, line=line)
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise located(path, line, '"prompt" and "completion" must both be strings')
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return Example(_check_answer(messages, path, line, '"completion"'), meta=meta, line=line)
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise located(path, line, '"text" must be a non-empty string')
        turns = _CHATML_TURN.findall(row["text"])
        if turns and any(role == "assistant" for role, _ in turns):  # ChatML text: recover turns to mask them
            messages = _check_answer([{"role": r, "content": c} for r, c in turns], path, line)
            return Example(messages, text=row["text"], meta=meta, line=line)
        return Example(None, text=row["text"], meta=meta, line=line)
    raise located(path, line, 'unknown row format: expected "messages", "prompt"/"completion" or "text"')


def read_examples(path: str | Path) -> list[Example]:
    examples = [parse_row(row, path, line) for line, row in read_jsonl(path)]
    if not examples:
        raise UserError(f"{path}: no rows")
    return examples


def encode_example(tokenizer: ChatTokenizer, example: Example, max_length: int) -> Encoded:
    if example.messages is not None:
        return encode_messages(tokenizer, example.messages, max_length)
    return encode_text(tokenizer, example.text, max_length)


def encode_rows(tokenizer: ChatTokenizer, examples: list[Example], max_length: int) -> list[Encoded]:
    """Every row encoded and cut to max_length; none dropped."""
    return [encode_example(tokenizer, e, max_length) for e in examples]


def encode_all(tokenizer: ChatTokenizer, examples: list[Example], max_length: int) -> tuple[list[Encoded], int]:
    """Encode rows; drop those left with nothing to learn after truncation. Returns (rows, dropped)."""
    encoded = encode_rows(tokenizer, examples, max_length)
    kept = [e for e in encoded if e.supervised > 0]
    return kept, len(encoded) - len(kept)


def length_warnings(path, encoded: list[Encoded], max_length: int, setting: str = "train.max_length") -> list[str]:
    """Warnings (for stderr) about rows longer than max_length: cut ones train on a partial answer, and dropped
    ones (nothing of the answer fits) not at all; either way the model learns less of the KB than it shows."""
    cut = [e for e in encoded if e.truncated and e.supervised > 0]
    dropped = [e for e in encoded if e.truncated and e.supervised == 0]
    if not cut and not dropped:
        return []
    longest = max(e.full_length for e in cut + dropped)
    limit = f"{setting}={max_length} tokens (the longest row has {longest})"
    warnings = []
    if cut:
        warnings.append(
            f"warning: {path}: {len(cut)} of {len(encoded)} rows are longer than {limit} and their answers are "
            f"cut, so the model learns those KB texts only in part; raise {setting} or shorten the KB texts"
        )
    if dropped:
        warnings.append(
            f"warning: {path}: {len(dropped)} of {len(encoded)} rows dropped: no answer token fits in {limit}; "
            f"raise {setting} or shorten the questions, the system prompt or the KB texts"
        )
    return warnings


def describe(examples: list[Example]) -> dict:
    """Format and content statistics for `data check`."""
    kinds = Counter("text" if e.messages is None else "chat" for e in examples)
    turns = [sum(m["role"] == "assistant" for m in e.messages) for e in examples if e.messages]
    chars = [len(e.answer) for e in examples if e.messages]
    return {
        "rows": len(examples),
        "kinds": dict(kinds),
        "multi_turn_rows": sum(t > 1 for t in turns),
        "answerable": sum(bool(e.meta.get("answerable")) for e in examples if "answerable" in e.meta),
        "unanswerable": sum(not e.meta.get("answerable") for e in examples if "answerable" in e.meta),
        "mean_answer_chars": round(sum(chars) / len(chars), 1) if chars else 0,
    }


def taught_refusal(examples) -> str | None:
    """The refusal the data taught: the most common expected answer of its unanswerable rows (None: it has none)."""
    seen = Counter(e.answer for e in examples if (e.meta or {}).get("answerable") is False)
    return seen.most_common(1)[0][0] if seen else None
