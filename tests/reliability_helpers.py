"""Helpers of the bad-input tests: in-process CLI runs, the one-line error they must give, a small MLX adapter."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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


def write_mlx_adapter(folder: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for i in (0, 1):
        tensors[f"model.layers.{i}.self_attn.q_proj.lora_a"] = rng.normal(size=(32, 4)).astype(np.float32)
        tensors[f"model.layers.{i}.self_attn.q_proj.lora_b"] = rng.normal(size=(4, 32)).astype(np.float32)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapters.safetensors"), metadata={"format": "mlx"})
    config = {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "model": None,
        "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]},
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
