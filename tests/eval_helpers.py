"""Hand-made evaluation rows and chat examples shared by the scoring and evaluation tests."""

from __future__ import annotations

from mlx_lora.data.formats import Example
from mlx_lora.data.similarity import REFUSAL
from mlx_lora.evaluation.scoring import bucket


def row(sim, expected="vpn", predicted="vpn", source="MODEL_GENERATED", char=None, question="q"):
    answerable = expected != REFUSAL
    return {
        "question": question,
        "expected": "e",
        "generated": "g",
        "expected_doc": expected,
        "answerable": answerable,
        "similarity": sim,
        "char": sim if char is None else char,
        "bucket": bucket(sim),
        "predicted_doc": predicted,
        "predicted_score": sim,
        "refused": predicted == REFUSAL,
        "source": source,
        "detail": {},
    }


def chat(question, answer, doc_id):
    return Example(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        meta={"doc_id": doc_id, "answerable": doc_id is not None},
    )
