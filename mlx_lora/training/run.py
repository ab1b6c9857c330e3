"""Backend-neutral training and loading: model → tokenizer → encoded rows → backend → run directory."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from mlx_lora import backends
from mlx_lora.backends import TrainOutcome
from mlx_lora.core.config import Config, apply_mapping
from mlx_lora.core.errors import UserError
from mlx_lora.data.formats import encode_all, read_examples
from mlx_lora.core.files import write_json
from mlx_lora.data.render import ChatTokenizer

_VERSIONED = ("mlx-lora", "torch", "transformers", "peft", "mlx", "mlx-lm", "tokenizers")


def versions(names: tuple[str, ...] = _VERSIONED) -> dict[str, str]:
    """Installed versions of `names` (absent packages are left out), plus Python's."""
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def fingerprint(paths: list[Path]) -> str:
    """sha256 over the files' names and contents (streamed: model weights can be GBs)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_dir_for(cfg: Config, progress: bool = True) -> Path:
    from mlx_lora.core.model_store import resolve_model

    resolved = resolve_model(cfg.model.path, cfg.model.cache_dir, progress=progress)
    if not isinstance(resolved, Path) or not (resolved / "config.json").is_file():
        raise UserError(f"model {cfg.model.path!r}: not a local model folder; run `mlx-lora model prepare` "
                        "or pass --model with an HF folder or a .gguf file")
    return resolved


def _data_files(data_dir: Path) -> tuple[Path, Path]:
    train, valid = data_dir / "train.jsonl", data_dir / "valid.jsonl"
    for path in (train, valid):
        if not path.is_file():
            raise UserError(f"{path}: missing; a data directory holds train.jsonl and valid.jsonl "
                            "(build one with `mlx-lora data build`)")
    return train, valid


def manifest(cfg: Config, backend_name: str, model_dir: Path, data_files: list[Path], stats: dict) -> dict:
    return {
        "config": cfg.to_dict(),
        "backend": backend_name,
        "base_model": {"spec": cfg.model.path, "path": str(model_dir),
                       "sha256": fingerprint(list(model_dir.glob("*.safetensors")) + [model_dir / "config.json"])},
        "data": {"files": [str(p) for p in data_files], "sha256": fingerprint(data_files), **stats},
        "system_prompt": cfg.data.system_prompt,
        "adapter_format": "mlx" if backend_name == "mlx" else "peft",
        "platform": f"{sys.platform}-{platform.machine()}",
        "versions": versions(),
    }


def train_run(cfg: Config, data_dir: str | Path, run_dir: str | Path, resume: Path | None = None,
              progress: bool = True) -> TrainOutcome:
    """Train a LoRA adapter on data_dir/{train,valid}.jsonl into run_dir; returns how the run ended."""
    from mlx_lora.training import events

    data_dir, run_dir = Path(data_dir), Path(run_dir)
    train_file, valid_file = _data_files(data_dir)
    backend = backends.resolve(cfg.backend.name)
    model_dir = model_dir_for(cfg, progress)
    tokenizer = ChatTokenizer.from_dir(model_dir)
    train, dropped_train = encode_all(tokenizer, read_examples(train_file), cfg.train.max_length)
    valid, dropped_valid = encode_all(tokenizer, read_examples(valid_file), cfg.train.max_length)
    if not train:
        raise UserError(f"{train_file}: no row has an assistant token left within train.max_length")
    stats = {"train_rows": len(train), "valid_rows": len(valid), "dropped_rows": dropped_train + dropped_valid,
             "supervised_tokens": sum(r.supervised for r in train), "tokens": sum(len(r.ids) for r in train)}
    if resume is None and (run_dir / "adapter").exists():
        raise UserError(f"{run_dir}: already holds a trained adapter; choose another --out or pass --resume")
    if os.environ.get("RANK", "0") == "0":
        run_dir.mkdir(parents=True, exist_ok=True)
    listeners = events.standard_listeners(run_dir, progress)

    def on_event(event: dict) -> None:
        # The manifest describes the run only once the model, LoRA and any resume check have passed: written
        # earlier, a failed resume with other settings would leave the old adapter under a manifest that no
        # longer fits it.
        if event.get("type") == "start" and os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 writes
            write_json(run_dir / "manifest.json",
                       manifest(cfg, backend.name, model_dir, [train_file, valid_file], stats))
        listeners(event)

    loaded = backend.load(model_dir, None, cfg)
    outcome = backend.train(loaded, train, valid, cfg, run_dir, on_event, resume=resume)
    events.finish(run_dir, outcome)
    return outcome


def read_manifest(run_dir: Path) -> dict:
    path = run_dir / "manifest.json"
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable run manifest ({exc}); is {run_dir} a run directory?") from None
    try:  # what generation and evaluation read from it
        run["config"]["lora"], run["config"]["data"]["system_prompt"], run["base_model"]["path"]
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a run manifest (no {exc}); pass a run directory that `mlx-lora train` "
                        "wrote, or the adapter folder itself") from None
    return run


def adapter_location(adapter: str | Path) -> tuple[Path, dict | None]:
    """A run directory (its adapter/ and manifest) or a bare adapter folder of either format."""
    adapter = Path(adapter)
    if (adapter / "manifest.json").is_file() and (adapter / "adapter").is_dir():
        return adapter / "adapter", read_manifest(adapter)
    if (adapter / "adapter_config.json").is_file():
        return adapter, None
    raise UserError(f"{adapter}: not an adapter (expected a run directory or a folder with adapter_config.json)")


def load_for_generation(model: str | None, adapter: str | Path | None, cfg: Config, progress: bool = True):
    """(backend, loaded, tokenizer, system_prompt): the run's manifest supplies model, LoRA and prompt settings."""
    system_prompt = cfg.data.system_prompt
    adapter_dir = None
    if adapter is not None:
        adapter_dir, run = adapter_location(adapter)
        if run is not None:
            # Generation must render prompts exactly as training did: take the run's settings, not today's defaults.
            saved = run["config"]
            apply_mapping(cfg, {"lora": saved["lora"], "data": {"system_prompt": saved["data"]["system_prompt"]}},
                          str(Path(adapter) / "manifest.json"))
            system_prompt = run.get("system_prompt", system_prompt)
            if model is None:
                model = run["base_model"]["path"]
    if model is not None:
        cfg.model.path = str(model)
    backend = backends.resolve(cfg.backend.name)
    model_dir = model_dir_for(cfg, progress)
    loaded = backend.load(model_dir, adapter_dir, cfg)
    return backend, loaded, ChatTokenizer.from_dir(model_dir), system_prompt


def describe_outcome(outcome: TrainOutcome) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(outcome).items()}
