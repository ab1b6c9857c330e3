"""Loading a model for generation: a run folder (its manifest's settings) or a bare adapter folder, any backend."""

from __future__ import annotations

import json
from pathlib import Path

from mlx_lora import backends
from mlx_lora.backends import adapters
from mlx_lora.core.config import Config, apply_mapping
from mlx_lora.core.errors import UserError
from mlx_lora.core.model_store import local_model_dir
from mlx_lora.data.render import ChatTokenizer


def read_manifest(run_dir: Path) -> dict:
    path = run_dir / "manifest.json"
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable run manifest ({exc}); is {run_dir} a run directory?") from None
    try:  # what generation and evaluation read from it
        run["config"]["lora"], run["config"]["data"]["system_prompt"], run["base_model"]["path"]
    except (KeyError, TypeError) as exc:
        raise UserError(
            f"{path}: not a run manifest (no {exc}); pass a run directory that `mlx-lora train` "
            "wrote, or the adapter folder itself"
        ) from None
    return run


def adapter_location(adapter: str | Path) -> tuple[Path, dict | None]:
    """(adapter folder, the run's manifest or None for a bare adapter folder)."""
    adapter = Path(adapter)
    folder = adapters.adapter_dir(adapter)
    return folder, (read_manifest(adapter) if folder != adapter else None)


def load_for_generation(model: str | None, adapter: str | Path | None, cfg: Config, progress: bool = True):
    """(backend, loaded, tokenizer, system_prompt): the run's manifest supplies model, LoRA and prompt settings."""
    system_prompt = cfg.data.system_prompt
    adapter_dir = None
    if adapter is not None:
        adapter_dir, run = adapter_location(adapter)
        if run is not None:
            # Generation must render prompts exactly as training did: take the run's settings, not today's defaults.
            saved = run["config"]
            apply_mapping(
                cfg,
                {"lora": saved["lora"], "data": {"system_prompt": saved["data"]["system_prompt"]}},
                str(Path(adapter) / "manifest.json"),
            )
            system_prompt = run.get("system_prompt", system_prompt)
            if model is None:
                model = run["base_model"]["path"]
    if model is not None:
        cfg.model.path = str(model)
    backend = backends.resolve(cfg.backend.name)
    model_dir = local_model_dir(cfg.model.path, cfg.model.cache_dir, progress)
    loaded = backend.load(model_dir, adapter_dir, cfg)
    return backend, loaded, ChatTokenizer.from_dir(model_dir), system_prompt
