"""One worker thread owns the model: it drains waiting prompts into batched generate calls and decides their answers."""

from __future__ import annotations

import dataclasses
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from mlx_lora.data.grounded import familiar
from mlx_lora.serve.protocol import cut_at_stop


@dataclass
class Job:
    """One question waiting for the model; `answering` is the decision state it was asked under."""

    question: str
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    answering: object
    shown: list[str] = field(default_factory=list)  # doc ids of the passages the prompt shows (grounded runs)
    future: Future = field(default_factory=Future)  # a thread-safe future: the request awaits it wrapped
    cancelled: bool = False  # the client left: skipped if not yet generating, its result dropped otherwise

    @property
    def gone(self) -> bool:
        return self.cancelled or self.future.cancelled()

    def settle(self, value=None, error: BaseException | None = None) -> None:
        try:
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)
        except InvalidStateError:  # cancelled meanwhile: nobody waits
            pass


@dataclass
class Generated:
    """The model's answer to a job and the decision taken on it."""

    raw: str  # decoded model answer, cut at a stop sequence
    decision: object
    tokens: int
    finish: str  # "stop" or "length"


@dataclass
class Stats:
    batch_sizes: list[int] = field(default_factory=list)  # every generate call's number of prompts, in order
    generated: int = 0
    skipped: int = 0  # jobs whose client left before their batch started


class Batcher:
    """Questions that need the model queue here; one thread takes the first, waits `window_s` for more (up to
    `max_batch`), and generates them in one batched call of the backend, then decides all their answers at once.

    One thread because the model is one: backends are not safe to call from two threads at once, and a batch of
    8 costs little more than one answer (decoding is memory-bound). The thread also loads the model, so a
    framework that binds its state to a thread (MLX streams) sees one thread only."""

    def __init__(
        self,
        load: Callable[[], tuple],
        generate_cfg,
        max_batch: int = 8,
        window_s: float = 0.015,
        decide_lock=None,
        upstream: Callable[[], bool] = lambda: False,
        hold_s: float = 0.2,
    ):
        self._load, self.generate_cfg = load, generate_cfg
        # While questions are still in the decision layer's first look (upstream() is true), a batch waits for
        # them past the window, up to hold_s: they arrived together and may need the model too.
        self.upstream, self.hold_s = upstream, hold_s
        self.decide_lock = decide_lock or threading.Lock()  # shared with the other thread that uses the decider
        self.max_batch, self.window_s = max(1, max_batch), max(0.0, window_s)
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.stats = Stats()
        self.backend = self.loaded = self.tokenizer = self.system_prompt = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self.pending = 0  # jobs queued or generating: the slots in use
        self._count = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="mlx-lora-generate", daemon=True)

    def start(self) -> None:
        """Load the model in the worker thread and wait for it; a loading error is raised here."""
        self.thread.start()
        self._ready.wait()
        if self.error is not None:
            raise self.error

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def submit(self, job: Job) -> None:
        with self._count:
            self.pending += 1
        self.queue.put(job)

    def _done(self, n: int) -> None:
        with self._count:
            self.pending -= n

    def stop(self) -> None:
        self.queue.put(None)

    def _run(self) -> None:
        try:
            self.backend, self.loaded, self.tokenizer, self.system_prompt = self._load()
        except BaseException as exc:  # handed to start(), which re-raises it in the caller's thread
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        while (batch := self._next_batch()) is not None:
            live = [job for job in batch if not job.gone]
            self.stats.skipped += len(batch) - len(live)
            groups: dict[tuple, list[Job]] = {}
            for job in live:  # one generate call takes one sampling setting
                groups.setdefault((job.temperature, job.top_p), []).append(job)
            try:
                for group in groups.values():
                    self._generate(group)
            finally:
                self._done(len(batch))

    def _next_batch(self) -> list[Job] | None:
        first = self.queue.get()
        if first is None:
            return None
        batch, began = [first], time.monotonic()
        deadline, hold = began + self.window_s, began + max(self.window_s, self.hold_s)
        while len(batch) < self.max_batch:
            now = time.monotonic()
            try:
                if now < deadline:
                    job = self.queue.get(timeout=deadline - now)
                elif now < hold and self.upstream():  # questions still in the first look may join
                    job = self.queue.get(timeout=min(0.005, hold - now))
                else:
                    job = self.queue.get_nowait()
            except queue.Empty:
                if time.monotonic() < hold and self.upstream():
                    continue
                break
            if job is None:
                self.queue.put(None)  # stop after this batch
                break
            batch.append(job)
        return batch

    def _generate(self, jobs: list[Job]) -> None:
        try:
            longest = max(job.max_tokens for job in jobs)
            cfg = dataclasses.replace(
                self.generate_cfg,
                max_new_tokens=longest,
                temperature=jobs[0].temperature,
                top_p=jobs[0].top_p,
                batch_size=len(jobs),
            )
            self.stats.batch_sizes.append(len(jobs))
            biased = [familiar(job.shown, job.answering.passages) for job in jobs]
            prompts = [job.prompt for job in jobs]
            new_ids = self.backend.generate(self.loaded, prompts, cfg, self.tokenizer.stop_ids(), biased=biased)
            self.stats.generated += len(jobs)
            answers = []
            for job, ids in zip(jobs, new_ids):
                ids = list(ids)[: job.max_tokens]  # each row keeps its own limit: the first tokens of a longer run
                text, stopped = cut_at_stop(self.tokenizer.decode(ids).strip(), job.stop)
                finish = "length" if len(ids) >= job.max_tokens and not stopped else "stop"
                text = job.answering.with_doc_id(text.strip() if stopped else text, job.shown)
                answers.append((text, len(ids), finish))
            decided = {}
            for state in {id(job.answering): job.answering for job in jobs}.values():  # a reload may split a batch
                mine = [i for i, job in enumerate(jobs) if job.answering is state]
                with self.decide_lock:
                    decisions = state.decide([jobs[i].question for i in mine], [answers[i][0] for i in mine])
                decided.update(zip(mine, decisions))
            for i, job in enumerate(jobs):
                text, tokens, finish = answers[i]
                job.settle(Generated(text, decided[i], tokens, finish))
        except Exception as exc:  # every waiting request gets the error; the worker stays up for the next batch
            print(f"error: generation failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            for job in jobs:
                job.settle(None, exc)
