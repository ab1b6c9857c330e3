"""A small mlx-lm adapter folder on disk (numpy + safetensors only), for tests that convert or load one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# LoRA on q_proj and v_proj of a model with hidden size 64 and 2 kv heads of 16 (the tiny test model's shapes).
SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (64, 32)}


def write_mlx_adapter(folder: Path, layers=(1, 2), rank=4, scale=2.5, seed=0) -> dict:
    """Write adapters.safetensors and adapter_config.json into a new `folder`; return the tensors written."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for i in layers:
        for module, (din, dout) in SHAPES.items():
            tensors[f"model.layers.{i}.{module}.lora_a"] = rng.normal(size=(din, rank)).astype(np.float32)
            tensors[f"model.layers.{i}.{module}.lora_b"] = rng.normal(size=(rank, dout)).astype(np.float32)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapters.safetensors"), metadata={"format": "mlx"})
    params = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(SHAPES)}
    config = {"fine_tune_type": "lora", "num_layers": len(layers), "model": None, "lora_parameters": params}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return tensors
