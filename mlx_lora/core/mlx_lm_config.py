"""mlx-lm's LoRA config (`mlx_lm.lora -c`, flat keys) recognised and translated onto ours, key by key."""

from __future__ import annotations

import sys

from mlx_lora.core.config import Config, apply_mapping, field_types
from mlx_lora.core.errors import UserError

# mlx-lm's LoRA config (`mlx_lm.lora -c`): flat keys. Those we support → (our section.key, or None when the key is
# handled by hand in apply_mlx_lm). Every other mlx-lm key is an error: a setting we cannot honour must not be
# dropped silently.
MLX_LM_KEYS = {
    "model": "model.path",
    "data": "data.dir",
    "iters": "train.max_steps",
    "batch_size": "train.batch_size",
    "learning_rate": "train.lr",
    "num_layers": None,
    "adapter_path": "train.out",
    "max_seq_length": "train.max_length",
    "steps_per_eval": "train.eval_every",
    "grad_accumulation_steps": "train.grad_accum",
    "seed": "train.seed",
    "fine_tune_type": None,
    "mask_prompt": None,
    "train": None,
    "optimizer": None,
    "lora_parameters": None,
}
MLX_LM_LORA_KEYS = ("rank", "scale", "dropout", "keys")
# mlx-lm keys we do not support (named so that a file using them is recognised as mlx-lm's and refused by name).
MLX_LM_UNSUPPORTED = (
    "optimizer_config",
    "val_batches",
    "steps_per_report",
    "resume_adapter_file",
    "save_every",
    "test",
    "test_batches",
    "grad_checkpoint",
    "lr_schedule",
    "report_to",
    "project_name",
    "wandb",
    "hf_dataset",
    "config",
)


def is_mlx_lm_config(mapping) -> bool:
    """An mlx-lm LoRA config: flat keys (none of our sections holds a mapping) and a key only mlx-lm has, or
    `model`/`data` given as a path (`train`, `model` and `data` are names of our sections too)."""
    if not isinstance(mapping, dict):
        return False
    ours = field_types(Config)
    if any(key in ours and isinstance(value, dict) for key, value in mapping.items()):
        return False
    only_mlx_lm = [key for key in mapping if (key in MLX_LM_KEYS or key in MLX_LM_UNSUPPORTED) and key not in ours]
    return bool(only_mlx_lm) or any(isinstance(mapping.get(key), str) for key in ("model", "data"))


def apply_mlx_lm(cfg: Config, mapping: dict, source: str) -> Config:
    """Map an mlx-lm LoRA config onto ours; a key we cannot honour is a one-line error naming it."""
    supported = ", ".join([*MLX_LM_KEYS, *(f"lora_parameters.{k}" for k in MLX_LM_LORA_KEYS)])

    def refuse(key: str, why: str) -> UserError:
        return UserError(f"{source}: mlx-lm key {key}: {why}; supported mlx-lm keys: {supported}")

    def put(key: str, dotted: str, value) -> None:
        section, name = dotted.split(".")
        apply_mapping(cfg, {section: {name: value}}, f"{source}: mlx-lm key {key}")

    for key in mapping:
        if key not in MLX_LM_KEYS:
            raise refuse(key, "not supported by mlx-lora" if key in MLX_LM_UNSUPPORTED else "unknown key")
    for key, value in mapping.items():
        dotted = MLX_LM_KEYS[key]
        if dotted is not None:
            put(key, dotted, value)
        elif key == "num_layers":  # mlx-lm's -1 means every layer, our null
            put(key, "lora.num_layers", None if value == -1 else value)
        elif key == "fine_tune_type":
            if value not in ("lora", "dora"):
                raise refuse(key, f"{value!r} is not supported (lora or dora)")
            put(key, "lora.dora", value == "dora")
        elif key == "train":  # mlx-lm's "train, not only test": training is what `train` and `run` do
            if value is not True:
                raise refuse(key, f"{value!r} is not supported (true; score an adapter with mlx-lora eval)")
        elif key == "optimizer":
            if str(value).lower() != "adamw":
                raise refuse(key, f"{value!r} is not supported (adamw, the only optimizer here)")
        elif key == "mask_prompt":
            # The prompt is never trained here, and every assistant turn is: true is what happens anyway.
            if value is not True and value is not False:
                raise refuse(key, f"expected true or false, got {value!r}")
            if value is False:
                sys.stderr.write(
                    f"note: {source}: mask_prompt: false is not available; mlx-lora always masks the prompt and "
                    "trains every assistant turn\n"
                )
        elif key == "lora_parameters":
            _apply_mlx_lm_lora(cfg, value, refuse, put)
    return cfg


def _apply_mlx_lm_lora(cfg: Config, value, refuse, put) -> None:
    """lora_parameters: rank, dropout, keys (module paths → their last name), scale → alpha = scale × rank."""
    if not isinstance(value, dict):
        raise refuse("lora_parameters", f"expected a mapping of {', '.join(MLX_LM_LORA_KEYS)}, got {value!r}")
    for name in value:
        if name not in MLX_LM_LORA_KEYS:
            raise refuse(f"lora_parameters.{name}", "not supported by mlx-lora")
    key = "lora_parameters."
    if "rank" in value:
        put(key + "rank", "lora.rank", value["rank"])
    if "dropout" in value:
        put(key + "dropout", "lora.dropout", value["dropout"])
    if "keys" in value:
        keys = value["keys"]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise refuse(key + "keys", f"expected a list of module names, got {keys!r}")
        # mlx-lm names a module by its path in a layer (self_attn.q_proj); both backends match the last name.
        put(key + "keys", "lora.targets", list(dict.fromkeys(k.rsplit(".", 1)[-1] for k in keys)))
    if "scale" in value:  # mlx-lm multiplies by scale, PEFT by alpha / rank
        scale = value["scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise refuse(key + "scale", f"expected a number, got {scale!r}")
        put(key + "scale", "lora.alpha", float(scale) * cfg.lora.rank)
