"""Convert a Qwen2 GGUF checkpoint into a plain float32 safetensors folder that transformers and mlx-lm both load."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mlx_lora.core.errors import UserError
from mlx_lora.core.hf_config import rope_override

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

# The split Qwen2's byte-level BPE merges were learned on; any other split tokenizes text differently.
# Digits go one at a time (\p{N}, not \p{N}{1,3} as in GPT-4-style splits).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre names llama.cpp gives vocabularies that split like Qwen2.
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen"}

# llama.cpp's token_type values (llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# GGUF names inside blk.N. -> Hugging Face names inside model.layers.N.
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name(gguf_name: str, where: Path) -> str:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    if prefix == "blk":
        layer, _, suffix = rest.partition(".")
        if layer.isdigit() and suffix in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[suffix]}"
    raise UserError(f"{where}: GGUF tensor {gguf_name!r} has no place in a Qwen2 model")


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of a Hugging Face Qwen2 tensor (the inverse of _hf_name), or None when GGUF has no place
    for it: export writes models and adapters under the names this converter reads."""
    for gguf_name, name in _TOP_NAMES.items():
        if name == hf_name:
            return gguf_name
    prefix, _, rest = hf_name.partition("model.layers.")
    layer, _, suffix = rest.partition(".")
    if prefix or not layer.isdigit():
        return None
    inverse = {hf: gg for gg, hf in _LAYER_NAMES.items()}
    return f"blk.{layer}.{inverse[suffix]}" if suffix in inverse else None


def _field(reader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _tensors(reader, where: Path, progress: bool) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32 under its Hugging Face name and in its (out, in) shape."""
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    state = {}
    for tensor in tqdm(reader.tensors, desc="Dequantizing GGUF", unit="tensor", disable=not progress):
        # GGUF lists dimensions innermost first (ggml's ne); numpy and torch list them outermost first.
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        # Copy even when already float32: float tensors come back as views into the read-only file mapping.
        # No q/k un-permutation: llama.cpp interleaves rotary halves only for llama-family models, not qwen2.
        state[_hf_name(tensor.name, where)] = np.array(values, dtype=np.float32, order="C")
    return state


def _check_complete(state: dict[str, np.ndarray], layers: int, where: Path) -> None:
    # A folder missing a weight would only fail later, inside whatever tool loads it; say so here instead.
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    expected |= {f"model.layers.{i}.{name}" for i in range(layers) for name in _LAYER_NAMES.values()}
    missing = sorted(expected - state.keys())
    if missing:
        raise UserError(f"{where}: GGUF lacks {len(missing)} Qwen2 tensor(s), e.g. {missing[0]}")


def _bytes_to_unicode() -> dict[int, str]:
    # Byte-level BPE spells each byte as a printable character: printable Latin-1 bytes as themselves,
    # the rest shifted past 255, so that a vocabulary entry is always a plain string.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def _build_tokenizer(tokens: list[str], token_types: list[int], merges: list[str], pre: str | None):
    """The byte-level BPE tokenizer a gpt2-model GGUF describes, shaped like Qwen2's own tokenizer.json."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # llama.cpp stores most tokens already in the byte alphabet but may decode some to real text; respell
    # those, or they would never match the byte-level pre-tokenizer's output.
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    pairs = [tuple(merge.split(" ")) for merge in merges]
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=pairs,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    if pre in _QWEN2_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
    else:
        # An unknown split name: fall back to GPT-2's, the one byte-level BPE started with.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # Qwen2 adds no BOS/EOS around a text: the chat template writes every special token itself.
    tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    # Control tokens (<|im_start|>, ...) must stay whole rather than be cut into BPE pieces, and be skippable
    # when decoding. One spelled outside the byte alphabet is a llama.cpp mislabel; adding it would grow the
    # vocabulary past the embedding, so it is left out.
    types = list(token_types) if token_types is not None else []
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, types)
        if kind == _CONTROL and set(token) <= alphabet
    ]
    if control:
        tokenizer.add_special_tokens(control)
    # User-defined tokens (<tool_call>) are matched whole by llama.cpp too, but are ordinary text when decoding.
    user = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, types)
        if kind == _USER_DEFINED and token in vocab
    ]
    if user:
        tokenizer.add_tokens(user)
    return tokenizer


def _token(tokens: list[str], index) -> str | None:
    return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None


def _config(reader, arch: str, vocab_size: int, tied: bool, ids: dict, where: Path) -> dict:
    def key(name):
        value = _field(reader, f"{arch}.{name}")
        if value is None:
            raise UserError(f"{where}: GGUF metadata lacks {arch}.{name}")
        return value

    layers = int(key("block_count"))
    rope_theta = float(key("rope.freq_base"))
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "dtype": "float32",
        "hidden_act": "silu",
        "hidden_size": int(key("embedding_length")),
        "initializer_range": 0.02,
        "intermediate_size": int(key("feed_forward_length")),
        "layer_types": ["full_attention"] * layers,
        "max_position_embeddings": int(key("context_length")),
        # Qwen2Config's default, unused while use_sliding_window is false; kept so the config reads as before.
        "max_window_layers": 28,
        "num_attention_heads": int(key("attention.head_count")),
        "num_hidden_layers": layers,
        "num_key_value_heads": int(key("attention.head_count_kv")),
        # Stored as float32 in the file; widening it unrounded keeps the value transformers reads from it.
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "sliding_window": None,
        "tie_word_embeddings": tied,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }
    # transformers' GGUF loader recorded the file's model name here; kept so the config reads as before.
    name = _field(reader, "general.name")
    if name:
        config["_model_name_or_path"] = name
    return {**config, **rope_override(config)}  # mlx-lm reads the top-level rope_theta


def _ensure_chat_template(folder: Path) -> None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file() and "<|im_start|>" in jinja.read_text(encoding="utf-8"):
        return
    tokenizer_config = folder / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text(encoding="utf-8")) if tokenizer_config.is_file() else {}
    if "<|im_start|>" in str(settings.get("chat_template", "")):
        return
    # Training and inference must render prompts alike; without a template each tool would improvise one.
    jinja.write_text(QWEN25_CHAT_TEMPLATE, encoding="utf-8")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def convert_gguf_to_hf(gguf_path, out_dir, progress: bool = True) -> Path:
    """Dequantize gguf_path into a float32 Hugging Face folder at out_dir (written atomically); return out_dir."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    # Only Qwen2's tensor layout and tokenizer are spelled out below; any other model would convert wrongly.
    if arch != "qwen2":
        raise UserError(
            f"{gguf_path}: GGUF architecture {arch!r} cannot be converted (only qwen2 can): "
            f"give a Hugging Face model folder instead"
        )
    tokenizer_model = _field(reader, "tokenizer.ggml.model")
    if tokenizer_model != "gpt2":
        raise UserError(
            f"{gguf_path}: GGUF tokenizer {tokenizer_model!r} cannot be converted (only gpt2, "
            f"byte-level BPE, can): give a Hugging Face model folder instead"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    if not tokens or not merges:
        raise UserError(f"{gguf_path}: GGUF carries no tokenizer vocabulary or merges")
    ids = {
        name: _field(reader, f"tokenizer.ggml.{key}_token_id")
        for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))
    }
    ids = {name: None if value is None else int(value) for name, value in ids.items()}

    state = _tensors(reader, gguf_path, progress)
    _check_complete(state, int(_field(reader, f"{arch}.block_count", 0)), gguf_path)
    embed = state["model.embed_tokens.weight"]
    if embed.shape[0] != len(tokens):
        raise UserError(f"{gguf_path}: {len(tokens)} tokens but an embedding of {embed.shape[0]} rows")
    # Q4_K_M files usually quantize output.weight differently from token_embd, so the two differ even when
    # the original model tied them: tie only if the dequantized tensors really are identical.
    head = state.get("lm_head.weight")
    tied = head is None or np.array_equal(head, embed)
    if tied:
        state.pop("lm_head.weight", None)
    config = _config(reader, arch, len(tokens), tied, ids, gguf_path)

    tokenizer = _build_tokenizer(
        tokens, _field(reader, "tokenizer.ggml.token_type"), merges, _field(reader, "tokenizer.ggml.pre")
    )
    tokenizer_config = {
        "add_prefix_space": None,
        "backend": "tokenizers",
        "bos_token": _token(tokens, ids["bos"]),
        "eos_token": _token(tokens, ids["eos"]),
        "pad_token": _token(tokens, ids["pad"]),
        "unk_token": _token(tokens, ids["unk"]),
        # transformers' "no limit" value, as its own save writes it.
        "model_max_length": int(1e30),
        "tokenizer_class": "Qwen2Tokenizer",
    }
    generation_config = {
        "_from_model_config": True,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "output_attentions": False,
        "output_hidden_states": False,
        "use_cache": True,
    }
    chat_template = _field(reader, "tokenizer.chat_template")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build beside out_dir and rename at the end: a folder with config.json at out_dir is always complete.
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        # transformers refuses a safetensors file whose format tag it does not know; "pt" is what it writes.
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        del state, embed, head
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        if chat_template:
            (tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        _write_json(tmp / "generation_config.json", generation_config)
        _write_json(tmp / "config.json", config)
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
