"""LoRA adapter folders: format detection, a summary, and MLX ⇄ PEFT conversion (numpy + safetensors only)."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_lora.core.errors import UserError
from mlx_lora.core.files import staged_dir

MLX_WEIGHTS = "adapters.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# mlx-lm keys end in .lora_a / .lora_b; PEFT's in .lora_A.weight / .lora_B.weight (one unnamed adapter).
_MLX_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[ab])$")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
_LAYER = re.compile(r"(?:^|\.)layers\.(?P<idx>\d+)\.(?P<rest>.+)$")

# safetensors dtype names ↔ numpy; BF16 has no numpy type and is widened to float32 (exact).
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclass
class AdapterInfo:
    format: str  # peft | mlx
    rank: int
    alpha: float
    scale: float
    dropout: float
    modules: list[str]  # module paths inside a layer, e.g. self_attn.q_proj
    layers: list[int]
    num_layers: int | None  # mlx: LoRA on the last N layers
    parameters: int
    base_model: str | None = None
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (BF16 widened to float32)."""
    corrupt = f"{path}: not a readable safetensors file (corrupt or truncated); re-export or re-convert the adapter"
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > path.stat().st_size - 8:  # a garbage header length would otherwise allocate gigabytes
                raise UserError(corrupt)
            header = json.loads(f.read(size))
            data = f.read()
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(corrupt) from None
    if not isinstance(header, dict):
        raise UserError(corrupt)
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = spec["data_offsets"]
            raw = data[start:end]
            if spec["dtype"] == "BF16":
                array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
            elif spec["dtype"] in _DTYPES:
                array = np.frombuffer(raw, dtype=np.dtype(_DTYPES[spec["dtype"]]).newbyteorder("<"))
            else:
                raise UserError(f"{path}: tensor {name} has unsupported dtype {spec['dtype']}")
            out[name] = array.reshape(spec["shape"]).copy()
        except (KeyError, TypeError, ValueError):  # offsets past the data, a shape that does not fit, …
            raise UserError(f"{corrupt} (tensor {name})") from None
    return out


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray], fmt: str) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata={"format": fmt})


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.is_file():
        raise UserError(f"{folder}: no {CONFIG}; not an adapter folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); re-export the adapter") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); re-export the adapter") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object; re-export the adapter")
    return config


def _format(folder: Path) -> str:
    if (folder / MLX_WEIGHTS).is_file():
        return "mlx"
    if (folder / PEFT_WEIGHTS).is_file():
        return "peft"
    if (folder / "adapter_model.bin").is_file():
        raise UserError(
            f"{folder}: adapter_model.bin is a pickle; re-save it as safetensors "
            "(PeftModel.save_pretrained(..., safe_serialization=True))"
        )
    raise UserError(f"{folder}: not an adapter folder: neither {MLX_WEIGHTS} (MLX) nor {PEFT_WEIGHTS} (PEFT) found")


def adapter_dir(path: str | Path) -> Path:
    """What an adapter argument means, decided here only: an adapter folder of either format, or a run folder
    holding one in adapter/. The folder must hold adapter weights and a readable adapter_config.json."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: adapter folder not found; pass a run folder or an adapter folder")
    if not (path / CONFIG).is_file() and (path / "adapter").is_dir():
        path = path / "adapter"
    _format(path)
    _read_config(path)  # else PEFT, finding no local config, would look for the folder's name on the Hugging Face hub
    return path


def detect_format(path: str | Path) -> str:
    """ "mlx" (adapters.safetensors, mlx-lm config) or "peft" (adapter_model.safetensors, PEFT config)."""
    return _format(adapter_dir(path))


def _layer_parts(module: str) -> tuple[int | None, str]:
    match = _LAYER.search(module)
    return (int(match["idx"]), match["rest"]) if match else (None, module)


def mlx_config(
    rank: int,
    scale: float,
    dropout: float,
    keys: list[str],
    num_layers: int,
    dora: bool = False,
    alpha: float | None = None,
    base_model: str | None = None,
) -> dict:
    """adapter_config.json that mlx_lm.load(..., adapter_path=) accepts; our own fields under mlx_lora."""
    return {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": int(num_layers),
        "lora_parameters": {"rank": int(rank), "scale": float(scale), "dropout": float(dropout), "keys": sorted(keys)},
        "model": base_model,
        "mlx_lora": {"alpha": float(alpha if alpha is not None else scale * rank), "format_version": 1},
    }


def peft_config(
    rank: int,
    alpha: float,
    dropout: float,
    targets: list[str],
    layers: list[int] | None,
    base_model: str | None = None,
    rslora: bool = False,
) -> dict:
    """adapter_config.json that PeftModel.from_pretrained accepts (a plain LoRA for a causal LM)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": int(rank),
        "lora_alpha": float(alpha),
        "lora_dropout": float(dropout),
        "target_modules": sorted(targets),
        "layers_to_transform": layers,
        "layers_pattern": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": bool(rslora),
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def _mlx_info(folder: Path, config: dict, tensors: dict) -> AdapterInfo:
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or "rank" not in params or "scale" not in params:
        raise UserError(f"{folder / CONFIG}: key lora_parameters needs rank and scale (mlx-lm adapter config)")
    if config.get("fine_tune_type", "lora") != "lora":
        raise UserError(
            f"{folder / CONFIG}: fine_tune_type {config['fine_tune_type']!r} cannot be converted; "
            "only plain LoRA adapters convert between MLX and PEFT"
        )
    modules, layers = set(), set()
    for name in tensors:
        match = _MLX_KEY.match(name)
        if not match:
            raise UserError(f"{folder / MLX_WEIGHTS}: unexpected tensor {name} (expected *.lora_a / *.lora_b)")
        idx, rest = _layer_parts(match["module"])
        modules.add(rest)
        if idx is not None:
            layers.add(idx)
    rank, scale = int(params["rank"]), float(params["scale"])
    alpha = float((config.get("mlx_lora") or {}).get("alpha", scale * rank))
    return AdapterInfo(
        "mlx",
        rank,
        alpha,
        scale,
        float(params.get("dropout", 0.0)),
        sorted(modules),
        sorted(layers),
        config.get("num_layers"),
        sum(int(t.size) for t in tensors.values()),
        config.get("model"),
        str(next(iter(tensors.values())).dtype) if tensors else "float32",
    )


def _peft_info(folder: Path, config: dict, tensors: dict) -> AdapterInfo:
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{folder / CONFIG}: peft_type {config.get('peft_type')!r} is not LoRA")
    if config.get("use_dora"):
        raise UserError(f"{folder / CONFIG}: DoRA adapters cannot be converted (their magnitudes differ in MLX)")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise UserError(f"{folder / CONFIG}: key {key} (per-module rank/alpha) is not supported")
    if "r" not in config or "lora_alpha" not in config:
        raise UserError(f"{folder / CONFIG}: keys r and lora_alpha are required (PEFT LoRA config)")
    modules, layers = set(), set()
    for name in tensors:
        match = _PEFT_KEY.match(name)
        if not match:
            raise UserError(
                f"{folder / PEFT_WEIGHTS}: unexpected tensor {name} (expected *.lora_A.weight / *.lora_B.weight)"
            )
        idx, rest = _layer_parts(match["module"])
        modules.add(rest)
        if idx is not None:
            layers.add(idx)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / (rank**0.5) if config.get("use_rslora") else alpha / rank
    return AdapterInfo(
        "peft",
        rank,
        alpha,
        scale,
        float(config.get("lora_dropout", 0.0)),
        sorted(modules),
        sorted(layers),
        None,
        sum(int(t.size) for t in tensors.values()),
        config.get("base_model_name_or_path"),
        str(next(iter(tensors.values())).dtype) if tensors else "float32",
        {"rslora": bool(config.get("use_rslora"))},
    )


def not_finite(folder: Path, name: str) -> UserError:
    """The one error for adapter weights holding NaN or infinity: they answer garbage (an all-NaN adapter wrote
    "!!!" and exited 0)."""
    return UserError(f"{folder}: the adapter's {name} holds NaN or infinite values; train or export it again")


def read_adapter(path: str | Path) -> tuple[AdapterInfo, dict[str, np.ndarray]]:
    folder = adapter_dir(path)
    fmt = _format(folder)  # adapter_dir just checked the folder: detect_format would do it again
    config = _read_config(folder)
    tensors = read_safetensors(folder / (MLX_WEIGHTS if fmt == "mlx" else PEFT_WEIGHTS))
    if not tensors:
        raise UserError(f"{folder}: the adapter holds no tensors")
    bad = [name for name, t in tensors.items() if not np.isfinite(np.asarray(t, np.float32)).all()]
    if bad:
        raise not_finite(folder, bad[0])
    return (_mlx_info if fmt == "mlx" else _peft_info)(folder, config, tensors), tensors


def info(path: str | Path) -> AdapterInfo:
    return read_adapter(path)[0]


def lora_pairs(path: str | Path) -> tuple[AdapterInfo, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(info, module path → (A, B)) in PEFT's orientation whatever the format: A (rank, in), B (out, rank), so
    that the update to a weight (out, in) is info.scale · B @ A. Module paths read `model.layers.N.self_attn.q_proj`."""
    src_info, tensors = read_adapter(path)
    halves: dict[str, dict[str, np.ndarray]] = {}
    for name, array in tensors.items():
        if src_info.format == "mlx":
            match = _MLX_KEY.match(name)
            module, array = match["module"], array.T  # mlx-lm keeps lora_a (in, r) and lora_b (r, out)
        else:
            match = _PEFT_KEY.match(name)
            module = match["module"].removeprefix(PEFT_PREFIX)
        halves.setdefault(module, {})[match["ab"].lower()] = np.asarray(array, dtype=np.float32)
    pairs = {}
    for module, half in sorted(halves.items()):
        if set(half) != {"a", "b"}:
            raise UserError(
                f"{adapter_dir(path)}: {module} has only lora_{next(iter(half))}; the adapter is incomplete"
            )
        a, b = half["a"], half["b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise UserError(f"{adapter_dir(path)}: {module}'s lora_a {a.shape} and lora_b {b.shape} do not pair up")
        pairs[module] = (a, b)
    return src_info, pairs


def _base_layers(base_model: str | None) -> int | None:
    """num_hidden_layers of a local base model folder, when the adapter names one."""
    if not base_model:
        return None
    config = Path(base_model) / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    data = data.get("text_config", data)
    return data.get("num_hidden_layers")


def mlx_to_peft(src: str | Path, dst: str | Path, base_model: str | None = None) -> AdapterInfo:
    """MLX adapter → PEFT: lora_a (in, r) → lora_A.weight (r, in); lora_b (r, out) → lora_B.weight (out, r)."""
    src_info, tensors = read_adapter(src)
    if src_info.format != "mlx":
        raise UserError(f"{src}: already a PEFT adapter")
    out = {}
    for name, array in tensors.items():
        match = _MLX_KEY.match(name)
        out[f"{PEFT_PREFIX}{match['module']}.lora_{match['ab'].upper()}.weight"] = array.T
    targets = sorted({m.rsplit(".", 1)[-1] for m in src_info.modules})
    config = peft_config(
        src_info.rank,
        src_info.scale * src_info.rank,
        src_info.dropout,
        targets,
        src_info.layers or None,
        base_model or src_info.base_model,
    )
    return _write_adapter(dst, PEFT_WEIGHTS, out, "pt", config)


def _write_adapter(dst: str | Path, weights_name: str, tensors: dict, flavour: str, config: dict) -> AdapterInfo:
    """Weights + adapter_config.json written as a new generation beside dst, then switched in whole (an earlier
    adapter at dst stays whole until then)."""
    dst = Path(dst)
    # Only ever replace an earlier adapter or an empty folder, never some other folder the user named.
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not (dst / CONFIG).is_file())):
        raise UserError(f"{dst}: exists and is not an adapter folder; choose another --out")
    with staged_dir(dst) as tmp:
        _write_safetensors(tmp / weights_name, tensors, flavour)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return info(dst)


def peft_to_mlx(src: str | Path, dst: str | Path, num_layers: int | None = None) -> AdapterInfo:
    """PEFT adapter → MLX. mlx-lm puts LoRA on the last `num_layers` layers; layers the adapter leaves out
    keep mlx's zero lora_b, so they change nothing. Without num_layers, the base model's layer count (if its
    folder is named in the config) or the highest adapted layer decides."""
    src_info, tensors = read_adapter(src)
    if src_info.format != "peft":
        raise UserError(f"{src}: already an MLX adapter")
    out = {}
    for name, array in tensors.items():
        match = _PEFT_KEY.match(name)
        module = match["module"][len(PEFT_PREFIX) :] if match["module"].startswith(PEFT_PREFIX) else match["module"]
        out[f"{module}.lora_{match['ab'].lower()}"] = array.T
    if num_layers is None:
        total = _base_layers(src_info.base_model)
        top = (max(src_info.layers) + 1) if src_info.layers else 0
        total = total if total and total >= top else top
        num_layers = total - min(src_info.layers) if src_info.layers else 0
    elif src_info.layers and num_layers < 1:
        raise UserError(f"num_layers must be at least 1, got {num_layers}")
    config = mlx_config(
        src_info.rank,
        src_info.scale,
        src_info.dropout,
        src_info.modules,
        num_layers,
        alpha=src_info.scale * src_info.rank,
        base_model=src_info.base_model,
    )
    return _write_adapter(dst, MLX_WEIGHTS, out, "mlx", config)


def convert(
    src: str | Path, dst: str | Path, to: str, num_layers: int | None = None, base_model: str | None = None
) -> AdapterInfo:
    if to not in ("peft", "mlx"):
        raise UserError(f"--to {to!r}: choose peft or mlx")
    if Path(dst).resolve() == adapter_dir(src).resolve():
        raise UserError(f"{dst}: the output folder must differ from the source")
    if to == "peft":
        return mlx_to_peft(src, dst, base_model)
    return peft_to_mlx(src, dst, num_layers)
