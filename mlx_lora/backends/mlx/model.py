"""MLX models through mlx-lm: loading (rope_theta trap handled), LoRA layers, adapters, generation, fusing."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
from mlx_lm.utils import load_model, save_config, save_model

from mlx_lora.backends import adapters
from mlx_lora.core.config import Config, GenerateConfig, LoraConfig
from mlx_lora.core.errors import UserError
from mlx_lora.core.files import staged_dir
from mlx_lora.core.hf_config import rope_override

OPENBLAS_FIX = (
    "apt-get install libopenblas0-pthread libgfortran5, then "
    "export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
)
ALL_LINEAR = ("all-linear", "all")
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_warned = False


@dataclass
class MLXLoaded:
    """An mlx-lm model (with LoRA layers once an adapter is loaded or training starts) and where it came from."""

    model: nn.Module
    model_dir: Path
    config: dict
    pad_id: int = 0
    adapter: Path | None = None
    adapter_format: str | None = None
    lora: dict | None = None  # {rank, scale, alpha, dropout, keys, num_layers, dora} once LoRA layers exist
    warnings: list[str] = field(default_factory=list)


def blas_note() -> str | None:
    """On Linux, mlx-cpu links the reference BLAS (~20x slower matmuls) unless an optimised one is preloaded.

    Only LD_PRELOAD interposes on mlx's BLAS symbols: numpy's own bundled OpenBLAS, though loaded in the same
    process, stays private to numpy and changes nothing for mlx."""
    if not sys.platform.startswith("linux"):
        return None
    preload = os.environ.get("LD_PRELOAD", "").lower()
    if any(name in preload for name in ("openblas", "mkl", "blis")):
        return None
    return (
        "mlx-cpu on Linux uses the unoptimised reference BLAS (~20x slower matmuls than torch); "
        f"fine for tiny models. Fix: {OPENBLAS_FIX}"
    )


def _pad_id(config: dict) -> int:
    for key in ("pad_token_id", "eos_token_id"):
        value = config.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return 0


def lora_keys(model: nn.Module, targets: list[str]) -> list[str]:
    """Our target names (q_proj, or self_attn.q_proj, or all-linear) → mlx-lm keys relative to a block."""
    linear = {
        name: name
        for name, module in model.layers[-1].named_modules()
        if isinstance(module, (nn.Linear, nn.QuantizedLinear)) and name
    }
    by_leaf: dict[str, list[str]] = {}
    for name in linear:
        by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    if any(t in ALL_LINEAR for t in targets):
        return sorted(linear)
    keys = []
    for target in targets:
        if target in linear:
            keys.append(target)
        elif target in by_leaf:
            keys += by_leaf[target]
        else:
            names = ", ".join(sorted(by_leaf))
            raise UserError(
                f"lora.targets: {target} is not a linear layer of this model; choose from {names} (or all-linear)"
            )
    return sorted(set(keys))


def lora_settings(model: nn.Module, lora: LoraConfig) -> dict:
    total = len(model.layers)
    num_layers = lora.num_layers if lora.num_layers is not None else total
    if not 1 <= num_layers <= total:
        raise UserError(f"lora.num_layers must be between 1 and {total} for this model, got {lora.num_layers}")
    if lora.rank < 1:
        raise UserError(f"lora.rank must be >= 1, got {lora.rank}")
    # PEFT's rsLoRA scales by alpha/sqrt(r); mlx-lm takes the product as an absolute scale either way.
    scale = lora.alpha / (lora.rank**0.5 if lora.rslora else lora.rank)
    return {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "scale": scale,
        "dropout": lora.dropout,
        "keys": lora_keys(model, lora.targets),
        "num_layers": num_layers,
        "dora": lora.dora,
    }


def attach_lora(loaded: MLXLoaded, lora: LoraConfig) -> dict:
    """Freeze the base model and put fresh LoRA layers on it (call mx.random.seed first: lora_a is random)."""
    settings = lora_settings(loaded.model, lora)
    loaded.model.freeze()
    linear_to_lora_layers(
        loaded.model,
        settings["num_layers"],
        {k: settings[k] for k in ("rank", "scale", "dropout", "keys")},
        use_dora=settings["dora"],
    )
    loaded.lora = settings
    return settings


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m")}


def save_adapter(loaded: MLXLoaded, dst: Path, weights: dict[str, mx.array] | None = None) -> Path:
    """Write an mlx-lm adapter folder (adapters.safetensors + adapter_config.json) atomically."""
    lora = loaded.lora
    with staged_dir(dst) as tmp:
        mx.save_safetensors(
            str(tmp / adapters.MLX_WEIGHTS), weights or adapter_weights(loaded.model), metadata={"format": "mlx"}
        )
        config = adapters.mlx_config(
            lora["rank"],
            lora["scale"],
            lora["dropout"],
            lora["keys"],
            lora["num_layers"],
            dora=lora["dora"],
            alpha=lora["alpha"],
            base_model=str(loaded.model_dir),
        )
        (tmp / adapters.CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return dst


def _load_adapter(loaded: MLXLoaded, adapter: Path) -> None:
    folder = adapters.adapter_dir(adapter)
    fmt = adapters.detect_format(folder)
    source = folder
    tmp = None
    if fmt == "peft":
        info = adapters.info(folder)
        total = len(loaded.model.layers)
        if info.layers and max(info.layers) >= total:
            raise UserError(f"{folder}: adapter has layer {max(info.layers)}, the model only {total} layers")
        tmp = Path(tempfile.mkdtemp(prefix="mlx-lora-adapter-"))
        source = tmp / "adapter"
        adapters.peft_to_mlx(folder, source, num_layers=total - min(info.layers) if info.layers else total)
    try:
        config = json.loads((source / adapters.CONFIG).read_text(encoding="utf-8"))
        try:
            load_adapters(loaded.model, str(source))
        except ValueError as exc:
            raise UserError(f"{folder}: adapter does not fit this model ({str(exc).splitlines()[0]})") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    params = config["lora_parameters"]
    alpha = (config.get("mlx_lora") or {}).get("alpha", params["scale"] * params["rank"])
    loaded.lora = {
        "rank": params["rank"],
        "alpha": alpha,
        "scale": params["scale"],
        "dropout": params.get("dropout", 0.0),
        "keys": params.get("keys") or [],
        "num_layers": config["num_layers"],
        "dora": config.get("fine_tune_type") == "dora",
    }
    loaded.adapter, loaded.adapter_format = folder, fmt


def load(model_dir: Path, adapter: Path | None = None, cfg: Config | None = None) -> MLXLoaded:
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{model_dir}: no config.json; point --model at a Hugging Face model folder")
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    try:
        model, config = load_model(model_dir, model_config=rope_override(raw) or None)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(f"{model_dir}: mlx-lm cannot load this model ({str(exc).splitlines()[0][:160]})") from None
    dtype = cfg.model.dtype if cfg is not None else "auto"
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise UserError(f"model.dtype: unknown dtype {dtype!r}; choose auto, {', '.join(_DTYPES)}")
        model.set_dtype(_DTYPES[dtype])
    loaded = MLXLoaded(model, model_dir, config, pad_id=_pad_id(config))
    note = blas_note()
    if note:
        loaded.warnings.append(note)
    if adapter is not None:
        _load_adapter(loaded, Path(adapter))
    model.eval()
    return loaded


def generate(
    loaded: MLXLoaded,
    prompts: list[list[int]],
    cfg: GenerateConfig,
    stop_ids: list[int],
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Batched generation through mlx-lm's BatchGenerator; the stop token itself is not returned."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    global _warned
    if loaded.warnings and not _warned:
        _warned = True
        print(f"warning: {loaded.warnings[0]}", file=sys.stderr)
    if not prompts:
        return []
    if any(not p for p in prompts):
        raise UserError("generate: every prompt needs at least one token")
    loaded.model.eval()
    sampler = make_sampler(temp=cfg.temperature, top_p=cfg.top_p if 0 < cfg.top_p < 1 else 0.0)
    # mlx-lm penalises the last 20 tokens by default; torch (as HF) penalises everything seen, prompt included.
    processors = make_logits_processors(
        repetition_penalty=cfg.repetition_penalty if cfg.repetition_penalty != 1.0 else None,
        repetition_context_size=max(len(p) for p in prompts) + cfg.max_new_tokens,
    )
    size = max(1, cfg.batch_size)
    gen = BatchGenerator(
        loaded.model,
        max_tokens=cfg.max_new_tokens,
        stop_tokens=[[t] for t in stop_ids] or None,
        sampler=sampler,
        logits_processors=processors,
        completion_batch_size=size,
        prefill_batch_size=size,
    )
    results: list[list[int]] = [[] for _ in prompts]
    try:
        uids = gen.insert([list(p) for p in prompts])
        index = {uid: i for i, uid in enumerate(uids)}
        while responses := gen.next_generated():
            for response in responses:
                if response.finish_reason == "stop":
                    continue
                i = index[response.uid]
                results[i].append(int(response.token))
                if on_token is not None:
                    on_token(i, int(response.token))
    finally:
        gen.close()
    return results


def fuse(loaded: MLXLoaded, out_dir: Path) -> Path:
    """Merge the LoRA layers into the base weights with mlx-lm's fuse and save an HF-style folder."""
    if loaded.lora is None:
        raise UserError("fuse: no adapter loaded")
    fused = [(n, m.fuse()) for n, m in loaded.model.named_modules() if hasattr(m, "fuse")]
    loaded.model.update_modules(tree_unflatten(fused))
    loaded.lora = None
    out_dir = Path(out_dir)
    save_model(out_dir, loaded.model)
    config = dict(loaded.config)
    config.update(rope_override(config))  # write rope_theta on top so mlx-lm reads it next time
    save_config(config, out_dir / "config.json")
    for name in os.listdir(loaded.model_dir):
        if name.startswith("tokenizer") or name in (
            "vocab.json",
            "merges.txt",
            "chat_template.jinja",
            "generation_config.json",
            "special_tokens_map.json",
        ):
            shutil.copy(loaded.model_dir / name, out_dir / name)
    return out_dir
