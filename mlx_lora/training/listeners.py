"""Training-event listeners: the progress bar, metrics.jsonl and the plots, fed by the shared loop."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlx_lora.core.environment import main_process
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


def standard_listeners(run_dir: str | Path, progress: bool = True) -> events.OnEvent:
    """One on_event callable feeding the progress bar, metrics.jsonl and the plots."""
    if not main_process():
        return lambda event: None
    run_dir = Path(run_dir)
    listeners = [MetricsWriter(run_dir / "metrics.jsonl"), ProgressBar(progress), PlotWriter(run_dir)]

    def on_event(event: events.Event) -> None:
        for listener in listeners:
            listener(event)

    return on_event
