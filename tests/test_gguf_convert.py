"""Tests for the torch-free GGUF -> Hugging Face folder converter, on a tiny Qwen2-shaped GGUF written here."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from mlx_lora.core.errors import UserError
from mlx_lora.core.gguf_convert import QWEN25_CHAT_TEMPLATE, convert_gguf_to_hf

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 64, 2, 4, 2, 128, 4096
ROPE_THETA, RMS_EPS = 1_000_000.0, 1e-6
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
# Quantized types that exercise dequantization: Q8_0 and Q5_0 as in Q4_K_M files, F16 as in plain exports.
# Everything else stays F32, as norms and biases do in real files.
QTYPES = {"token_embd.weight": Q.Q8_0, "output.weight": Q.Q8_0, "attn_q.weight": Q.Q5_0, "ffn_down.weight": Q.F16}


def _byte_alphabet() -> list[str]:
    # GPT-2's printable spelling of the 256 bytes, as the vocabulary of a byte-level BPE stores them.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    spelled, extra = {b: chr(b) for b in printable}, 0
    for byte in range(256):
        if byte not in spelled:
            spelled[byte], extra = chr(256 + extra), extra + 1
    return [spelled[b] for b in range(256)]


MERGES = ["h e", "l l", "he ll", "hell o"]
SPECIALS = [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<tool_call>", 4), ("[PAD0]", 5)]
TOKENS = _byte_alphabet() + ["he", "ll", "hell", "hello"] + [token for token, _ in SPECIALS]
TOKEN_TYPES = [1] * (len(TOKENS) - len(SPECIALS)) + [kind for _, kind in SPECIALS]
BOS = TOKENS.index("<|endoftext|>")
EOS = TOKENS.index("<|im_end|>")


def _source_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF-named float32 weights in Hugging Face (out, in) shapes."""
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    shapes = {
        "token_embd.weight": (len(TOKENS), HIDDEN),
        "output_norm.weight": (HIDDEN,),
        "output.weight": (len(TOKENS), HIDDEN),
    }
    for i in range(LAYERS):
        shapes.update(
            {
                f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
                f"blk.{i}.attn_q.bias": (HIDDEN,),
                f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
                f"blk.{i}.attn_k.bias": (KV_HEADS * head_dim,),
                f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
                f"blk.{i}.attn_v.bias": (KV_HEADS * head_dim,),
                f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
                f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
                f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
                f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
                f"blk.{i}.attn_norm.weight": (HIDDEN,),
                f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            }
        )
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _qtype(name: str):
    return QTYPES.get(name.split(".", 2)[-1] if name.startswith("blk.") else name, Q.F32)


def _write_gguf(path, weights, chat_template=TEMPLATE, arch="qwen2"):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("Tiny Qwen2")
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_pad_token_id(BOS)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for name, value in weights.items():
        qtype = _qtype(name)
        writer.add_tensor(name, quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
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


def _hf(name: str) -> str:
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        return f"model.layers.{layer}.{HF_NAMES[rest]}"
    return HF_NAMES[name]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    weights = _source_weights()
    _write_gguf(root / "tiny.gguf", weights)
    out = convert_gguf_to_hf(root / "tiny.gguf", root / "hf" / "tiny", progress=False)
    return weights, out


def test_weights_match_source_under_hf_names(converted):
    weights, out = converted
    state = load_file(out / "model.safetensors")
    assert set(state) == {_hf(name) for name in weights}
    for name, source in weights.items():
        got = state[_hf(name)]
        assert got.dtype == np.float32 and got.shape == source.shape, name
        # Exactly what the file holds (names, shapes and layout right, q/k not permuted for qwen2) ...
        stored = dequantize(quantize(source, _qtype(name)), _qtype(name)).reshape(source.shape)
        np.testing.assert_allclose(got, stored, rtol=0, atol=1e-6, err_msg=name)
        # ... and that is the source up to quantization error.
        np.testing.assert_allclose(got, source, rtol=0, atol=0.15 * np.abs(source).max(), err_msg=name)
    assert any(_qtype(name) == Q.F32 for name in weights)


def test_config_fields_come_from_metadata(converted):
    _, out = converted
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["hidden_size"] == HIDDEN and config["num_hidden_layers"] == LAYERS
    assert config["num_attention_heads"] == HEADS and config["num_key_value_heads"] == KV_HEADS
    assert config["intermediate_size"] == FFN and config["max_position_embeddings"] == CONTEXT
    assert config["vocab_size"] == len(TOKENS)
    assert config["rms_norm_eps"] == pytest.approx(RMS_EPS, rel=1e-6)
    # mlx-lm reads the top-level key, transformers 5 the nested one: both must be there.
    assert config["rope_theta"] == ROPE_THETA and config["rope_parameters"]["rope_theta"] == ROPE_THETA
    assert config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (BOS, EOS, BOS)
    assert config["dtype"] == "float32" and "quantization_config" not in config
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (BOS, EOS)


def test_tokenizer_keeps_specials_whole_and_round_trips(converted):
    _, out = converted
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.get_vocab_size(with_added_tokens=True) == len(TOKENS)
    assert tokenizer.encode("hello").ids == [TOKENS.index("hello")]
    chat = "<|im_start|>user\nhello 你好<tool_call><|im_end|>"
    ids = tokenizer.encode(chat).ids
    for token in ("<|im_start|>", "<|im_end|>", "<tool_call>"):
        assert TOKENS.index(token) in ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == chat
    # <tool_call> is user-defined, so it is plain text when special tokens are skipped; the others are not.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhello 你好<tool_call>"
    assert "[PAD0]" not in [added.content for added in tokenizer.get_added_tokens_decoder().values()]
    settings = json.loads((out / "tokenizer_config.json").read_text())
    assert (settings["bos_token"], settings["eos_token"], settings["pad_token"]) == (
        "<|endoftext|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert (out / "chat_template.jinja").read_text() == TEMPLATE


def test_folder_is_world_readable_and_leaves_no_temp(converted):
    _, out = converted
    assert (out.stat().st_mode & 0o777) == 0o755
    assert all((path.stat().st_mode & 0o777) == 0o644 for path in out.iterdir())
    assert [path.name for path in out.parent.iterdir()] == [out.name]


@pytest.mark.parametrize("output", ["absent", "identical"])
def test_tied_embeddings_and_missing_template_gets_chatml(tmp_path, output):
    weights = _source_weights(seed=1)
    if output == "absent":
        del weights["output.weight"]
    else:  # stored apart but equal, as a tied model exported with both tensors quantized alike
        weights["output.weight"] = weights["token_embd.weight"].copy()
    _write_gguf(tmp_path / "tied.gguf", weights, chat_template=None)
    out = convert_gguf_to_hf(tmp_path / "tied.gguf", tmp_path / "tied", progress=False)
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert (out / "chat_template.jinja").read_text() == QWEN25_CHAT_TEMPLATE


def test_existing_finished_folder_is_kept(tmp_path, converted):
    out = tmp_path / "done"
    out.mkdir()
    (out / "config.json").write_text("{}")
    gguf_path = converted[1].parent.parent / "tiny.gguf"
    assert convert_gguf_to_hf(gguf_path, out, progress=False) == out
    assert [path.name for path in out.iterdir()] == ["config.json"]
    assert [path.name for path in tmp_path.iterdir()] == ["done"]


def test_other_architecture_is_refused_before_writing(tmp_path):
    _write_gguf(tmp_path / "llama.gguf", {"output_norm.weight": np.ones(HIDDEN, np.float32)}, arch="llama")
    with pytest.raises(UserError, match="llama"):
        convert_gguf_to_hf(tmp_path / "llama.gguf", tmp_path / "out", progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["llama.gguf"]


def test_conversion_imports_neither_torch_nor_transformers(tmp_path, converted):
    # A fresh interpreter: this test session may have imported torch through other tests.
    gguf_path = converted[1].parent.parent / "tiny.gguf"
    script = textwrap.dedent(f"""
        import sys
        from mlx_lora.core.gguf_convert import convert_gguf_to_hf
        convert_gguf_to_hf({str(gguf_path)!r}, {str(tmp_path / "out")!r}, progress=False)
        print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "transformers"}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    assert (tmp_path / "out" / "config.json").is_file()
