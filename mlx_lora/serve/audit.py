"""The server's audit log: one whole JSONL line per answer, appended under a lock, rotated by size."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from mlx_lora.core.files import append_text


class AuditLog:
    """Appends records to `path`; a line that would take the file past max_bytes first moves it to path.1 (path.1 to
    path.2 …, keeping `keep` old files), so no line is ever split across files and no file grows without bound.

    One lock serialises rotation and writing: two answers finishing together never interleave their bytes, and
    each line goes out in one write call to a file opened for appending."""

    def __init__(self, path: str | Path, max_bytes: int = 50 * 2**20, keep: int = 3):
        self.path, self.max_bytes, self.keep = Path(path), max_bytes, max(1, keep)
        self.lock = threading.Lock()
        self.lines = 0  # written by this process

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self.lock:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size and size + len(line.encode("utf-8")) > self.max_bytes:
                self._rotate()
            append_text(self.path, line)
            self.lines += 1

    def _rotate(self) -> None:
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
