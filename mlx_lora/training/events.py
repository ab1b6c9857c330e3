"""Typed training events: what the loop reports, what listeners, tests and metrics.jsonl share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Event:
    """Base of every event; `type` names it in metrics.jsonl."""

    type: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return {"type": self.type, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Start(Event):
    type: ClassVar[str] = "start"
    total_steps: int
    epochs: int
    train_rows: int
    valid_rows: int
    trainable_params: int
    total_params: int
    backend: str
    device: str


@dataclass(frozen=True)
class Step(Event):
    type: ClassVar[str] = "step"
    step: int
    epoch: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    supervised_tokens: int
    tokens_per_s: float
    supervised_tokens_per_s: float
    elapsed_s: float
    memory_mb: float


@dataclass(frozen=True)
class Eval(Event):
    type: ClassVar[str] = "eval"
    step: int
    epoch: int
    eval_loss: float
    best: bool


@dataclass(frozen=True)
class Checkpoint(Event):
    type: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass(frozen=True)
class Warning(Event):
    type: ClassVar[str] = "warning"
    message: str


@dataclass(frozen=True)
class Done(Event):
    type: ClassVar[str] = "done"
    steps: int
    stopped: str
    best_eval_loss: float | None
    best_step: int | None
    elapsed_s: float


KINDS: dict[str, type[Event]] = {cls.type: cls for cls in (Start, Step, Eval, Checkpoint, Warning, Done)}
OnEvent = Callable[[Event], None]


def from_dict(record: dict) -> Event:
    """The event a metrics.jsonl line holds (unknown keys are an error: the schema is this module)."""
    fields = {k: v for k, v in record.items() if k != "type"}
    return KINDS[record["type"]](**fields)
