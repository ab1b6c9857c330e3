"""GGUF export without any runtime: adapter metadata and ggml shapes, HF → GGUF → HF round trips, merging, the
command's Modelfile and model card, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import build_tiny_model
from safetensors.numpy import load_file, save_file

from mlx_lora.backends.adapters import MLX_WEIGHTS, PEFT_PREFIX, PEFT_WEIGHTS, mlx_config, peft_config
from mlx_lora.backends.gguf_export import write_adapter_gguf, write_model_gguf
from mlx_lora.core.errors import UserError
from mlx_lora.core.gguf_convert import convert_gguf_to_hf

gguf = pytest.importorskip("gguf")

TARGETS = {"q_proj": (64, 64), "v_proj": (32, 64), "down_proj": (64, 128)}  # module → (out, in) in the tiny model
RANK = 4


def random_peft_adapter(folder: Path, layers=(0, 1), alpha: float = 16.0, seed: int = 1, std: float = 0.2) -> Path:
    """A PEFT adapter with random A and B (a freshly initialised one has B = 0 and would change nothing)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in layers:
        for module, (out, inp) in TARGETS.items():
            group = "mlp" if module.endswith("down_proj") else "self_attn"
            key = f"{PEFT_PREFIX}model.layers.{layer}.{group}.{module}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((RANK, inp)) * std).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((out, RANK)) * std).astype(np.float32)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    config = peft_config(RANK, alpha, 0.0, list(TARGETS), list(layers))
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def to_mlx(peft: Path, folder: Path) -> Path:
    """The same adapter in mlx-lm's layout, written by hand: lora_a (in, r), lora_b (r, out)."""
    tensors = load_file(str(peft / PEFT_WEIGHTS))
    out = {}
    for name, array in tensors.items():
        module = name.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0]
        out[f"{module}.lora_{'a' if '.lora_A.' in name else 'b'}"] = np.ascontiguousarray(array.T)
    folder.mkdir(parents=True)
    save_file(out, str(folder / MLX_WEIGHTS), metadata={"format": "mlx"})
    config = mlx_config(RANK, 16.0 / RANK, 0.0, [f"self_attn.{m}" for m in TARGETS], 2)
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0-2: <|im_end|> is the tiny models' eos (2)
MERGES = (("V", "P"), ("VP", "N"), ("Ġ", "t"), ("æ", "ĺ"))
BYTE_VOCAB = 320  # 3 specials + 256 bytes + 4 merges, padded as Qwen pads its embedding


def byte_level_tokenizer(out: Path) -> Path:
    """A Qwen2-style byte-level BPE tokenizer (Qwen2's split, ChatML markers) over a 320-word vocabulary: GGUF
    files of a real 151k vocabulary take a minute to parse, this one milliseconds."""
    from mlx_lora.core.gguf_convert import _build_tokenizer, _bytes_to_unicode
    from mlx_lora.data.render import CHATML_TEMPLATE

    alphabet = [_bytes_to_unicode()[b] for b in range(256)]
    tokens = [*SPECIALS, *alphabet, *("".join(pair) for pair in MERGES)]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    tokenizer = _build_tokenizer(tokens, types, [" ".join(pair) for pair in MERGES], "qwen2")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    settings = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "add_bos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    (out / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory) -> Path:
    return byte_level_tokenizer(tmp_path_factory.mktemp("byte-tok"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, byte_tok) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("gguf-tiny"), BYTE_VOCAB, byte_tok, bias=0.1)


def fields(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return meta, {t.name: t for t in reader.tensors}


def test_adapter_gguf_follows_llama_cpp_conventions(tmp_path, tiny):
    adapter = random_peft_adapter(tmp_path / "adapter", alpha=16.0)
    info = write_adapter_gguf(adapter, tiny, tmp_path / "a.gguf", "f32")
    meta, tensors = fields(tmp_path / "a.gguf")
    assert meta["general.architecture"] == "qwen2"
    assert meta["general.type"] == "adapter"
    assert meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(16.0)
    assert info.rank == RANK
    a = tensors["blk.1.attn_v.weight.lora_a"]
    b = tensors["blk.1.attn_v.weight.lora_b"]
    # llama.cpp: lora_a's ne = (n_in, rank), lora_b's ne = (rank, n_out), with n_in/n_out the base weight's ne.
    assert a.shape.tolist() == [64, RANK] and b.shape.tolist() == [RANK, 32]
    assert tensors["blk.0.ffn_down.weight.lora_a"].shape.tolist() == [128, RANK]
    assert len(tensors) == 2 * 2 * len(TARGETS)
    peft = load_file(str(adapter / PEFT_WEIGHTS))
    key = f"{PEFT_PREFIX}model.layers.1.self_attn.v_proj"
    np.testing.assert_array_equal(a.data.reshape(RANK, 64), peft[f"{key}.lora_A.weight"])
    np.testing.assert_array_equal(b.data.reshape(32, RANK), peft[f"{key}.lora_B.weight"])


def test_mlx_adapter_exports_the_same_tensors_as_its_peft_twin(tmp_path, tiny):
    peft = random_peft_adapter(tmp_path / "peft", alpha=16.0)
    mlx = to_mlx(peft, tmp_path / "mlx")
    write_adapter_gguf(peft, tiny, tmp_path / "p.gguf")
    write_adapter_gguf(mlx, tiny, tmp_path / "m.gguf")
    (meta_p, tp), (meta_m, tm) = fields(tmp_path / "p.gguf"), fields(tmp_path / "m.gguf")
    assert meta_p["adapter.lora.alpha"] == meta_m["adapter.lora.alpha"]
    assert tp.keys() == tm.keys()
    for name in tp:
        np.testing.assert_array_equal(tp[name].data, tm[name].data)


def test_rslora_alpha_is_written_as_llama_cpp_scales_it(tmp_path, tiny):
    adapter = random_peft_adapter(tmp_path / "adapter", alpha=8.0)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    write_adapter_gguf(adapter, tiny, tmp_path / "a.gguf")
    # rsLoRA scales by alpha / sqrt(r); llama.cpp by alpha / r, so the file carries scale × r.
    assert fields(tmp_path / "a.gguf")[0]["adapter.lora.alpha"] == pytest.approx(8.0 / RANK**0.5 * RANK)


def test_model_gguf_round_trips_through_the_converter(tmp_path, tiny):
    write_model_gguf(tiny, tmp_path / "m.gguf", "f32")
    meta, _ = fields(tmp_path / "m.gguf")
    assert meta["general.type"] == "model" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert meta["tokenizer.ggml.eos_token_id"] == 2 and meta["tokenizer.ggml.padding_token_id"] == 0
    assert meta["tokenizer.ggml.tokens"][-1] == f"[PAD{BYTE_VOCAB - 1}]" and meta["tokenizer.ggml.token_type"][-1] == 5
    back = convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "back", progress=False)
    original, again = load_file(str(tiny / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert original.keys() == again.keys()
    for name in original:
        np.testing.assert_array_equal(original[name], again[name], err_msg=name)
    config, config_back = (json.loads((d / "config.json").read_text()) for d in (tiny, back))
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "intermediate_size", "vocab_size"):
        assert config[key] == config_back[key], key
    from tokenizers import Tokenizer

    text = "<|im_start|>user\n識別證掉了怎麼辦? VPN 123<|im_end|>"
    ours, theirs = (Tokenizer.from_file(str(d / "tokenizer.json")) for d in (tiny, back))
    assert ours.encode(text).ids == theirs.encode(text).ids


def test_merged_gguf_adds_scale_b_a(tmp_path, tiny):
    adapter = random_peft_adapter(tmp_path / "adapter", alpha=8.0)
    write_model_gguf(tiny, tmp_path / "merged.gguf", "f32", adapter=adapter)
    back = load_file(
        str(convert_gguf_to_hf(tmp_path / "merged.gguf", tmp_path / "back", progress=False) / "model.safetensors")
    )
    base, lora = load_file(str(tiny / "model.safetensors")), load_file(str(adapter / PEFT_WEIGHTS))
    name = "model.layers.1.mlp.down_proj"
    expected = base[f"{name}.weight"] + (8.0 / RANK) * (
        lora[f"{PEFT_PREFIX}{name}.lora_B.weight"] @ lora[f"{PEFT_PREFIX}{name}.lora_A.weight"]
    )
    np.testing.assert_allclose(back[f"{name}.weight"], expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(back["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])


@pytest.mark.parametrize("kind, atol", [("f16", 2e-3), ("q8_0", 2e-2)])
def test_smaller_types_stay_close(tmp_path, tiny, kind, atol):
    write_model_gguf(tiny, tmp_path / "m.gguf", kind)
    _, tensors = fields(tmp_path / "m.gguf")
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    expected_type = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    assert tensors["blk.0.attn_q.weight"].tensor_type == expected_type
    back = load_file(
        str(convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "back", progress=False) / "model.safetensors")
    )
    base = load_file(str(tiny / "model.safetensors"))
    np.testing.assert_allclose(
        back["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"], atol=atol
    )


def test_adapter_for_another_base_is_one_line(tmp_path, byte_tok):
    other = build_tiny_model(tmp_path / "other", BYTE_VOCAB, byte_tok, hidden=32, heads=2, kv_heads=1)
    adapter = random_peft_adapter(tmp_path / "adapter")
    with pytest.raises(UserError, match="trained on"):
        write_adapter_gguf(adapter, other, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def _cli(*args, cwd: Path):
    return subprocess.run(
        [sys.executable, "-m", "mlx_lora", *args], capture_output=True, text=True, cwd=cwd, check=False
    )


def test_export_command_writes_gguf_base_modelfile_and_card(tmp_path, tiny):
    adapter = random_peft_adapter(tmp_path / "adapter")
    out = tmp_path / "export" / "kb.gguf"
    result = _cli(
        "export", "gguf", "--adapter", str(adapter), "--model", str(tiny), "--out", str(out),
        "--set", "generate.max_new_tokens=null", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.is_file() and (out.parent / "kb-base.gguf").is_file()
    modelfile = (out.parent / "Modelfile").read_text(encoding="utf-8")
    assert "PARAMETER num_predict 150\n" in modelfile  # null, and a bare adapter records no answer lengths
    assert "FROM ./kb-base.gguf\nADAPTER ./kb.gguf\n" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "<|im_start|>assistant\n" in modelfile
    assert 'SYSTEM """你是公司內部 FAQ 助理' in modelfile
    card = (out.parent / "README.md").read_text(encoding="utf-8")
    assert "## Intended use" in card and "kb.gguf" in card
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "README.md", "kb-base.gguf", "kb.gguf"]

    (out.parent / "README.md").write_text("my own notes\n", encoding="utf-8")
    again = _cli("export", "gguf", "--adapter", str(adapter), "--model", str(tiny), "--out", str(out), cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "README.md: exists and was not written by mlx-lora export" in again.stderr


def test_an_export_that_fails_late_leaves_the_whole_earlier_export(tmp_path, tiny):
    adapter = random_peft_adapter(tmp_path / "adapter")
    out = tmp_path / "export" / "kb.gguf"
    args = ["export", "gguf", "--adapter", str(adapter), "--model", str(tiny), "--out", str(out)]
    assert _cli(*args, cwd=tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    # The Modelfile cannot quote this system prompt: the error comes after both GGUFs were written (to temp names).
    failed = _cli(*args, "--type", "f16", "--set", 'data.system_prompt=say """hi"""', cwd=tmp_path)
    assert failed.returncode == 2 and 'holds """' in failed.stderr, failed.stderr
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before  # no new GGUF beside the old card


def test_export_of_a_bare_adapter_needs_a_model(tmp_path):
    adapter = random_peft_adapter(tmp_path / "adapter")
    result = _cli("export", "gguf", "--adapter", str(adapter), "--out", str(tmp_path / "a.gguf"), cwd=tmp_path)
    assert result.returncode == 2 and "pass --model" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_embedded_vocabulary_exports_as_its_gguf_holds_it():
    """The merged export of the embedded model writes the tokenizer fields of the GGUF it was prepared from."""
    from mlx_lora.backends.gguf_export import model_config, vocabulary
    from mlx_lora.core import model_store

    folder = model_store.resolve_model("embedded", progress=False)
    source = gguf.GGUFReader(model_store.join_embedded_gguf(model_store.default_cache_dir(), progress=False))
    tokens = source.get_field("tokenizer.ggml.tokens").contents()
    ours = vocabulary(folder, int(model_config(folder)["vocab_size"]))
    assert ours["tokens"] == tokens
    assert ours["types"] == source.get_field("tokenizer.ggml.token_type").contents()
    assert ours["merges"] == source.get_field("tokenizer.ggml.merges").contents()
