"""Output files: folders replaced whole through generation links, file modes, stale temp cleanup, the run lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mlx_lora.core.errors import UserError
from mlx_lora.core.files import append_text, atomic_write_text, locked, remove_dir, replaced_dir, write_dir


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


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def listing(folder):
    return sorted(os.listdir(folder))


def test_a_folder_is_replaced_whole_through_a_relative_generation_link(tmp_path):
    write_dir(tmp_path / "out", {"a.txt": "1", "sub/b.txt": "1"})
    assert os.readlink(tmp_path / "out") == ".out.gen-1"
    write_dir(tmp_path / "out", {"a.txt": "2"})
    assert os.readlink(tmp_path / "out") == ".out.gen-2" and listing(tmp_path) == [".out.gen-2", "out"]
    assert listing(tmp_path / "out") == ["a.txt"] and (tmp_path / "out" / "a.txt").read_text() == "2"
    with pytest.raises(RuntimeError):  # a failed write changes nothing and leaves nothing
        with replaced_dir(tmp_path / "out") as folder:
            (folder / "a.txt").write_text("3")
            raise RuntimeError
    assert (tmp_path / "out" / "a.txt").read_text() == "2" and listing(tmp_path) == [".out.gen-2", "out"]


def test_files_and_folders_get_0644_and_0755_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        with replaced_dir(tmp_path / "out") as folder:
            (folder / "sub").mkdir()
            fd = os.open(folder / "sub" / "w.bin", os.O_WRONLY | os.O_CREAT, 0o600)  # as mkstemp or a writer might
            os.close(fd)
        atomic_write_text(tmp_path / "report.json", "{}")
        append_text(tmp_path / "metrics.jsonl", "{}\n")
        append_text(tmp_path / "metrics.jsonl", "{}\n")
    finally:
        os.umask(old)
    out = (tmp_path / "out").resolve()
    assert [oct(p.stat().st_mode & 0o777) for p in (out, out / "sub", out / "sub" / "w.bin")] == ["0o755"] * 2 + [
        "0o644"
    ]
    assert {oct((tmp_path / n).stat().st_mode & 0o777) for n in ("report.json", "metrics.jsonl")} == {"0o644"}
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n{}\n"


def test_a_plain_folder_of_an_earlier_version_becomes_the_first_generation(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text("old")
    write_dir(tmp_path / "d", {"train.jsonl": "new"}, allowed={"train.jsonl"})
    assert (tmp_path / "d").is_symlink() and (tmp_path / "d" / "train.jsonl").read_text() == "new"
    assert listing(tmp_path) == [".d.gen-2", "d"]
    # A plain folder holding anything else is the user's: refused in one line, left as it was.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="'notes.txt', not written by this command") as info:
        write_dir(tmp_path / "mine", {"train.jsonl": "new"}, allowed={"train.jsonl"})
    assert "\n" not in str(info.value) and listing(tmp_path / "mine") == ["notes.txt"]
    assert not (tmp_path / "mine").is_symlink() and listing(tmp_path) == [".d.gen-2", "d", "mine"]


def test_a_first_switch_killed_in_its_window_is_finished_by_the_next_write(tmp_path):
    # The plain folder renamed to its generation name, the link not yet in place: what a kill there leaves.
    (tmp_path / ".d.gen-1").mkdir()
    (tmp_path / ".d.gen-1" / "train.jsonl").write_text("old")
    with pytest.raises(RuntimeError):
        with replaced_dir(tmp_path / "d"):
            raise RuntimeError  # even a write that fails puts the old folder back first
    assert os.readlink(tmp_path / "d") == ".d.gen-1" and (tmp_path / "d" / "train.jsonl").read_text() == "old"


def test_stale_entries_of_killed_writers_go_at_the_next_write_and_live_ones_stay(tmp_path):
    write_dir(tmp_path / "out", {"a.txt": "1"})
    dead, live = dead_pid(), os.getpid()
    stale = [f".out.tmp-{dead}-0123abcd", ".out.gen-7", f".x.tmp-{dead}-0123abcd", ".a.txt.k2j4_x9z.tmp"]
    (tmp_path / stale[0]).mkdir()  # a folder a killed writer was filling
    (tmp_path / stale[1]).mkdir()  # a complete generation whose switch was killed
    os.symlink(".out.gen-1", tmp_path / stale[2])  # a temp link
    (tmp_path / stale[3]).write_text("x")  # an earlier version's temp file (another target: stays)
    (tmp_path / f".out.tmp-{live}-0123abcd").mkdir()  # a live writer's: stays
    write_dir(tmp_path / "out", {"a.txt": "2"})
    assert listing(tmp_path) == sorted([".out.gen-2", "out", f".out.tmp-{live}-0123abcd", stale[3]])
    atomic_write_text(tmp_path / "a.txt", "x")  # a file's write removes its own stale temps
    assert stale[3] not in listing(tmp_path)


def test_a_link_the_user_made_is_followed_and_what_others_wrote_can_be_carried(tmp_path):
    (tmp_path / "disk").mkdir()
    os.symlink(tmp_path / "disk", tmp_path / "eval")  # eval -> a folder elsewhere: keep writing there
    write_dir(tmp_path / "eval", {"report.json": "1"}, owns=["report.json", "audit.jsonl"])
    assert os.readlink(tmp_path / "eval") == str(tmp_path / "disk")
    assert (tmp_path / "disk").is_symlink() and (tmp_path / "eval" / "report.json").read_text() == "1"
    write_dir(tmp_path / "eval", {"diagnose.md": "d"}, owns=["diagnose.md"])
    write_dir(tmp_path / "eval", {"report.json": "2"}, owns=["report.json", "audit.jsonl"])
    assert listing(tmp_path / "eval") == ["diagnose.md", "report.json"]  # each writer replaces only its own


def test_remove_dir_leaves_no_part_of_the_folder_under_its_name(tmp_path):
    write_dir(tmp_path / "step-1", {"a": "1"})
    (tmp_path / "step-2").mkdir()  # a plain one
    remove_dir(tmp_path / "step-1")
    remove_dir(tmp_path / "step-2")
    remove_dir(tmp_path / "step-3")  # nothing to remove
    assert listing(tmp_path) == []


def test_fuse_replaces_its_own_output_and_nothing_else(tmp_path):
    from mlx_lora.core.hf_config import check_model_out

    check_model_out(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_model_out(tmp_path / "empty")
    with replaced_dir(tmp_path / "fused") as folder:  # what fuse wrote last time
        for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
            (folder / name).write_bytes(b"x")
    check_model_out(tmp_path / "fused")
    with replaced_dir(tmp_path / "run" / "adapter") as folder:  # another command's output, also a generation link
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for taken in (tmp_path / "run" / "adapter", tmp_path / "mine"):
        with pytest.raises(UserError, match="not a fused model's; choose a new --out"):
            check_model_out(taken)
