"""What the server holds: the model (through the batcher), the swappable decision state, the audit log, the settings."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from mlx_lora.answer.service import Answering, build_answering, run_splits
from mlx_lora.core.config import Config
from mlx_lora.core.errors import UserError
from mlx_lora.data.similarity import make_scorer
from mlx_lora.serve.audit import AuditLog
from mlx_lora.serve.batcher import Batcher, Generated, Job
from mlx_lora.serve.gather import Gather
from mlx_lora.serve.protocol import ApiError, ChatRequest


@dataclass
class ServeSettings:
    """Limits and knobs of one server (the command's options)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    name: str | None = None  # the model id clients send; default: the run folder's name
    max_batch: int = 8
    window_ms: float = 15.0
    hold_ms: float = 200.0  # a batch waits up to this long for questions still in the decision layer's first look
    max_tokens_cap: int = 1024
    max_body_bytes: int = 256 * 1024
    max_prompt_tokens: int = 4096
    max_pending: int = 256  # requests waiting for the model at once; more get 503
    max_cached_embeddings: int = 100_000  # question/answer embeddings kept (~200 MB at USE's 512 floats)
    audit_path: str | None = None
    audit_max_bytes: int = 50 * 2**20
    audit_keep: int = 3


@dataclass(frozen=True)
class Prepared:
    """A request after the decision layer's first look: settled (decision) or waiting for the model (prompt)."""

    request: ChatRequest
    request_id: str
    started: float
    answering: Answering
    decision: object | None
    job: Job | None  # queued for the model (already: see Service._first_looks)


@dataclass(frozen=True)
class Outcome:
    answer: str
    source: str
    detail: dict
    model_answer: str | None  # the model's own answer when it ran, else None
    finish: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float

    def field(self, request_id: str, replaced_only) -> dict:
        """The `mlx_lora` field of a response: where the answer came from."""
        detail = self.detail
        return {
            "source": self.source,
            "doc_id": detail.get("doc_id"),
            "rule_id": detail.get("rule") or detail.get("rule_checked") or (detail.get("append") or {}).get("rule"),
            "model_answer": replaced_only,
            "request_id": request_id,
            "latency_ms": self.latency_ms,
        }


class Service:
    """The model is loaded once; the decision state (KB, rules, route, passage index) is an immutable Answering,
    replaced whole by reload(): a request reads `self.answering` once and keeps that object to its end, so a
    reload never changes a decision half-way and never drops a request in flight."""

    def __init__(self, cfg: Config, adapter: str, model: str | None, rules_path, settings: ServeSettings, **load):
        self.cfg, self.adapter, self.model, self.rules_path, self.settings = cfg, adapter, model, rules_path, settings
        self.name = settings.name or Path(adapter).resolve().name
        self._load_options = load
        self.answering: Answering | None = None
        self.batcher: Batcher | None = None
        self.reloads = 0
        self._reload_lock = threading.Lock()
        self._decide_lock = threading.Lock()  # the decider's classifiers and embedder are used by one thread at a time
        audit = settings.audit_path or str(Path(adapter) / "serve-audit.jsonl")
        self.audit = AuditLog(audit, settings.audit_max_bytes, settings.audit_keep)
        self._scorer = self._splits = None
        self._first_look: Gather | None = None  # batches the decision layer's first look at each question

    def start(self) -> None:
        """Load the model (in the worker thread), then build the decision state; errors are UserErrors."""
        from mlx_lora.backends.loading import load_for_generation

        def load():
            return load_for_generation(self.model, self.adapter, self.cfg, **self._load_options)

        self._first_look = Gather(self._first_looks, name="mlx-lora-first-look")
        self.batcher = Batcher(
            load,
            self.cfg.generate,
            self.settings.max_batch,
            self.settings.window_ms / 1000,
            self._decide_lock,
            upstream=lambda: self._first_look.in_flight > 0,
            hold_s=self.settings.hold_ms / 1000,
        )
        self.batcher.start()  # applies the run's prompt settings (data.mode, passages, …) to cfg
        self._scorer = make_scorer(self.cfg.eval.embedder)
        if hasattr(self._scorer, "max_cached"):  # every new question is embedded: keep memory bounded
            self._scorer.max_cached = self.settings.max_cached_embeddings
        self._splits = run_splits(self.cfg, self.adapter)
        self.answering = self._build()
        for note in self.answering.notes:
            print(f"note: {note}", file=sys.stderr)

    def _build(self) -> Answering:
        loaded = self.batcher  # its tokenizer and system prompt fit grounded prompts as training did
        splits = self._splits
        return build_answering(
            self.cfg, self.adapter, self.rules_path, self._scorer, splits, loaded.tokenizer, loaded.system_prompt
        )

    @property
    def pending(self) -> int:
        """Requests queued for the model or in its batch: the slots in use (a client that leaves frees its own)."""
        return self.batcher.pending if self.batcher is not None else 0

    @property
    def ready(self) -> bool:
        return self.answering is not None and self.batcher is not None and self.batcher.alive

    def reload(self) -> dict:
        """Re-read the rules file and the KB and swap in a new decision state; on any error the old one stays and
        the UserError (one line naming the file) goes to the caller."""
        with self._reload_lock:
            started = time.perf_counter()
            fresh = self._build()
            self.answering = fresh  # one reference assignment: requests see the old state or the new one
            self.reloads += 1
            return {
                "reloaded": True,
                "reloads": self.reloads,
                "rules": fresh.rules,
                "kb_docs": fresh.kb_docs,
                "seconds": round(time.perf_counter() - started, 3),
            }

    def reload_logged(self) -> None:
        """SIGHUP's reload: the outcome is one line on stderr."""
        try:
            info = self.reload()
            print(f"reloaded: {info['rules']} rules, {info['kb_docs']} KB docs", file=sys.stderr)
        except UserError as exc:
            print(f"error: reload failed, keeping the previous rules and KB: {exc}", file=sys.stderr)

    def status(self) -> dict:
        stats = self.batcher.stats if self.batcher else None
        return {
            "ready": self.ready,
            "model": self.batcher is not None and self.batcher.alive,
            "index": self.answering is not None,
            "reloads": self.reloads,
            "pending": self.pending,
            "rules": self.answering.rules if self.answering else None,
            "kb_docs": self.answering.kb_docs if self.answering else None,
            "batches": len(stats.batch_sizes) if stats else 0,
        }

    # --- answering one request -------------------------------------------------------------------------------

    def _first_looks(self, items: list[tuple[ChatRequest, Answering]]) -> list:
        """The decision layer's model-free part for a batch of requests: per request (its settled decision, None),
        or (None, the Job now queued for the model), or the request's ApiError.

        A job is queued from here, not by the request, so that the batcher, which waits while first looks are in
        flight, sees it before it stops waiting."""
        out: list = [None] * len(items)
        for answering in {id(a): a for _, a in items}.values():  # a reload may split a batch
            mine = [i for i, (_, a) in enumerate(items) if a is answering]
            with self._decide_lock:
                settled = answering.settled([items[i][0].question for i in mine])
            for i, decision in zip(mine, settled):
                out[i] = (decision, None) if decision is not None else self._queue(items[i][0], answering)
        return out

    def _queue(self, request: ChatRequest, answering: Answering):
        batcher = self.batcher
        content, shown = answering.prompt(request.question)
        turn = {"role": "user", "content": content}
        # Message text is encoded as plain text (data/render.py): a `<|im_start|>` typed into a question stays text.
        prompt = batcher.tokenizer.prompt_ids([turn], batcher.system_prompt)
        if len(prompt) > self.settings.max_prompt_tokens:
            return ApiError(
                400,
                f"the prompt has {len(prompt)} tokens; this server takes at most {self.settings.max_prompt_tokens}",
                "context_length_exceeded",
                param="messages",
            )
        if batcher.pending >= self.settings.max_pending:
            return ApiError(503, "too many requests are waiting for the model; retry shortly", "overloaded")
        job = Job(
            request.question,
            prompt,
            request.max_tokens,
            request.temperature,
            request.top_p,
            request.stop,
            answering,
            shown,
        )
        batcher.submit(job)
        return None, job

    async def prepare(self, request: ChatRequest) -> Prepared:
        """Run the decision layer's model-free part: a settled decision, or the prompt the model must answer."""
        if not self.ready:
            raise ApiError(503, "the model is not ready (loading, or its worker stopped)", "not_ready", "server_error")
        started = time.perf_counter()
        answering = self.answering  # this request's decision state, to its end
        decision, job = await self._first_look((request, answering))
        return Prepared(request, uuid.uuid4().hex[:24], started, answering, decision, job)

    async def finish(self, prepared: Prepared) -> Outcome:
        """The final decision (waiting for a batch when the model must answer), written to the audit log."""
        request = prepared.request
        raw, tokens, finish = None, 0, "stop"
        decision = prepared.decision
        if decision is None:
            job = prepared.job
            try:
                generated: Generated = await asyncio.wrap_future(job.future)
            except Exception as exc:
                raise ApiError(
                    500, f"generation failed: {type(exc).__name__}", "generation_failed", "server_error"
                ) from exc
            finally:  # also on cancellation (the client left): the worker skips the job if it has not started it
                job.cancelled = True
            raw, tokens, finish, decision = generated.raw, generated.tokens, generated.finish, generated.decision
            if decision.source != "MODEL_GENERATED":
                finish = "stop"  # the decision layer's text is whole, whatever the model's length
        latency = round((time.perf_counter() - prepared.started) * 1000, 1)
        outcome = Outcome(
            decision.answer or "",
            decision.source,
            decision.detail,
            raw,
            finish,
            len(prepared.job.prompt) if prepared.job else 0,
            tokens,
            latency,
        )
        self.audit.write(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": "serve",
                "request_id": prepared.request_id,
                "latency_ms": latency,
                "model": self.name,
                "earlier_turns": request.earlier_turns,
                "question": request.question,
                "model_answer": raw,
                "answer": outcome.answer,
                "source": outcome.source,
                "detail": outcome.detail,
            }
        )
        return outcome

    def replaced(self, outcome: Outcome, answering: Answering) -> str | None:
        """The model's own answer when the decision layer gave another, else None."""
        if outcome.model_answer is None:
            return None
        own = answering.decider.cited(outcome.model_answer)[1] or ""
        return None if own.strip() == outcome.answer.strip() else outcome.model_answer

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        if self._first_look is not None:
            self._first_look.stop()
