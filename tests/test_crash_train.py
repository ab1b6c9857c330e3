"""Crash test of `train` (torch): killed before each change to the run folder (tests/crash_harness.py), it leaves an
adapter that loads, a free run lock, and a resume that ends bit-identical to an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import build_tiny_model
from crash_harness import Outcome, killed

# -- train (torch): kills at the adapter's and the checkpoints' switches and removals --------------------------


def tensors(folder: Path) -> dict:
    from mlx_lora.backends.adapters import read_adapter

    return read_adapter(folder)[1]


def changes_onto(ops, dst: str) -> list[int]:
    """Changes that put something at dst: a rename (or a link renamed) onto it."""
    return [e[0] for e in ops if e[1] in ("rename", "replace") and e[3] == dst]


def removal_started(ops, match) -> int:
    """The first change inside the first removal (rmtree) of a path that `match`es and holds something: a kill
    in the middle of the removal."""
    # ops[n] is the change after change n (n counts from 1)
    return next(e[0] + 1 for e in ops[:-1] if e[1] == "rmtree" and match(e[2]) and ops[e[0]][1].endswith("@rmtree"))


def test_train_killed_keeps_a_loadable_adapter_a_free_lock_and_resumes_bit_identical(
    harness, tmp_path, tiny_kb, tiny_questions, qwen_tokenizer_dir
):
    from mlx_lora.core.errors import UserError
    from mlx_lora.core.files import locked

    model = build_tiny_model(tmp_path / "model", tokenizer_dir=qwen_tokenizer_dir, layers=2)
    data = tmp_path / "data"
    argv = ["data", "build", "--kb", tiny_kb, "--questions", tiny_questions, "--out", data]
    assert harness.run(argv, tmp_path).code == 0
    settings = {
        "train.eval_every": 1,
        "train.batch_size": 2,
        "train.grad_accum": 1,
        "train.lr": 0.01,
        "train.warmup_steps": 0,
        "train.max_length": 64,
        "lora.rank": 4,
        "lora.dropout": 0.1,  # dropout draws random numbers: they must replay identically after a resume
    }
    sets = [a for key, value in settings.items() for a in ("--set", f"{key}={value}")]

    def train(run: Path, kill_at=None, resume=False) -> Outcome:
        argv = ["train", "--backend", "torch", "--model", model, "--data", data, "--out", run, "--max-steps", 3]
        return harness.run([*argv, *sets, "--no-progress", *(["--resume", run] if resume else [])], run, kill_at)

    whole = train(tmp_path / "whole")
    assert whole.code == 0, whole.output
    adapter_switches = changes_onto(whole.ops, "adapter")
    assert len(adapter_switches) >= 2, "the run must publish a better adapter at least twice"
    # Each point costs a killed run and a resumed one (~6 s together here): the switches and removals of the
    # adapter and of the checkpoints, where earlier versions left no adapter or half of one.
    points = {
        "before the last adapter switch": adapter_switches[-1],  # the resume must publish the best one itself
        "while the replaced adapter is removed": removal_started(
            whole.ops, lambda p: p == "adapter" or p.startswith(".adapter.")
        ),
        "while an old checkpoint is removed": removal_started(whole.ops, lambda p: p.startswith("checkpoints/")),
        "before checkpoint 2 is switched in": changes_onto(whole.ops, "checkpoints/step-2")[0],
    }
    reference = tensors(tmp_path / "whole" / "adapter")
    latest = tensors(tmp_path / "whole" / "checkpoints" / "step-3" / "adapter")
    problems = []
    for what, k in points.items():
        run = tmp_path / f"run-{k}"
        got = train(run, kill_at=k)
        killed(got, k)
        where = f"killed {what} ({got.where()})"
        if any(s < k for s in adapter_switches):  # an adapter was published before the kill: it still loads,
            try:  # whole: it is the adapter of one of the kept checkpoints
                adapter = tensors(run / "adapter")
                kept = [tensors(c / "adapter") for c in (run / "checkpoints").glob("step-*")]
                if not any(same(adapter, c) for c in kept):
                    problems.append(f"{where}: the adapter is no checkpoint's")
            except UserError as exc:
                problems.append(f"{where}: the adapter does not load: {exc}")
        with locked(run, "training run"):  # the killed run's lock is free
            pass
        again = train(run, resume=True)
        if again.code != 0:
            problems.append(f"{where}: the resume failed: {again.output[-300:]}")
        elif not same(tensors(run / "adapter"), reference):
            problems.append(f"{where}, then resumed: the adapter differs from the uninterrupted run's")
        elif not same(tensors(run / "checkpoints" / "step-3" / "adapter"), latest):
            problems.append(f"{where}, then resumed: the last checkpoint differs from the uninterrupted run's")
    assert not problems, "\n".join(problems)


def same(a: dict, b: dict) -> bool:
    """Bit-identical tensors."""
    return a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
