"""`export gguf` end to end: a run's adapter (or merged model) as GGUF, its base, an Ollama Modelfile, a model card."""

from __future__ import annotations

import shlex
from pathlib import Path

from mlx_lora.backends.gguf_export import TYPES, write_adapter_gguf, write_model_gguf
from mlx_lora.backends.loading import adapter_location, answer_budget, check_base_model
from mlx_lora.core.config import Config
from mlx_lora.core.errors import UserError
from mlx_lora.core.files import replaced_files
from mlx_lora.core.model_store import default_cache_dir, join_embedded_gguf, local_model_dir
from mlx_lora.training.card import CARD, is_ours, model_card

MODELFILE = "Modelfile"
MODELFILE_MARK = "# Written by mlx-lora export gguf; rewritten whole by the next export into this folder."
# Ollama's Go template for the ChatML turns the adapter was trained on (`<|im_start|>role\ncontent<|im_end|>\n`,
# then the assistant's opening line); the system turn comes from SYSTEM, so .Messages' own system turn is skipped.
CHATML_OLLAMA = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\n"
    '{{- range .Messages }}\n{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
    "{{ end }}\n{{- end }}<|im_start|>assistant\n"
)
STOPS = ("<|im_end|>", "<|endoftext|>")


def _check_beside(out: Path) -> None:
    """Refuse before any work when a Modelfile or README.md beside --out is a user's file, not one we wrote."""
    modelfile = out.parent / MODELFILE
    try:
        first = modelfile.read_text(encoding="utf-8").splitlines()[:1]
    except FileNotFoundError:
        first = [MODELFILE_MARK]
    except (OSError, UnicodeDecodeError):
        first = []
    for path, ours in ((modelfile, first == [MODELFILE_MARK]), (out.parent / CARD, is_ours(out.parent / CARD))):
        if not ours:
            raise UserError(f"{path}: exists and was not written by mlx-lora export; choose an --out in another folder")


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise UserError(f'{what} holds """, which an Ollama Modelfile cannot quote; change it before exporting')
    return f'"""{text}"""'


def modelfile(base: str, adapter: str | None, system_prompt: str | None, generate: dict) -> str:
    """An Ollama Modelfile: the base GGUF, the adapter GGUF, the trained system prompt, ChatML, stop tokens."""
    lines = [MODELFILE_MARK, f"FROM {base}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    lines.append(f"TEMPLATE {_quoted(CHATML_OLLAMA, 'the chat template')}")
    if system_prompt:
        lines.append(f"SYSTEM {_quoted(system_prompt, 'the system prompt')}")
    lines += [f'PARAMETER stop "{stop}"' for stop in STOPS]
    # The settings the run was evaluated with: greedy answers of at most max_new_tokens tokens.
    lines.append(f"PARAMETER temperature {generate.get('temperature', 0.0)}")
    if generate.get("max_new_tokens"):
        lines.append(f"PARAMETER num_predict {generate['max_new_tokens']}")
    return "\n".join(lines) + "\n"


def _base_gguf(spec: str, cache_dir, progress: bool) -> Path | None:
    """The GGUF file the base model was prepared from, when there is one: the embedded model's joined file or a
    .gguf given as the model; None for a Hugging Face folder (then a base GGUF is written)."""
    if spec == "embedded":
        return join_embedded_gguf(Path(cache_dir) if cache_dir else default_cache_dir(), progress=progress)
    path = Path(spec).expanduser()
    return path.resolve() if path.is_file() and path.suffix.lower() == ".gguf" else None


def export_gguf(
    cfg: Config,
    adapter: str | Path,
    out: str | Path,
    model: str | None = None,
    merged: bool = False,
    kind: str | None = None,
    progress: bool = True,
) -> dict:
    """Write --out (the adapter GGUF, or with merged the whole model) and, beside it, the base GGUF when the base
    has none, a Modelfile and the model card; returns what was written."""
    out = Path(out)
    if out.suffix.lower() != ".gguf":
        raise UserError(f"--out {out}: name a .gguf file")
    if kind is not None and kind not in TYPES:
        raise UserError(f"--type {kind!r}: choose one of {', '.join(TYPES)}")
    folder, run = adapter_location(adapter)
    if run is None and model is None:
        raise UserError(
            f"{folder}: a bare adapter folder names no base model; pass --model (the one it was trained on)"
        )
    _check_beside(out)
    spec = model or run["base_model"]["spec"]
    cache_dir = cfg.model.cache_dir if run is None else (run["config"].get("model") or {}).get("cache_dir")
    model_dir = local_model_dir(spec, cache_dir, progress)
    if run is not None:
        check_base_model(run, model_dir, Path(adapter) / "manifest.json", cache_dir)
    name = Path(adapter).resolve().name
    # The base the adapter was trained on, by hash: llama.cpp checks only the architecture and tensor shapes.
    extra = {"mlx_lora.base_model.sha256": run["base_model"].get("sha256") or ""} if run else {}
    written, export_lines = {}, []
    base = None if merged else _base_gguf(spec, cache_dir, progress)
    base_out = out.with_name(f"{out.stem}-base.gguf") if not merged and base is None else None
    beside = {"modelfile": out.parent / MODELFILE, "card": out.parent / CARD}
    # One set: every file is written to a temp name first and all are renamed together at the end, so a kill
    # leaves the old export or the new one (it left a new GGUF under the old model card, found by kill -9 tests).
    with replaced_files([out, *([base_out] if base_out else []), *beside.values()]) as temp:
        if merged:
            kind = kind or "f16"
            write_model_gguf(model_dir, temp[out], kind, adapter=folder, name=name, extra=extra, progress=progress)
            from_line, adapter_line = f"./{out.name}", None
            export_lines.append(f"- `{out.name}`: the base model with this adapter merged in, {kind}")
        else:
            info = write_adapter_gguf(
                folder, model_dir, temp[out], kind or "f32", name=name, extra=extra, progress=progress
            )
            if base_out is not None:
                write_model_gguf(model_dir, temp[base_out], kind or "f16", name=model_dir.name, progress=progress)
                written["base"] = base_out
                from_line = f"./{base_out.name}"
                export_lines.append(f"- `{base_out.name}`: the base model `{model_dir}` as GGUF, {kind or 'f16'}")
            else:
                from_line = str(base)
                export_lines.append(f"- base model GGUF (not copied): `{base}`")
            adapter_line = f"./{out.name}"
            export_lines.insert(
                0,
                f"- `{out.name}`: llama.cpp LoRA adapter, {kind or 'f32'}, rank {info.rank}, "
                f"alpha {info.scale * info.rank:g}, {len(info.layers)} layers × "
                + ", ".join(m.rsplit(".", 1)[-1] for m in info.modules),
            )
        written["gguf"] = out
        system_prompt = run.get("system_prompt") if run else cfg.data.system_prompt
        generate = dict((run["config"].get("generate") if run else None) or vars(cfg.generate))
        generate["max_new_tokens"] = answer_budget(generate.get("max_new_tokens"), run)
        export_lines += [
            f"- `{MODELFILE}`: `ollama create NAME -f {MODELFILE}` in this folder, then `ollama run NAME`",
            "- llama.cpp: `llama-cli -m BASE.gguf --lora ADAPTER.gguf` (a merged file needs no --lora); prompts are "
            "ChatML with the system prompt above",
        ]
        card_run = run or {"system_prompt": system_prompt, "base_model": {"spec": spec, "path": str(model_dir)}}
        texts = {
            "modelfile": modelfile(from_line, adapter_line, system_prompt, generate),
            "card": model_card(Path(adapter) if run else None, card_run, export_lines),
        }
        for key, text in texts.items():
            temp[beside[key]].write_text(text, encoding="utf-8")
    written["modelfile"], written["card"] = out.parent / MODELFILE, out.parent / CARD
    written["command"] = f"ollama create {shlex.quote(name)} -f {shlex.quote(str(out.parent / MODELFILE))}"
    return written
