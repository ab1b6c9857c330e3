"""The one LoRA training loop both backends share; each backend supplies only an Engine (its step)."""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlx_lora.backends.protocol import Engine
from mlx_lora.core.config import Config
from mlx_lora.core.errors import UserError
from mlx_lora.core.files import publish_dir, remove_dir, staged_dir
from mlx_lora.data.batching import epoch_batches, rank_share, steps_per_epoch, total_steps
from mlx_lora.data.render import Encoded
from mlx_lora.training import events
from mlx_lora.training.checkpoints import (
    STATE_FILE,
    STATE_FORMAT,
    find_checkpoint,
    fingerprint_mismatch,
    list_checkpoints,
    read_state,
)
from mlx_lora.training.events import OnEvent
from mlx_lora.training.schedule import lr_at

STOP_REASONS = ("completed", "max_steps", "early_stopped", "interrupted", "non_finite")
# Runs that stopped short of what was asked exit non-zero, so that scripts never read them as success: 130 is the
# shell's code for Ctrl-C; a non-finite loss is 3.
EXIT_CODES = {"interrupted": 130, "non_finite": 3}


@dataclass
class TrainOutcome:
    """How a run ended; `stopped` is one of STOP_REASONS."""

    run_dir: Path
    steps: int
    best_eval_loss: float | None
    best_step: int | None
    stopped: str
    extra: dict = field(default_factory=dict)
    # The best adapter's first-answer-token margins for the decision token on each valid row (training's own valid
    # pass, kept for the refusal bias); None when not asked, or when the best eval ran in an earlier process.
    valid_margins: list[float] | None = field(default=None, repr=False)


@dataclass
class Position:
    """Where the loop stands after `step` optimizer steps; with the seeded batch order, enough to continue exactly."""

    step: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evals since the best one (early stopping)
    last_eval_step: int = 0  # the step of the newest checkpoint
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class Plan:
    """Step accounting for one run: every rank takes the same number of accumulation groups per epoch."""

    per_epoch: int
    total: int
    capped: bool  # train.max_steps ends the run before the last epoch does

    @classmethod
    def of(cls, n_rows: int, cfg: Config, world: int = 1) -> Plan:
        t = cfg.train
        per_epoch = steps_per_epoch(n_rows, t.batch_size, t.grad_accum, world)
        total = total_steps(n_rows, t.batch_size, t.grad_accum, t.epochs, t.max_steps, world)
        return cls(per_epoch, total, total < per_epoch * t.epochs)

    def epoch_of(self, step: int) -> int:
        """1-based epoch of the last finished step."""
        return max(step - 1, 0) // self.per_epoch + 1


class _Interrupt:
    """The first Ctrl-C asks the loop to stop after the current step (and checkpoint); a second one aborts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Loop:
    """Runs an Engine over the seeded batch order: schedule, eval cadence, best/patience, retention, resume."""

    def __init__(
        self,
        engine: Engine,
        train: list[Encoded],
        valid: list[Encoded],
        cfg: Config,
        run_dir: Path,
        on_event: OnEvent,
        fingerprint: dict,
        decision_token: int | None = None,
    ):
        t = cfg.train
        if not train:
            raise UserError("no training rows with supervised tokens; check the data folder's train.jsonl")
        if t.batch_size < 1 or t.grad_accum < 1 or t.epochs < 1:
            raise UserError("train.batch_size, train.grad_accum and train.epochs must be >= 1")
        self.engine, self.train_rows, self.valid_rows, self.cfg = engine, train, valid, cfg
        self.run_dir = Path(run_dir)
        self.main = engine.rank == 0  # under torchrun only rank 0 writes files and reports
        self._on_event = on_event
        self.fingerprint = {
            **fingerprint,
            "world_size": engine.world,
            "batch_size": t.batch_size,
            "grad_accum": t.grad_accum,
            "epochs": t.epochs,
            "seed": t.seed,
            "train_rows": len(train),
            "precision": getattr(engine, "precision", "fp32"),  # bf16 rounds differently: no silent switch
        }
        self.plan = Plan.of(len(train), cfg, engine.world)
        self.pos = Position()
        self._groups: tuple[int, list] = (-1, [])
        self._error: str | None = None
        self.decision_token, self.best_margins = decision_token, None

    def emit(self, event: events.Event) -> None:
        if self.main:
            self._on_event(event)

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    # -- resume ----------------------------------------------------------------------------------------------
    def resume(self, path: Path) -> None:
        folder = find_checkpoint(path)
        state = read_state(folder, self.engine.name)
        mismatch = fingerprint_mismatch(self.fingerprint, state["fingerprint"])
        if mismatch:
            raise UserError(f"{folder}: cannot resume with other data, model or settings ({'; '.join(mismatch)})")
        self.engine.restore_state(folder)
        self.pos = Position(**state["position"])
        self.emit(events.Warning(f"resumed from {folder} at step {self.pos.step}"))
        if self.main and self.pos.best_step is not None:
            # The best adapter so far is the best checkpoint's (kept by retention): publish it again, whatever the
            # run folder holds. A kill between a checkpoint and its adapter leaves the previous best adapter there,
            # whole but older (a resume into a new --out: none); an adapter is small, so it is simply copied again.
            best = folder.parent / f"step-{self.pos.best_step}" / "adapter"
            if best.is_dir():
                publish_dir(best, self.run_dir / "adapter")

    # -- one checkpoint: eval, best adapter, retention --------------------------------------------------------
    def eval_due(self) -> bool:
        step, every = self.pos.step, self.cfg.train.eval_every
        epoch_end = step % self.plan.per_epoch == 0
        return step == self.plan.total or (every > 0 and step % every == 0) or (not every and epoch_end)

    def checkpoint(self, evaluate: bool = True) -> None:
        """Eval (when there is a valid set), checkpoint, then publish a new best adapter: every published adapter
        has its checkpoint on disk, so a run killed at any moment can resume."""
        pos, best = self.pos, False
        if evaluate and self.valid_rows:
            result = self.engine.validate(self.valid_rows, self.decision_token)
            loss = result.loss
            best = math.isfinite(loss) and (pos.best_eval_loss is None or loss < pos.best_eval_loss)
            if best:
                pos.best_eval_loss, pos.best_step, pos.bad_evals = loss, pos.step, 0
                self.best_margins = result.margins
            else:
                pos.bad_evals += 1
            self.emit(events.Eval(pos.step, self.plan.epoch_of(pos.step), loss, best))
        pos.last_eval_step = pos.step
        pos.elapsed_s = time.perf_counter() - self._started
        if self.main:
            folder = self.checkpoints / f"step-{pos.step}"
            with staged_dir(folder) as tmp:
                self.engine.save_adapter(tmp / "adapter")
                self.engine.save_state(tmp)
                state = {
                    "format": STATE_FORMAT,
                    "backend": self.engine.name,
                    "position": asdict(pos),
                    "fingerprint": self.fingerprint,
                    "total_steps": self.plan.total,
                }
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
            if best:
                publish_dir(folder / "adapter", self.run_dir / "adapter")
            keep = {pos.step, pos.best_step}  # the latest (to resume) and the best (its adapter is the run's)
            for old in list_checkpoints(self.checkpoints):
                if old not in keep:
                    _remove(self.checkpoints / f"step-{old}")
            self.emit(events.Checkpoint(pos.step, str(folder)))
        self.engine.barrier()

    def patience_spent(self) -> bool:
        patience = self.cfg.train.early_stopping_patience
        return bool(patience and self.valid_rows and self.pos.bad_evals >= patience)

    # -- the loop --------------------------------------------------------------------------------------------
    def group(self, step: int) -> list[list[Encoded]]:
        """The accumulation group of optimizer step `step` (0-based) for this rank: rows per micro-batch."""
        t = self.cfg.train
        epoch, index = divmod(step, self.plan.per_epoch)
        if self._groups[0] != epoch:  # the shared, seeded batch order: both backends see the same groups
            batches = rank_share(
                epoch_batches(self.train_rows, t.batch_size, t.seed, epoch), self.engine.rank, self.engine.world
            )
            self._groups = (epoch, [batches[i : i + t.grad_accum] for i in range(0, len(batches), t.grad_accum)])
        return [[self.train_rows[i] for i in batch] for batch in self._groups[1][index]]

    def run(self, resume: Path | None = None) -> TrainOutcome:
        t, plan, engine = self.cfg.train, self.plan, self.engine
        if resume is not None:
            self.resume(Path(resume))
        trainable, total_params = engine.param_counts()
        self.emit(
            events.Start(
                plan.total,
                t.epochs,
                len(self.train_rows),
                len(self.valid_rows),
                trainable,
                total_params,
                engine.name,
                engine.device,
            )
        )
        for note in engine.warnings:
            self.emit(events.Warning(note))
        self._started = time.perf_counter() - self.pos.elapsed_s
        stopped = None
        with _Interrupt() as interrupt:
            if self.pos.step and self.pos.last_eval_step != self.pos.step and self.eval_due():
                self.checkpoint()  # stopped between a due step and its eval: do the eval first
                stopped = "early_stopped" if self.patience_spent() else None
            while stopped is None and self.pos.step < plan.total:
                if engine.agree(interrupt.requested):  # every rank stops at the same step
                    stopped = "interrupted"
                    if self.pos.step and self.pos.last_eval_step != self.pos.step:
                        self.checkpoint(evaluate=False)  # so the run resumes from here
                    break
                lr = lr_at(self.pos.step, t.lr, t.warmup_steps, plan.total, t.schedule)
                tick = time.perf_counter()
                result = engine.step(self.group(self.pos.step), lr, self.pos.step)
                if not result.applied:
                    stopped = "non_finite"
                    self._error = self._non_finite_message(result)
                    self.emit(events.Warning(self._error))
                    break
                self.pos.step += 1
                seconds = max(time.perf_counter() - tick, 1e-9)
                self.emit(
                    events.Step(
                        self.pos.step,
                        plan.epoch_of(self.pos.step),
                        result.loss,
                        lr,
                        result.grad_norm,
                        result.tokens,
                        result.supervised_tokens,
                        result.tokens / seconds,
                        result.supervised_tokens / seconds,
                        time.perf_counter() - self._started,
                        engine.memory_mb(),
                    )
                )
                if self.eval_due():
                    self.checkpoint()
                    if self.patience_spent():
                        stopped = "early_stopped"
        stopped = stopped or ("max_steps" if plan.capped else "completed")
        return self._finish(stopped)

    def _finish(self, stopped: str) -> TrainOutcome:
        adapter = self.run_dir / "adapter"
        if self.main and (not self.valid_rows or not adapter.exists()):
            # No eval picked a best adapter: the final weights (the last good ones after a non-finite step).
            with staged_dir(adapter) as tmp:
                self.engine.save_adapter(tmp)
        self.engine.barrier()
        pos = self.pos
        if pos.best_step is not None and pos.best_step != pos.step:
            self.engine.load_adapter(adapter)  # whoever generates next with this model gets the kept adapter
        elapsed = time.perf_counter() - self._started
        self.emit(events.Done(pos.step, stopped, pos.best_eval_loss, pos.best_step, elapsed))
        return TrainOutcome(
            self.run_dir,
            pos.step,
            pos.best_eval_loss,
            pos.best_step,
            stopped,
            {
                "total_steps": self.plan.total,
                "elapsed_s": elapsed,
                "position": asdict(pos),
                **self.engine.report(),
                **({"error": self._error} if self._error else {}),
            },
            self.best_margins,
        )

    def _non_finite_message(self, result) -> str:
        pos = self.pos
        if pos.best_step is not None:
            where = (
                f"resume from checkpoints/step-{pos.best_step} (best eval loss {pos.best_eval_loss:.4f}; "
                "later weights may already be diverging) with a lower train.lr"
            )
        else:
            where = "no checkpoint has an eval loss yet: start again with a lower train.lr"
        return (
            f"loss {result.loss} / grad-norm {result.grad_norm} is not finite at step {pos.step + 1}; the step "
            f"was not applied and training stopped. {where}, or check the data"
        )


def _remove(folder: Path) -> None:
    remove_dir(folder)  # the folder leaves its name at once: a kill mid-removal never leaves a partial checkpoint


def train(
    backend,
    loaded,
    train_rows: list[Encoded],
    valid_rows: list[Encoded],
    cfg: Config,
    run_dir: Path,
    on_event: OnEvent,
    resume: Path | None = None,
    fingerprint: dict | None = None,
    decision_token: int | None = None,
) -> TrainOutcome:
    """Build the backend's engine on a loaded model and run the loop (the engine is closed whatever happens);
    `decision_token` (the refusal's first token) asks each valid pass for its margins too."""
    engine = backend.engine(loaded, cfg)
    try:
        loop = Loop(engine, train_rows, valid_rows, cfg, Path(run_dir), on_event, fingerprint or {}, decision_token)
        return loop.run(resume)
    finally:
        engine.close()
