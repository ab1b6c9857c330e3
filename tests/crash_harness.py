"""The crash harness: a warm runner process that forks each command and SIGKILLs it before its k-th change to the
file system (tests/crash_runner.py), and the checks of what a killed command leaves behind."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO

RUNNER = Path(__file__).with_name("crash_runner.py")
# Imported once by the runner; each forked child starts warm (torch alone takes ~5 s to import here).
PRELOAD = [
    "mlx_lora.cli",
    "mlx_lora.data.dataset",
    "mlx_lora.evaluation.run",
    "mlx_lora.evaluation.diagnose",
    "mlx_lora.backends.adapters",
    "mlx_lora.training.run",
    "torch",
    "transformers",
    "peft",
    "mlx_lora.backends.torch.model",
    "mlx_lora.backends.torch.engine",
    "sklearn.linear_model",  # the semantic route's classifier: 2.2 s of imports per eval otherwise
    "sklearn.feature_extraction.text",
    "matplotlib.pyplot",  # the run's plots: 1.3 s of imports per training run otherwise
]
SPLIT_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl", "stats.json")


@dataclass
class Outcome:
    code: int | None  # exit status, or None when killed
    signal: int | None
    ops: list[list]  # [n, op, path, ...] per change, paths relative to the job's root
    output: str

    def where(self) -> str:
        return f"killed before change {self.ops[-1]}" if self.ops else "killed before any change"


class Harness:
    """The runner process: one job at a time, each in a forked child."""

    def __init__(self, logs: Path):
        # An empty model cache: nothing outside the test's folders is read or written.
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLX_LORA_CACHE": str(logs / "cache")}
        env["MPLBACKEND"] = "Agg"
        self.proc = subprocess.Popen(
            [sys.executable, str(RUNNER), *PRELOAD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        self.logs, self.jobs = logs, 0
        self.ready = json.loads(self._answer(120))

    def _answer(self, timeout: float) -> str:
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.proc.kill()
            raise AssertionError(f"crash runner gave no answer in {timeout} s")
        return self.proc.stdout.readline()

    def run(self, argv: list[str], root: Path, kill_at: int | None = None) -> Outcome:
        self.jobs += 1
        log, output = self.logs / f"{self.jobs}.log", self.logs / f"{self.jobs}.out"
        job = {"argv": [str(a) for a in argv], "root": str(root), "kill_at": kill_at, "log": str(log)}
        self.proc.stdin.write(json.dumps({**job, "output": str(output)}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self._answer(300))
        ops = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return Outcome(answer.get("code"), answer.get("signal"), ops, output.read_text(errors="replace"))

    def close(self) -> None:
        self.proc.kill()  # it holds nothing: no need to wait ~2.5 s for torch's interpreter shutdown
        self.proc.wait(timeout=30)
        self.proc.stdin.close()
        self.proc.stdout.close()


def killed(outcome: Outcome, k: int) -> None:
    assert outcome.signal == signal.SIGKILL, f"change {k} was never reached (exit {outcome.code}): {outcome.output}"


def contents(folder: Path, names) -> tuple | None:
    """The files' bytes (None for a missing one), or None when the folder itself is missing."""
    if not folder.is_dir():
        return None
    return tuple((folder / n).read_bytes() if (folder / n).is_file() else None for n in names)


def restore(saved: Path, work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(saved, work, symlinks=True)


def in_window(outcome: Outcome, name: str) -> str | None:
    """The generation a kill left a missing `name` in, when that is the first switch's documented window: the
    plain folder renamed to its generation name, the link not yet renamed onto it."""
    ops = outcome.ops
    if len(ops) >= 2 and ops[-1][1] == "replace" and ops[-1][3] == name and ops[-2][1:3] == ["rename", name]:
        return ops[-2][3]
    return None


def debris(work: Path, target: str, names) -> list[str]:
    """What is beside or inside target other than its one generation and its files."""
    link = os.readlink(work / target) if (work / target).is_symlink() else None
    found = [e for e in os.listdir(work) if e not in (target, link)] + ([] if link else [f"{target} is not a link"])
    return found + [f"{target}/{e}" for e in os.listdir(work / target) if e not in names]


def modes(folder: Path) -> set[str]:
    """Modes that differ from 0644 (files) / 0755 (folders)."""
    bad = set()
    for path in [folder, *folder.rglob("*")]:
        want = 0o755 if path.is_dir() else 0o644
        if path.stat().st_mode & 0o777 != want:
            bad.add(f"{path.name}: {oct(path.stat().st_mode & 0o777)}")
    return bad


def kill_points(ops) -> list[int]:
    """Before every change, except the 2nd and later of a run of file writes or of unlinks inside one removal:
    a kill among those leaves the same visible state as before the first (files in a folder being written or
    removed under a temp name), and skipping them halves the harness's time."""
    points = []
    for before, op in zip([None, *ops], ops):
        repeat = before is not None and op[1] == before[1] and (op[1] in ("write", "create") or "@" in op[1])
        if not repeat:
            points.append(op[0])
    return points


def sweep(harness, tmp_path, target: str, names, command, check_whole, start: str) -> int:
    """Kill the new write before each of its changes over the old output (a generation of this version, or a
    plain folder as earlier versions left it); check what is left, then that the next write cleans up."""
    work, saved = tmp_path / "work", tmp_path / "saved"
    assert command(work, "old").code == 0
    if start == "plain" and (work / target).is_symlink():  # what earlier versions wrote: a real folder
        real = (work / target).resolve()
        (work / target).unlink()
        shutil.move(real, work / target)
    shutil.copytree(work, saved, symlinks=True)
    old = contents(work / target, names)
    dry = command(work, "new")
    assert dry.code == 0, dry.output
    new = contents(work / target, names)
    assert old != new and None not in old and None not in new
    mixed, unclean = [], []
    for k in kill_points(dry.ops):
        restore(saved, work)
        got = command(work, "new", k)
        killed(got, k)
        now = contents(work / target, names)
        if now is None and not os.path.lexists(work / target):
            generation = in_window(got, target)  # the one documented window (first switch of a plain folder)
            if generation is None or contents(work / generation, names) != old:
                mixed.append(f"{got.where()}: {target} is missing")
        elif not check_whole(now, old, new):
            mixed.append(f"{got.where()}: {target} holds a mix of old and new files")
        again = command(work, "new")
        assert again.code == 0, again.output
        if not check_whole(contents(work / target, names), new, new) or debris(work, target, names):
            unclean.append(f"{got.where()}, then a write: {debris(work, target, names)}")
    assert not mixed, "\n".join(mixed)
    assert not unclean, "\n".join(unclean)
    assert not modes((work / target).resolve())
    return len(kill_points(dry.ops))
