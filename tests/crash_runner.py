"""Test hook for tests/test_crash.py: runs mlx-lora commands in forked children that SIGKILL themselves just
before their nth change to the file system under a folder, and logs every such change.

Started as `python tests/crash_runner.py [MODULE ...]`: it imports the modules (torch and the package, so that
each child starts warm: a fresh interpreter spends ~5 s importing torch on the project's 2-core machine), prints
one JSON line, then reads one JSON job per line from stdin and answers one JSON line per job:

    job    {"argv": [...], "root": DIR, "kill_at": N or null, "log": FILE, "output": FILE}
    answer {"code": EXIT_CODE} or {"signal": SIGNAL_NUMBER}

A change is a call of os.rename / replace / symlink / link / unlink / remove / rmdir / shutil.rmtree (and the
unlinks inside it), os.open or open() for writing, on a path under root. Before change number kill_at the
child logs it and sends itself SIGKILL, as a crash, the OOM killer or `kill -9` would: no finally block, no
atexit, no flush. The hook wraps those functions in the child only; the package itself carries no test code,
so the same harness runs unchanged against any version of it.
"""

from __future__ import annotations

import builtins
import importlib
import io
import json
import os
import shutil
import signal
import sys
import traceback

_state = {"root": "", "kill_at": None, "count": 0, "log": None, "in_rmtree": 0}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _under(path) -> bool:
    if isinstance(path, int) or path is None:
        return False
    try:
        text = os.path.abspath(os.fsdecode(os.fspath(path)))
    except TypeError:
        return False
    root = _state["root"]
    return text == root or text.startswith(root + os.sep)


def _show(path) -> str:
    if isinstance(path, int):
        return f"fd:{path}"
    text = os.fsdecode(os.fspath(path))
    absolute = os.path.abspath(text)
    return os.path.relpath(absolute, _state["root"]) if _under(absolute) else text


def _change(op: str, paths, nested: bool) -> None:
    _state["count"] += 1
    n = _state["count"]
    entry = [n, op + ("@rmtree" if nested else ""), *(_show(p) for p in paths)]
    _state["log"].write(json.dumps(entry) + "\n")
    _state["log"].flush()
    if n == _state["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)


def _wrap(module, name: str, op: str, npaths: int, check=None) -> None:
    real = getattr(module, name)

    def hooked(*args, **kwargs):
        paths = args[:npaths]
        nested = _state["in_rmtree"] > 0 and kwargs.get("dir_fd") is not None  # rmtree's relative unlinks
        if (check is None or check(args, kwargs)) and (nested or any(_under(p) for p in paths)):
            _change(op, paths, nested)
        return real(*args, **kwargs)

    setattr(module, name, hooked)


def _install() -> None:
    for name, npaths in (("rename", 2), ("replace", 2), ("link", 2), ("unlink", 1), ("remove", 1), ("rmdir", 1)):
        _wrap(os, name, name, npaths)
    real_symlink = os.symlink

    def symlink(src, dst, *args, **kwargs):  # the link's path is the change, its text only describes it
        if _under(dst):
            _change("symlink", [dst, src], False)
        return real_symlink(src, dst, *args, **kwargs)

    os.symlink = symlink
    _wrap(os, "open", "create", 1, lambda a, k: bool((a[1] if len(a) > 1 else k.get("flags", 0)) & _WRITE_FLAGS))
    writing = lambda a, k: any(c in (a[1] if len(a) > 1 else k.get("mode", "r")) for c in "wax+")
    _wrap(builtins, "open", "write", 1, writing)
    io.open = builtins.open
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if not _under(path):
            return real_rmtree(path, *args, **kwargs)
        _change("rmtree", [path], False)
        _state["in_rmtree"] += 1
        try:
            return real_rmtree(path, *args, **kwargs)
        finally:
            _state["in_rmtree"] -= 1

    shutil.rmtree = rmtree


def _child(job: dict) -> None:
    code = 0
    try:
        out = os.open(job["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), write_through=True)
        _state.update(root=os.path.abspath(job["root"]), kill_at=job.get("kill_at"), log=open(job["log"], "w"))
        _install()
        from mlx_lora.cli import main

        main(job["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 99
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    for name in sys.argv[1:]:
        try:
            importlib.import_module(name)
        except ImportError:  # another version of the package may lack a module: the child imports what it needs
            pass
    import mlx_lora

    print(json.dumps({"ready": mlx_lora.__file__}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(job)
        _, status = os.waitpid(pid, 0)
        answer = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"code": os.WEXITSTATUS(status)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
