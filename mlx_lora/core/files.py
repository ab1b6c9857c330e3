"""JSONL reading with file:line errors, and atomic writing of JSON/JSONL files and whole folders."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from mlx_lora.core.errors import UserError, located
from mlx_lora.core.userfiles import not_utf8


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; malformed lines raise a file:line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {'is a directory, not a JSONL file' if path.is_dir() else 'file not found'}")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a leading BOM is not content
            except UnicodeDecodeError as exc:
                raise not_utf8(path, number, raw[exc.start], exc.start + 1) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise located(
                    path, number, f"malformed JSON ({exc.msg} at column {exc.colno}); fix or remove the line"
                ) from None
            if not isinstance(obj, dict):
                raise located(path, number, "each line must be a JSON object")
            yield number, obj


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file + rename so a crash never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_texts(files: dict[Path, str]) -> None:
    """Write several files that belong together: all temp files are complete before the first one is renamed,
    so an error or interrupt while writing leaves every old file as it was, never a mix of old and new."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, text in files.items():
            if path.is_dir():
                raise UserError(f"{path}: is a directory; remove it or choose another output folder")
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append((tmp, path))
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)


def jsonl_text(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def json_text(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, jsonl_text(rows))


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json_text(obj))


@contextlib.contextmanager
def staged_dir(dst: str | Path):
    """Yield a temp folder beside dst; on success it replaces dst in one rename, on error it is removed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(src: str | Path, dst: str | Path) -> None:
    """Copy the folder src to dst, replacing dst whole (staged beside it, then renamed in)."""
    with staged_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def sha256_of_files(paths: list[Path]) -> str:
    """sha256 over the files' names and contents (streamed: model weights can be GBs)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


LOCK_FILE = ".lock"


@contextlib.contextmanager
def locked(folder: str | Path, what: str):
    """Hold an exclusive lock on folder while the block runs; a second holder gets a one-line error naming the
    first one's pid. flock() dies with its process, so a lock left by a killed run is simply free again."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(
            f"{folder}: in use by another {what} (pid {holder}); wait for it to finish or choose another folder"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
