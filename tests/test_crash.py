"""Crash harness: `data build`, `eval`, `adapter convert` and `train` are killed (SIGKILL) before each change they
make to the file system (tests/crash_runner.py), and what they leave is checked: the old or the new output
whole, never a mix; an adapter that loads; a free run lock; a resume that ends bit-identical to an uninterrupted
run; and no debris once the same output is written again."""

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

import numpy as np
import pytest
from conftest import REPO, build_tiny_model
from mlx_adapter import write_mlx_adapter

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


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    runner = Harness(tmp_path_factory.mktemp("crash-logs"))
    assert runner.ready["ready"].startswith(str(REPO)), runner.ready  # the code under test is this checkout's
    yield runner
    runner.close()


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


@pytest.mark.parametrize("start", ["generation", "plain"])
def test_data_build_leaves_the_old_or_the_new_splits_whole(harness, tmp_path, tiny_kb, tiny_questions, start):
    seeds = {"old": 1, "new": 2}

    def build(work, which, kill_at=None):
        argv = ["data", "build", "--kb", tiny_kb, "--questions", tiny_questions, "--out", work / "d"]
        return harness.run([*argv, "--seed", seeds[which]], work, kill_at)

    points = sweep(harness, tmp_path, "d", SPLIT_FILES, build, lambda now, old, new: now in (old, new), start)
    assert points >= 4


def test_data_build_refuses_a_folder_with_other_files(harness, tmp_path, tiny_kb, tiny_questions):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    argv = ["data", "build", "--kb", tiny_kb, "--questions", tiny_questions, "--out", tmp_path / "mine"]
    got = harness.run(argv, tmp_path)
    assert got.code == 2 and "notes.txt" in got.output and len(got.output.strip().splitlines()) == 1, got.output
    assert os.listdir(tmp_path / "mine") == ["notes.txt"] and not (tmp_path / "mine").is_symlink()


REPORT_FILES = ("report.json", "report.md", "report.html", "diagnose.json", "diagnose.md", "proposal.yaml")


@pytest.mark.parametrize("start", ["generation", "plain"])
def test_eval_leaves_the_old_or_the_new_report_whole(harness, tmp_path, tiny_kb, tiny_questions, start):
    data = tmp_path / "data"
    argv = ["data", "build", "--kb", tiny_kb, "--questions", tiny_questions, "--out", data]
    assert harness.run(argv, tmp_path).code == 0
    threshold = {"old": "99", "new": "50"}

    def evaluate(work, which, kill_at=None):
        out = work / "eval"
        argv = ["eval", "--data", data / "test.jsonl", "--kb", tiny_kb, "--variants", "retrieval"]
        argv += ["--embedder", "char", "--rules", "none", "--threshold", threshold[which], "--out", out]
        got = harness.run(argv, work, kill_at)
        if which == "old" and got.code == 0:  # diagnose writes into the same folder: eval must keep its files
            argv = ["diagnose", "--report", out / "report.json", "--kb", tiny_kb, "--threshold", "99", "--out", out]
            got = harness.run(argv, work)
        return got

    def whole(now, old, new):
        """One report (json, md and html of the same threshold: json's timings differ from run to run) and the
        untouched diagnose files."""
        if None in now:
            return False
        percent = json.loads(now[0])["threshold"]["percent"]
        shown = {p for p in (99, 50) if f"= {p}%".encode() in now[1] and f"= {p}%".encode() in now[2]}
        allowed = {json.loads(report[0])["threshold"]["percent"] for report in (old, new)}
        return now[3:] == old[3:] and shown == {percent} and percent in allowed

    sweep(harness, tmp_path, "eval", REPORT_FILES, evaluate, whole, start)


@pytest.mark.parametrize("start", ["generation", "plain"])
def test_adapter_convert_leaves_the_old_or_the_new_adapter_whole(harness, tmp_path, start):
    from mlx_lora.backends.adapters import read_adapter
    from mlx_lora.core.errors import UserError

    for seed, name in ((0, "old"), (1, "new")):
        write_mlx_adapter(tmp_path / f"src-{name}", seed=seed)

    def convert(work, which, kill_at=None):
        argv = ["adapter", "convert", tmp_path / f"src-{which}", "--to", "peft", "--out", work / "peft"]
        return harness.run(argv, work, kill_at)

    def whole(now, old, new):
        try:
            return now in (old, new) and bool(read_adapter(tmp_path / "work" / "peft")[1])  # and it loads
        except UserError:
            return False

    sweep(harness, tmp_path, "peft", ("adapter_model.safetensors", "adapter_config.json"), convert, whole, start)


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


# -- readers go through the link --------------------------------------------------------------------------------


def test_peft_mlx_lm_and_our_loaders_read_an_adapter_through_its_generation_link(tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlx_lora import backends
    from mlx_lora.backends.adapters import convert, read_adapter
    from mlx_lora.core.config import Config

    write_mlx_adapter(tmp_path / "src", seed=0)
    convert(tmp_path / "src", tmp_path / "peft", "peft")
    convert(tmp_path / "peft", tmp_path / "run" / "adapter", "mlx")  # a run folder whose adapter/ is a link
    for folder in (tmp_path / "peft", tmp_path / "run" / "adapter"):
        assert folder.is_symlink() and not os.path.isabs(os.readlink(folder))
    weights = read_adapter(tmp_path / "peft")[1]
    b = weights["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(tmp_path / "peft"))
    loaded = dict(peft.named_parameters())["base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"]
    assert np.array_equal(loaded.detach().numpy(), b)
    cfg = Config()
    cfg.backend.device = "cpu"
    ours = backends.get("torch").load(tiny_model, tmp_path / "run", cfg)  # through run/adapter -> .adapter.gen-1
    with torch.no_grad():
        torch_logits = ours.model(input_ids=torch.tensor([[3, 4, 5]])).logits[0].numpy()
    if not backends.installed("mlx"):
        return
    import mlx.core as mx
    from mlx_lm import load as mlx_lm_load

    mlx_model, _ = mlx_lm_load(str(tiny_model), adapter_path=str(tmp_path / "run" / "adapter"))
    mlx_logits = np.array(mlx_model(mx.array([[3, 4, 5]]))[0].astype(mx.float32))
    assert np.abs(mlx_logits - torch_logits).max() < 1e-4
    ours_mlx = backends.get("mlx").load(tiny_model, tmp_path / "peft", cfg)
    assert np.abs(np.array(ours_mlx.model(mx.array([[3, 4, 5]]))[0]) - torch_logits).max() < 1e-4


# -- eval's folder: the report and its audit log are one generation -------------------------------------------


def test_the_audit_log_changes_with_its_report_and_files_diagnose_wrote_stay(tmp_path):
    from test_evaluate import row

    from mlx_lora.evaluation.scoring import build_report, write_report

    measure = {"name": "char", "description": "chrF", "fallback": None, "char": "chrF"}
    report = build_report({"tuned": [row(90)]}, "chatbot", measure)
    out = tmp_path / "eval"
    write_report(report, out, [{"n": 1}])
    (out / "diagnose.md").write_text("d")  # what `diagnose --out` put into the same folder
    write_report(report, out, [{"n": 2}])
    assert json.loads((out / "audit.jsonl").read_text()) == {"n": 2} and (out / "diagnose.md").read_text() == "d"
    write_report(report, out)  # no audit this time: the earlier one does not stay beside the new report
    assert sorted(os.listdir(out)) == ["diagnose.md", "report.html", "report.json", "report.md"]
    assert sorted(os.listdir(tmp_path)) == [".eval.gen-3", "eval"]
