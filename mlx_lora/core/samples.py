"""The sample KB, question bank, rules and configs shipped in the package, and the fallback to them."""

from __future__ import annotations

import sys
from pathlib import Path

# Package data (pyproject.toml); in a source checkout data/ and configs/ link to these same files.
SAMPLES = Path(__file__).resolve().parent.parent / "samples"
# The default paths, relative to the current folder, that fall back to the packaged file of the same name.
DEFAULT_PATHS = ("data/kb.jsonl", "data/questions.yaml", "configs/rules.yaml", "configs/default.yaml")
# What `mlx-lora init` copies: a starting point for a project of one's own (reference.yaml documents every key).
INIT_FILES = DEFAULT_PATHS + ("configs/reference.yaml", "configs/grounded.yaml")


def sample_path(relative: str) -> Path:
    """The packaged copy of a sample file, e.g. sample_path("data/kb.jsonl")."""
    return SAMPLES / relative


def with_fallback(path: str | None, used: list[str]) -> str | None:
    """A default path missing from the current folder → the packaged sample (its name appended to `used`), so that
    `mlx-lora run` works from any folder; any other path is returned as given (and errors where it is read)."""
    if path is None or path not in DEFAULT_PATHS or Path(path).exists():
        return path
    sample = sample_path(path)
    if not sample.is_file():
        return path
    used.append(path)
    return str(sample)


def say_fallbacks(used: list[str]) -> None:
    """One line on stderr naming every default input read from the packaged samples."""
    if used:
        sys.stderr.write(f"note: no {', '.join(used)} in this folder; using the packaged samples in {SAMPLES}\n")
