"""Files and folders replaced whole (temp files, generation links), appends, the run lock, file hashes."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

from mlx_lora.core.errors import UserError
from mlx_lora.core.jsonl import json_text, jsonl_text

# Every file and folder we write gets these modes, whatever the umask or mkstemp (owner-only) would give: run
# folders, data and reports are shared and copied around like any other build output.
FILE_MODE, DIR_MODE = 0o644, 0o755


# -- names beside a target: `.NAME.gen-N` (a complete generation), `.NAME.tmp-PID-HEX` (being written or removed) --
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")
_GEN = re.compile(r"^\.(?P<name>.+)\.gen-(?P<n>\d+)$")
# What earlier versions' atomic writes left when killed: mkstemp names (8 random characters, then ".tmp"). Their
# staged folders had no suffix and are left alone: `.adapter.original` could be a user's backup.
_LEGACY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def _temp_name(name: str) -> str:
    # The pid tells a later writer whether the entry is still in use: only a dead process's temp entries go.
    return f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sweep(parent: Path, name: str, generations: bool) -> None:
    """Remove what killed writers left beside `name`: temp entries of dead processes, earlier versions' temp
    names; with `generations`, also generations of `name` no link points to, dead processes' temp entries of
    any name (a removal leaves one under a temp name) and links to generations that are gone."""
    current = _generation(parent / name)
    for entry in os.listdir(parent):
        path = parent / entry
        temp = _TEMP.match(entry)
        # A writer handed one of our temp paths makes its own temp of it (`..NAME.tmp-P-x.tmp-Q-y`): also ours.
        if temp and (generations or temp["name"] == name or temp["name"].startswith(f".{name}.tmp-")):
            if not _alive(int(temp["pid"])):
                _remove(path)
        elif (legacy := _LEGACY.match(entry)) and legacy["name"] == name:
            _remove(path)
        elif not generations:
            continue
        elif (gen := _GEN.match(entry)) and gen["name"] == name and current is not None and entry != current:
            _remove(path)
        elif _generation(path) is not None and not path.exists():
            path.unlink()


def _generation(link: Path) -> str | None:
    """The generation folder's name when `link` is one of our generation links (relative, to a sibling)."""
    try:
        text = os.readlink(link)
    except OSError:
        return None
    gen = _GEN.match(text)
    return text if gen and gen["name"] == link.name else None


def replaceable_dir(path: str | Path, holds: Callable[[str], bool]) -> bool:
    """Whether an output folder may be replaced whole without asking: missing, empty, or one that replaced_dir wrote
    (a generation link) whose every entry `holds` accepts — an earlier output of the same command, never a user's
    folder nor another command's output (a run's adapter/ is a generation link too)."""
    path = Path(path)
    if not os.path.lexists(path):
        return True
    if _generation(path) is None:
        return path.is_dir() and not any(path.iterdir())
    return all(holds(entry) for entry in os.listdir(path))


def _generations(parent: Path, name: str) -> list[str]:
    """Complete generation folders of `name`, oldest first."""
    found = [(int(m["n"]), e) for e in os.listdir(parent) if (m := _GEN.match(e)) and m["name"] == name]
    return [e for _, e in sorted(found)]


def _next_generation(parent: Path, name: str) -> str:
    found = _generations(parent, name)
    return f".{name}.gen-{int(_GEN.match(found[-1])['n']) + 1 if found else 1}"


def _point(target: Path, generation: str) -> None:
    """Make target a relative link to the sibling `generation` in one rename (a link renamed onto a link)."""
    link = target.parent / _temp_name(target.name)
    os.symlink(generation, link)
    os.replace(link, target)


def _resolve(target: str | Path) -> Path:
    """target as an absolute path; a link the user made (not one of our generation links) is followed, so that
    `runs/data -> /big/disk/data` keeps writing to the big disk."""
    path = Path(os.path.abspath(target))
    for _ in range(40):
        if not path.is_symlink() or _generation(path) is not None:
            break
        path = Path(os.path.abspath(path.parent / os.readlink(path)))
    if not path.name:
        raise UserError(f"{target}: not a folder that can be replaced; choose another output folder")
    return path


@contextlib.contextmanager
def _parent_locked(parent: Path):
    """Serialise the switches beside one folder (two writers of one target never remove each other's generation);
    flock on the folder itself leaves no lock file, and dies with its process."""
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _take_over(target: Path, allowed: Collection[str] | None) -> None:
    """Make target one of our generation links if it is not one yet: a plain folder (written by an earlier
    version) becomes the first generation; a missing target whose switch a kill interrupted points again to its
    newest complete generation."""
    parent, name = target.parent, target.name
    if target.is_symlink():
        return
    if not os.path.lexists(target):
        found = _generations(parent, name)
        if found:
            _point(target, found[-1])
        return
    if not target.is_dir():
        raise UserError(f"{target}: exists and is not a folder; choose another output folder")
    if allowed is not None:
        allowed = set(allowed) | {".DS_Store"}  # macOS Finder's; not a user's file
        others = sorted(e for e in os.listdir(target) if e not in allowed and not _LEGACY.match(e))
        if others:
            more = f" and {len(others) - 1} more" if len(others) > 1 else ""
            raise UserError(
                f"{target}: holds {others[0]!r}{more}, not written by this command; it would be replaced whole, "
                "so choose a new or empty output folder"
            )
    generation = _next_generation(parent, name)
    link = parent / _temp_name(name)
    os.symlink(generation, link)
    os.rename(target, parent / generation)
    # The one window of the scheme: until the next line, target is missing (its files whole under `generation`).
    # POSIX has no portable way to put a link in place of a folder in one step (renameat2 is Linux-only), so a
    # process killed here leaves it so, and the next write to target points it back first (above).
    os.replace(link, target)


def _set_modes(folder: Path) -> None:
    os.chmod(folder, DIR_MODE)
    for root, dirs, files in os.walk(folder):
        for entry in dirs + files:
            path = os.path.join(root, entry)
            if not os.path.islink(path):
                os.chmod(path, DIR_MODE if entry in dirs else FILE_MODE)


@contextlib.contextmanager
def replaced_dir(target: str | Path, owns: Collection[str] | None = None, allowed: Collection[str] | None = None):
    """Yield an empty folder to fill; when the block ends without error it replaces target whole, and a process
    killed at any instant leaves target with the complete old folder or the complete new one, never a mix.

    The folder is written as a hidden generation beside target (`.NAME.gen-N`), then target, a relative symlink,
    is switched to it in one rename, and only then is the old generation removed. Temp entries and generations
    that killed writers left are removed first. A plain folder at target (from an earlier version) becomes the
    first generation; `allowed`, when given, names what such a folder may hold (else it is refused in one line:
    a user's folder is never swallowed). `owns`, when given, names the entries this writer replaces: the others
    in the current generation are carried into the new one (two commands writing into one folder); by default
    the writer owns everything. Files get mode 0644 and folders 0755 before the switch."""
    target = _resolve(target)
    parent, name = target.parent, target.name
    parent.mkdir(parents=True, exist_ok=True)
    with _parent_locked(parent):
        _take_over(target, allowed)
        _sweep(parent, name, generations=True)
    building = parent / _temp_name(name)
    os.mkdir(building)
    try:
        yield building
        with _parent_locked(parent):
            old = _generation(target)
            if owns is not None and old is not None and (parent / old).is_dir():
                for entry in os.listdir(parent / old):
                    if entry not in owns and not os.path.lexists(building / entry):
                        source = parent / old / entry
                        copy = shutil.copytree if source.is_dir() and not source.is_symlink() else shutil.copy2
                        copy(source, building / entry, **({"symlinks": True} if copy is shutil.copytree else {}))
            _set_modes(building)
            generation = _next_generation(parent, name)
            os.rename(building, parent / generation)
            _point(target, generation)
            if old is not None and old != generation:
                _remove(parent / old)
    finally:
        if os.path.lexists(building):
            _remove(building)


# The name the training loop and the backends know: a folder staged beside dst and switched in whole.
staged_dir = replaced_dir


def publish_dir(src: str | Path, dst: str | Path) -> None:
    """Copy the folder src to dst, replacing dst whole (a new generation, then one switch)."""
    with replaced_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def remove_dir(target: str | Path) -> None:
    """Remove a folder written by replaced_dir (or a plain one) so that no kill leaves part of it under its name:
    the folder is renamed away first (the link then points nowhere and reads as missing), then deleted."""
    target = _resolve(target)
    parent = target.parent
    if not parent.is_dir():
        return
    with _parent_locked(parent):
        generation = _generation(target)
        folder = parent / generation if generation else target
        if folder.is_dir() and not folder.is_symlink():
            trash = parent / _temp_name(target.name)
            os.rename(folder, trash)
            if generation:
                target.unlink(missing_ok=True)
            _remove(trash)
        elif os.path.lexists(target):
            target.unlink()


def write_dir(
    target: str | Path,
    files: dict[str, str],
    owns: Collection[str] | None = None,
    allowed: Collection[str] | None = None,
) -> Path:
    """Replace the folder target whole by one holding `files` (name → text), see replaced_dir."""
    with replaced_dir(target, owns, allowed) as folder:
        for name, text in files.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return Path(target)


def _temp_file(path: Path):
    """(fd, temp path) beside path, already with the final mode (the umask may have narrowed os.open's)."""
    tmp = path.parent / _temp_name(path.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd, tmp


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file + rename so a crash never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path.parent, path.name, generations=False)
    tmp = None
    try:
        fd, tmp = _temp_file(path)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replaced_files(paths):
    """Yield {path: temp path beside it} for writers that open their outputs by name (the GGUF writer) or fill them
    as text; when the block ends without error every temp file is complete, and only then are they renamed over
    their paths, one right after another, else they are removed. Each path is the old file or the new one; a set of
    files that belong together (an export's GGUFs, Modelfile and card) is the old set or the new one unless a kill
    lands in the microseconds between those renames (a folder switched whole, replaced_dir, closes even that)."""
    temps: dict[Path, Path] = {}
    try:
        for path in map(Path, paths):
            if path.is_dir():
                raise UserError(f"{path}: is a directory; name a file, or remove it")
            path.parent.mkdir(parents=True, exist_ok=True)
            _sweep(path.parent, path.name, generations=False)
            fd, temps[path] = _temp_file(path)
            os.close(fd)  # the writer reopens it by name; the file keeps FILE_MODE
        yield dict(temps)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replaced_file(path: str | Path):
    """replaced_files for one file: yield its temp path."""
    with replaced_files([path]) as temps:
        yield next(iter(temps.values()))


def append_text(path: str | Path, text: str) -> None:
    """Append to a log (metrics.jsonl, an audit log); a file it creates gets FILE_MODE like every other output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, FILE_MODE)
        os.fchmod(fd, FILE_MODE)  # the umask may have narrowed it
    except FileExistsError:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        data = text.encode("utf-8")
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, jsonl_text(rows))


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json_text(obj))


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
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
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
