"""Training-event listeners: the progress bar, metrics.jsonl, the plots and TensorBoard, fed by the shared loop."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from mlx_lora.core.environment import main_process
from mlx_lora.core.errors import UserError
from mlx_lora.core.files import append_text
from mlx_lora.training import events
from mlx_lora.training.summary import write_plots


class ProgressBar:
    """tqdm on stderr (stdout stays clean for results): loss, tok/s, and tqdm's own ETA."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar = enabled, None

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.Start):
            from tqdm import tqdm

            self.bar = tqdm(
                total=event.total_steps,
                desc="train",
                unit="step",
                file=sys.stderr,
                disable=not self.enabled,
                dynamic_ncols=True,
            )
        elif self.bar is None:
            return
        elif isinstance(event, events.Step):
            self.bar.update(event.step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{event.loss:.4f}",
                tok_s=f"{event.tokens_per_s:.0f}",
                gnorm=f"{event.grad_norm:.2f}",
                refresh=False,
            )
        elif isinstance(event, events.Eval):
            self._write(f"step {event.step}: eval loss {event.eval_loss:.4f}" + (" (best)" if event.best else ""))
        elif isinstance(event, events.Warning):
            self._write(f"warning: {event.message}")
        elif isinstance(event, events.Done):
            self.bar.close()

    def _write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=sys.stderr)


class MetricsWriter:
    """Every event as one JSON line, appended (a resumed run continues the same file), flushed per line."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __call__(self, event: events.Event) -> None:
        append_text(self.path, json.dumps(event.to_dict(), ensure_ascii=False) + "\n")


class PlotWriter:
    """Redraws the PNGs at each eval from metrics.jsonl (a resumed run plots its whole history); `finish` draws the
    last ones."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.Eval):  # not on Done: finish() draws the final plots right after it
            write_plots(self.run_dir)


class TensorBoardWriter:
    """The scalars the events carry as TensorBoard event files (tensorboardX, imported only when asked for): per
    step loss, lr, grad_norm, throughput and memory; per eval the valid loss. A resumed run adds a new event file,
    and TensorBoard shows the steps it repeats once more."""

    STEP_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "supervised_tokens_per_s", "memory_mb")
    INSTALL = "pip install -e '.[tensorboard]'"

    def __init__(self, log_dir: Path):
        if importlib.util.find_spec("tensorboardX") is None:  # said before training starts, not at its first step
            raise UserError(f"config key train.report_to: tensorboard needs tensorboardX: {self.INSTALL}")
        self.log_dir, self.writer = Path(log_dir), None

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.Start):
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir))
        elif self.writer is None:
            return
        elif isinstance(event, events.Step):
            for name in self.STEP_SCALARS:
                self.writer.add_scalar(f"train/{name}", getattr(event, name), event.step)
        elif isinstance(event, events.Eval):
            self.writer.add_scalar("valid/loss", event.eval_loss, event.step)
            self.writer.flush()
        elif isinstance(event, events.Done):
            self.writer.close()
            self.writer = None


def standard_listeners(run_dir: str | Path, progress: bool = True, report_to: str = "none") -> events.OnEvent:
    """One on_event callable feeding the progress bar, metrics.jsonl, the plots and, with report_to tensorboard,
    TensorBoard's event files."""
    if not main_process():
        return lambda event: None
    run_dir = Path(run_dir)
    listeners = [MetricsWriter(run_dir / "metrics.jsonl"), ProgressBar(progress), PlotWriter(run_dir)]
    if report_to == "tensorboard":
        listeners.append(TensorBoardWriter(run_dir / "tensorboard"))

    def on_event(event: events.Event) -> None:
        for listener in listeners:
            listener(event)

    return on_event
