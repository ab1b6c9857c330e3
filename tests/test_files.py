"""Output files: the run-folder lock (one holder; a killed holder leaves it free)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mlx_lora.core.errors import UserError
from mlx_lora.core.files import locked


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    with locked(tmp_path / "run", "training run"):
        with pytest.raises(UserError, match=rf"in use by another training run \(pid {os.getpid()}\)"):
            with locked(tmp_path / "run", "training run"):
                pass
    with locked(tmp_path / "run", "training run"):  # released on exit
        pass


def test_a_lock_left_by_a_killed_process_is_free_again(tmp_path):
    code = (
        f"from mlx_lora.core.files import locked\nwith locked({str(tmp_path)!r}, 'x'):\n"
        " print('held', flush=True)\n input()"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            with locked(tmp_path, "x"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the lock with the process
        try:
            with locked(tmp_path, "x"):
                break
        except UserError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
