"""The JSONL audit log: one record per decided answer (question, model answer, final answer, source, why)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mlx_lora.core.files import append_text

if TYPE_CHECKING:
    from mlx_lora.answer.decide import Decision


def audit_records(
    questions: Sequence[str], model_answers: Sequence[str | None], decisions: Sequence[Decision], **context
) -> list[dict]:
    """One JSON-able record per answer: what was asked, what the model said, what was answered, why."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return [
        {
            "time": now,
            **context,
            "question": q,
            "model_answer": m,
            "answer": d.answer,
            "source": d.source,
            "detail": d.detail,
        }
        for q, m, d in zip(questions, model_answers, decisions)
    ]


def append_audit(path: str | Path, records: Sequence[dict]) -> None:
    """Append to a JSONL audit log (one line per answer; appending keeps earlier sessions' records)."""
    append_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
