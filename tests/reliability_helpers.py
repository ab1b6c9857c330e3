"""Helpers of the bad-input tests: in-process CLI runs, the one-line error they must give, a small MLX adapter."""

from __future__ import annotations

import importlib.util

from mlx_adapter import write_mlx_adapter

__all__ = ["HAS_TORCH", "one_error_line", "run_cli", "write_mlx_adapter"]

HAS_TORCH = all(importlib.util.find_spec(n) for n in ("torch", "transformers", "peft"))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `mlx-lora ARGS` run in this process."""
    from mlx_lora.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]
