"""Convert a GGUF checkpoint into a plain float32 safetensors folder that transformers and mlx-lm both load."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

# Qwen2.5's ChatML template (tool calls left out), used only if a GGUF carries no template of its own.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@contextlib.contextmanager
def _quiet_progress(progress: bool):
    """Silence transformers' progress bars when asked, including the GGUF loader's own bare tqdm."""
    if progress:
        yield
        return
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF loader calls tqdm without a disable switch; patching its module global is the only handle.
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def _fix_config(config_path: Path, rope_theta: float | None, tied: bool) -> None:
    config = json.loads(config_path.read_text())
    # transformers 5 writes rope_theta only inside rope_parameters; mlx-lm reads the top-level key and
    # otherwise silently assumes 1e6, so spell it out.
    if rope_theta is not None:
        config["rope_theta"] = rope_theta
    config["tie_word_embeddings"] = tied
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _ensure_chat_template(folder: Path) -> None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file() and "<|im_start|>" in jinja.read_text():
        return
    tokenizer_config = folder / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text()) if tokenizer_config.is_file() else {}
    if "<|im_start|>" in str(settings.get("chat_template", "")):
        return
    # Training and inference must render prompts alike; without a template each tool would improvise one.
    jinja.write_text(QWEN25_CHAT_TEMPLATE)


def convert_gguf_to_hf(gguf_path, out_dir, progress: bool = True) -> Path:
    """Dequantize gguf_path into a float32 Hugging Face folder at out_dir (written atomically); return out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    src_dir, name = gguf_path.parent, gguf_path.name
    with _quiet_progress(progress):
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, trust_remote_code=False)
        loaded = AutoModelForCausalLM.from_pretrained(
            src_dir, gguf_file=name, dtype=torch.float32, trust_remote_code=False
        )
    state = loaded.state_dict()
    config = loaded.config
    # save_pretrained refuses a GGUF-loaded model ("not serializable"), so rebuild a plain one from its config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Q4_K_M files usually quantize output.weight differently from token_embd, so the two differ even when
    # the original model tied them: tie only if the loaded tensors really are identical.
    tied = "lm_head.weight" not in state or torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    config.tie_word_embeddings = tied
    # Built on the meta device and filled by assignment: a random init of 0.5B weights that are overwritten at
    # once cost ~10 s of the conversion. Only persistent weights are saved, so meta rotary buffers do no harm.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.tie_weights()
    del loaded, state
    rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build beside out_dir and rename at the end: a folder with config.json at out_dir is always complete.
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        with _quiet_progress(progress):
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _fix_config(tmp / "config.json", rope_theta, tied)
        _ensure_chat_template(tmp)
        # mkdtemp (and safetensors' writer) leave things owner-only; a model cache should read like any other.
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Another process finished the same conversion first; keep its folder.
            if not (out_dir / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
