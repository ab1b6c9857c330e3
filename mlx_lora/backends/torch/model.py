"""Load a base model (local HF folder or GGUF file) and optionally an adapter of either format."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlx_lora.backends.adapters import adapter_dir, detect_format, not_finite
from mlx_lora.backends.torch.allocator import keep_freed_memory
from mlx_lora.core.config import Config
from mlx_lora.core.errors import UserError
from mlx_lora.core.model_store import require_safetensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    """A model ready for training or generation, and where it came from."""

    model: torch.nn.Module  # the base model, or a PeftModel when an adapter was loaded
    device: torch.device
    dtype: torch.dtype
    source: str
    adapter: Path | None = None
    pad_id: int = 0
    extra: dict = field(default_factory=dict)
    first_token_bias: dict[int, float] = field(default_factory=dict)  # added to the first new token's logits


def pick_device(name: str = "auto") -> torch.device:
    """cuda, then mps, then cpu; an explicit request that cannot be met is the user's to fix."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("backend.device=cuda but torch sees no CUDA GPU; use backend.device=auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("backend.device=mps but MPS is not available; use backend.device=auto or cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"backend.device: unknown device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU/MPS unless asked (bf16 CPU matmuls are not a safe default); bf16 on CUDA when supported."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"model.dtype: unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _peft_from_pretrained(peft_model, base, path: Path, trainable: bool):
    """PeftModel.from_pretrained, but LoRA weights that name none of this model's layers are an error: PEFT only
    warns ("missing adapter keys") and the result would silently be the base model."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message=r"(?i).*missing adapter keys")  # even if shown before
        model = peft_model.from_pretrained(base, str(path), is_trainable=trainable)
    for warning in caught:
        if "missing adapter keys" in str(warning.message).lower():
            raise UserError(
                f"{path}: the adapter's weights do not match this model's LoRA layers (PEFT found "
                "missing adapter keys); use the adapter with the model and settings it was trained on"
            )
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return model


def _attach_adapter(base, path: Path, trainable: bool):
    """PeftModel over base; an MLX adapter is converted to PEFT in a temp folder first (weights are in memory
    after loading, so the folder is removed)."""
    from peft import PeftModel
    from safetensors import SafetensorError

    # `path` comes from adapters.adapter_dir, which checked its adapter_config.json: PEFT never looks elsewhere.
    try:
        if detect_format(path) == "peft":
            return _peft_from_pretrained(PeftModel, base, path, trainable)
        from mlx_lora.backends.adapters import mlx_to_peft

        with tempfile.TemporaryDirectory(prefix="mlx-lora-peft-") as tmp:
            mlx_to_peft(path, Path(tmp) / "adapter")
            return _peft_from_pretrained(PeftModel, base, Path(tmp) / "adapter", trainable)
    except (SafetensorError, OSError):
        raise UserError(
            f"{path}: the adapter weights are not a readable safetensors file (corrupt or truncated); "
            "re-export or re-convert the adapter"
        ) from None
    except (RuntimeError, ValueError, KeyError) as exc:
        # Typically "size mismatch": the adapter was trained on another base model.
        first = str(exc).strip().splitlines()
        reason = next((line.strip() for line in first if "mismatch" in line), first[0] if first else type(exc).__name__)
        raise UserError(
            f"{path}: adapter does not fit this model ({reason[:160]}); "
            "use the base model it was trained on (see the run's manifest.json)"
        ) from None


# PEFT 0.21 calls a transformers 5 API deprecated in favour of another name: nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _from_pretrained(source: str, dtype: torch.dtype):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar for a local load is noise

    path = Path(source)
    kwargs = {"dtype": dtype, "trust_remote_code": False, "local_files_only": True}  # never the network
    try:
        if path.is_file() and path.suffix == ".gguf":  # transformers dequantises GGUF into plain float layers
            return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UserError(f"{path}: no config.json; point --model at a Hugging Face model folder")
            require_safetensors(path)  # else transformers would unpickle pytorch_model.bin
            return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        # Never the network: a hub id reaches a backend only as its folder in the local cache (resolve_model).
        raise UserError(f"{source}: not a model folder or .gguf file")
    except OSError as exc:
        raise UserError(
            f"{source}: cannot load the model ({str(exc).splitlines()[0][:160]}); use a local model folder when offline"
        ) from None
    except SafetensorError:
        raise UserError(
            f"{source}: the model weights are not a readable safetensors file (corrupt or truncated); copy or "
            "convert the model again"
        ) from None
    except ValueError as exc:  # transformers' word for a config it cannot build a model from
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"{source}: this model needs code of its own (config.json names it), which mlx-lora never runs "
                "(trust_remote_code stays off); use a model architecture transformers supports"
            ) from None
        raise UserError(
            f"{source}: cannot load the model ({str(exc).splitlines()[0][:200]}); use a model folder that "
            "transformers loads (`mlx-lora model convert` turns a GGUF file into one)"
        ) from None


def load(model: str | Path, adapter: str | Path | None, cfg: Config, trainable: bool = False) -> Loaded:
    """The base model on the chosen device and dtype, plus an adapter when given."""
    if cfg.backend.threads:
        torch.set_num_threads(cfg.backend.threads)
    keep_freed_memory()  # before the first large buffers: steps and answers reuse them instead of faulting in pages
    device = pick_device(cfg.backend.device)
    dtype = pick_dtype(cfg.model.dtype, device)
    base = _from_pretrained(str(model), dtype)
    base.config.use_cache = False  # training never reuses the cache; generation asks for it explicitly
    pad = base.config.pad_token_id
    eos = base.config.eos_token_id
    pad_id = pad if isinstance(pad, int) else (eos[0] if isinstance(eos, list) and eos else eos) or 0
    loaded = Loaded(base, device, dtype, str(model), pad_id=int(pad_id), extra={"dtype_setting": cfg.model.dtype})
    if adapter is not None:
        loaded.adapter = adapter_dir(adapter)
        loaded.model = _attach_adapter(base, loaded.adapter, trainable)
        for name, weight in loaded.model.named_parameters():
            if "lora_" in name and not torch.isfinite(weight).all():
                raise not_finite(loaded.adapter, name)
    loaded.model.to(device)
    loaded.model.eval()
    return loaded
