"""GGUF files llama.cpp and Ollama load: a LoRA adapter, a Qwen2 model, a merged model (numpy + gguf only)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from mlx_lora.backends.adapters import AdapterInfo, lora_pairs
from mlx_lora.core.errors import UserError
from mlx_lora.core.files import replaced_file
from mlx_lora.core.gguf_convert import QWEN2_SPLIT, QWEN25_CHAT_TEMPLATE, gguf_tensor_name
from mlx_lora.data.render import read_chat_template

# What --type names: the type of every matrix written. Vectors (norms, biases) stay float32 whatever the type, as
# llama.cpp's own converter keeps them.
TYPES = ("f32", "f16", "q8_0")
# llama.cpp's llama_ftype values for general.file_type.
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}
_Q8_BLOCK = 32
# llama.cpp's token_type values (llama_token_type).
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5

_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}


class ModelWeights:
    """The tensors of a model folder's safetensors files, read one at a time from a memory map as float32: a
    merged export never holds two copies of the model."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.where: dict[str, tuple[Path, int, dict]] = {}
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"{folder}: no *.safetensors weights; give the model folder the run was trained on")
        for path in files:
            try:
                with open(path, "rb") as f:
                    (size,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(size))
            except (OSError, struct.error, ValueError):
                raise UserError(f"{path}: not a readable safetensors file (corrupt or truncated)") from None
            for name, spec in header.items():
                if name != "__metadata__":
                    self.where[name] = (path, 8 + size, spec)

    def shape(self, name: str) -> tuple[int, ...] | None:
        found = self.where.get(name)
        return tuple(found[2]["shape"]) if found else None

    def get(self, name: str) -> np.ndarray:
        path, base, spec = self.where[name]
        start, end = spec["data_offsets"]
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
        if spec["dtype"] == "BF16":  # no numpy bf16: widen by shifting into float32's high half (exact)
            values = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif spec["dtype"] in _SAFETENSORS_DTYPES:
            values = raw.view(_SAFETENSORS_DTYPES[spec["dtype"]]).astype(np.float32)
        else:
            raise UserError(f"{path}: tensor {name} has dtype {spec['dtype']}, which a GGUF export cannot read")
        return values.reshape(spec["shape"])


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        return {}
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    return data if isinstance(data, dict) else {}


def model_config(model_dir: Path) -> dict:
    """config.json of a Qwen2 folder (a multimodal wrapper's text_config), refused in one line otherwise."""
    config = _read_json(model_dir / "config.json")
    config = config.get("text_config", config)
    if config.get("model_type") != "qwen2":
        raise UserError(
            f"{model_dir / 'config.json'}: model_type {config.get('model_type')!r}; GGUF export writes Qwen2 models "
            "only (the embedded model and its family)"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(f"{model_dir / 'config.json'}: rope scaling {rope.get('rope_type')!r} cannot be exported")
    return config


def _rope_theta(config: dict) -> float:
    return float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def _split_regex(tokenizer: dict) -> str | None:
    pre = tokenizer.get("pre_tokenizer") or {}
    for step in [pre, *(pre.get("pretokenizers") or [])]:
        if step.get("type") == "Split":
            return (step.get("pattern") or {}).get("Regex")
    return None


def vocabulary(model_dir: Path, vocab_size: int) -> dict:
    """GGUF's tokenizer fields from tokenizer.json: tokens in byte-level spelling by id, their types, the merges;
    ids the embedding has and the tokenizer lacks are `[PADn]` (unused), as llama.cpp's converter writes them."""
    path = model_dir / "tokenizer.json"
    tokenizer = _read_json(path)
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UserError(f"{path}: not a byte-level BPE tokenizer; GGUF export writes Qwen2 tokenizers only")
    if _split_regex(tokenizer) != QWEN2_SPLIT:
        # llama.cpp picks its split by name (tokenizer.ggml.pre); another split under Qwen2's name would tokenize
        # text differently from training.
        raise UserError(f"{path}: the tokenizer does not split text as Qwen2's does; it cannot be exported to GGUF")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [_UNUSED] * vocab_size
    # A folder converted from a GGUF keeps its `[PADn]` fillers in the vocabulary: they stay unused tokens.
    entries = [(t, i, _UNUSED if t == f"[PAD{i}]" else _NORMAL) for t, i in model["vocab"].items()]
    entries += [
        (added["content"], added["id"], _CONTROL if added.get("special") else _USER_DEFINED)
        for added in tokenizer.get("added_tokens") or []
    ]
    for token, index, kind in entries:
        if not 0 <= index < vocab_size:
            raise UserError(f"{path}: token {token!r} has id {index}, past the model's {vocab_size} embedding rows")
        tokens[index], types[index] = token, kind
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {"tokens": tokens, "types": types, "merges": merges}


def _special_ids(model_dir: Path, config: dict, tokens: list[str]) -> dict[str, int]:
    """bos / eos / padding ids: the tokenizer's named tokens first (eos is the chat's end of turn), else config's."""
    settings = _read_json(model_dir / "tokenizer_config.json")
    index = {token: i for i, token in enumerate(tokens)}
    ids = {}
    fields = (("bos", "bos_token", "bos_token_id"), ("eos", "eos_token", "eos_token_id"))
    for key, named, number in fields + (("pad", "pad_token", "pad_token_id"),):
        token = settings.get(named)
        token = token.get("content") if isinstance(token, dict) else token
        value = index.get(token) if isinstance(token, str) else None
        if value is None:
            value = config.get(number)
            value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int):
            ids[key] = value
    return ids


def _add_matrix(writer, name: str, array: np.ndarray, kind: str) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim == 1 or kind == "f32":
        writer.add_tensor(name, array)
    elif kind == "q8_0" and array.shape[-1] % _Q8_BLOCK == 0:
        writer.add_tensor(name, quantize(array, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    else:  # f16, and q8_0 rows that are no whole number of blocks (lora_b's rank-long rows), as llama.cpp does
        writer.add_tensor(name, array.astype(np.float16))


def _write(writer, tmp: Path, progress: bool) -> None:
    writer.write_header_to_file(path=tmp)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()


def _add_metadata(writer, kind: str, name: str | None, extra: dict[str, str] | None) -> None:
    from gguf import GGML_QUANT_VERSION

    if name:
        writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[kind])
    if kind == "q8_0":
        writer.add_quantization_version(GGML_QUANT_VERSION)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)


def _module_names(
    pairs: dict[str, tuple[np.ndarray, np.ndarray]], weights: ModelWeights, where: Path
) -> dict[str, str]:
    """module path → GGUF weight name, each checked against the base model's weight shape (out, in)."""
    names = {}
    for module, (a, b) in pairs.items():
        hf_name = f"{module}.weight"
        gguf_name = gguf_tensor_name(hf_name)
        if gguf_name is None or gguf_name.startswith(("token_embd", "output.")):
            raise UserError(f"{where}: LoRA on {module} cannot be exported (GGUF adapters cover the layers' linears)")
        shape = weights.shape(hf_name)
        if shape != (b.shape[0], a.shape[1]):
            raise UserError(
                f"{where}: {module} is {b.shape[0]}×{a.shape[1]} in the adapter but {shape} in the base model "
                f"{weights.folder}; export it with the base model it was trained on"
            )
        names[module] = gguf_name
    return names


def write_adapter_gguf(
    adapter: Path,
    model_dir: Path,
    out: Path,
    kind: str = "f32",
    name: str | None = None,
    extra: dict[str, str] | None = None,
    progress: bool = False,
) -> AdapterInfo:
    """llama.cpp's LoRA adapter GGUF (general.type adapter, adapter.type lora, adapter.lora.alpha): per adapted
    weight `blk.N.<name>.weight.lora_a` of ggml shape (in, rank) and `.lora_b` of (rank, out), i.e. PEFT's A and B
    as they are. llama.cpp scales B·A by alpha / rank, so alpha is written as scale × rank (rsLoRA included)."""
    from gguf import GGUFWriter

    info, pairs = lora_pairs(adapter)
    names = _module_names(pairs, ModelWeights(model_dir), adapter)
    with replaced_file(out) as tmp:
        writer = GGUFWriter(None, "qwen2")
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(info.scale * info.rank))
        _add_metadata(writer, kind, name, extra)
        for module, (a, b) in pairs.items():
            # GGUF lists dimensions innermost first, so numpy's (rank, in) is ggml's (in, rank): llama.cpp's lora_a.
            _add_matrix(writer, f"{names[module]}.lora_a", a, kind)
            _add_matrix(writer, f"{names[module]}.lora_b", b, kind)
        _write(writer, tmp, progress)
    return info


def write_model_gguf(
    model_dir: Path,
    out: Path,
    kind: str = "f16",
    adapter: Path | None = None,
    name: str | None = None,
    extra: dict[str, str] | None = None,
    progress: bool = False,
) -> AdapterInfo | None:
    """A Qwen2 model GGUF of the Hugging Face folder model_dir, tokenizer and chat template included; with an
    adapter, its update scale · B @ A is added to each weight in float32 first (a merged model)."""
    from gguf import GGUFWriter

    config = model_config(model_dir)
    weights = ModelWeights(model_dir)
    info, pairs, merged = None, {}, {}
    if adapter is not None:
        info, pairs = lora_pairs(adapter)
        merged = {f"{module}.weight": pair for module, pair in pairs.items()}
        _module_names(pairs, weights, adapter)
    embed = weights.shape("model.embed_tokens.weight")
    if embed is None:
        raise UserError(f"{model_dir}: no model.embed_tokens.weight; not a Qwen2 model folder")
    vocab = vocabulary(model_dir, embed[0])
    ids = _special_ids(model_dir, config, vocab["tokens"])
    layers = int(config["num_hidden_layers"])

    with replaced_file(out) as tmp:
        writer = GGUFWriter(None, "qwen2")
        writer.add_type("model")
        _add_metadata(writer, kind, name, extra)
        writer.add_block_count(layers)
        writer.add_context_length(int(config.get("max_position_embeddings", 32768)))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(int(config["num_attention_heads"]))
        writer.add_head_count_kv(int(config.get("num_key_value_heads", config["num_attention_heads"])))
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        for key, value in ids.items():
            getattr(writer, f"add_{key}_token_id")(value)
        writer.add_add_bos_token(False)  # Qwen2 adds no BOS: the chat template writes every marker itself
        writer.add_chat_template(read_chat_template(model_dir) or QWEN25_CHAT_TEMPLATE)

        for hf_name in sorted(weights.where, key=_tensor_order):
            gguf_name = gguf_tensor_name(hf_name)
            if gguf_name is None:
                raise UserError(f"{model_dir}: tensor {hf_name} has no place in a Qwen2 GGUF")
            values = weights.get(hf_name)
            if hf_name in merged:
                a, b = merged[hf_name]
                values = values + np.float32(info.scale) * (b @ a)
            _add_matrix(writer, gguf_name, values, kind)
        _write(writer, tmp, progress)
    return info


def _tensor_order(hf_name: str) -> tuple:
    # Layer by layer, in number order (not the string order 0, 1, 10, 11, …), the top-level tensors first.
    parts = hf_name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        return (1, int(parts[2]), hf_name)
    return (0, 0, hf_name)
