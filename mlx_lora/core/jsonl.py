"""JSON Lines: reading with file:line errors, and the text our JSON and JSONL files are written as."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from mlx_lora.core.errors import UserError, located
from mlx_lora.core.userfiles import lone_surrogate, not_utf8, surrogate_error


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; malformed lines raise a file:line UserError."""
    path = Path(path)
    if not path.is_file():
        what = (
            "is a directory, not a JSONL file"
            if path.is_dir()
            else "is not a regular file (a device or a pipe?); name a JSONL file"
            if path.exists()
            else "file not found"
        )
        raise UserError(f"{path}: {what}")
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
                hint = (
                    "; a JSONL file holds one JSON object per line (not a JSON array, nor an object spread over lines)"
                    if line.strip() == "{" or line.lstrip().startswith("[")
                    else ""
                )
                raise located(
                    path, number, f"malformed JSON ({exc.msg} at column {exc.colno}); fix or remove the line{hint}"
                ) from None
            except RecursionError:  # brackets nested thousands deep: no row of ours looks like that
                raise located(path, number, "JSON nested too deeply to read; fix or remove the line") from None
            if not isinstance(obj, dict):
                raise located(path, number, "each line must be a JSON object (a JSONL file: one object per line)")
            if "\\u" in line and (char := lone_surrogate(obj)) is not None:  # only an escape can hold one
                raise surrogate_error(path, number, char)
            yield number, obj


def jsonl_text(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def json_text(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"
