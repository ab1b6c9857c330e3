"""train.report_to: tensorboard writes the events' scalars as TensorBoard event files; off, it imports nothing."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
from test_events import _evals, _steps

from mlx_lora.core.errors import UserError
from mlx_lora.training import events
from mlx_lora.training.listeners import standard_listeners

START = {
    "type": "start",
    "total_steps": 4,
    "epochs": 1,
    "train_rows": 8,
    "valid_rows": 2,
    "trainable_params": 10,
    "total_params": 100,
    "backend": "torch",
    "device": "cpu",
}
DONE = {"type": "done", "steps": 4, "stopped": "max_steps", "best_eval_loss": 1.5, "best_step": 4, "elapsed_s": 4.0}


def read_scalars(folder) -> dict[str, dict[int, float]]:
    """tag → step → value from every event file in folder (TFRecord framing: length, crc, Event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    found: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack_from("<Q", data, at)
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                found.setdefault(value.tag, {})[event.step] = value.simple_value
    return found


def test_tensorboard_gets_every_step_and_eval_scalar(tmp_path):
    pytest.importorskip("tensorboardX")
    on_event = standard_listeners(tmp_path, False, "tensorboard")
    for record in [START, *_steps([3.0, 2.0, 1.5, 1.2]), *_evals([(2, 2.5), (4, 1.5)]), DONE]:
        on_event(events.from_dict(record))
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == pytest.approx({1: 3.0, 2: 2.0, 3: 1.5, 4: 1.2})  # stored as float32
    assert scalars["valid/loss"] == {2: 2.5, 4: 1.5}
    assert scalars["train/tokens_per_s"][4] == pytest.approx(1003.0)
    assert set(scalars) >= {"train/lr", "train/grad_norm", "train/supervised_tokens_per_s", "train/memory_mb"}


def test_missing_tensorboardx_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed
    with pytest.raises(
        UserError, match=r"train.report_to: tensorboard needs tensorboardX: pip install -e '.\[tensorboard\]'"
    ):
        standard_listeners(tmp_path, False, "tensorboard")


def test_off_by_default_and_imports_nothing(tmp_path):
    code = (
        "import sys; from mlx_lora.training.listeners import standard_listeners; "
        f"standard_listeners({str(tmp_path)!r}, False); assert 'tensorboardX' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
    assert not (tmp_path / "tensorboard").exists()
