"""A real client reads our GGUF exports: llama.cpp (llama-cpp-python) with the base GGUF + our adapter GGUF, and
with the merged GGUF, gives the torch backend's greedy tokens and logits on a tiny Qwen2."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# CI sets this (.ci/run): there a missing llama-cpp-python is a failure, not a skip that hides a broken install.
REQUIRED = os.environ.get("MLX_LORA_REQUIRE_LLAMA_CPP") == "1"
try:
    import llama_cpp
except ImportError:
    if REQUIRED:
        raise
    pytest.skip("llama-cpp-python is not installed (pip install -e '.[llama]')", allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from conftest import build_tiny_model
from test_gguf_export import BYTE_VOCAB, byte_level_tokenizer, random_peft_adapter

from mlx_lora.backends.gguf_export import write_adapter_gguf, write_model_gguf
from mlx_lora.core.config import Config, GenerateConfig
from mlx_lora.data.render import ChatTokenizer

QUESTIONS = ["VPN 怎麼設定?", "識別證掉了怎麼辦", "What is the leave policy?"]
SYSTEM = "你是公司內部 FAQ 助理,只依據公司規範回答。"
NEW_TOKENS = 12
# float32 weights on both sides, llama.cpp's KV cache in float32 too: only summation order differs.
LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A lively tiny Qwen2 (large random weights: greedy tokens change from step to step), a random adapter that
    changes its answers, and the three GGUF files."""
    root = tmp_path_factory.mktemp("llama-cpp")
    tokenizer = byte_level_tokenizer(root / "tok")
    model = build_tiny_model(root / "model", BYTE_VOCAB, tokenizer, seed=3, init=0.3, bias=0.1)
    adapter = random_peft_adapter(root / "adapter", alpha=16.0, std=0.3)
    write_model_gguf(model, root / "base.gguf", "f32")
    write_adapter_gguf(adapter, model, root / "adapter.gguf", "f32")
    write_model_gguf(model, root / "merged.gguf", "f32", adapter=adapter)
    tok = ChatTokenizer.from_dir(model)
    prompts = [tok.prompt_ids([{"role": "user", "content": q}], SYSTEM) for q in QUESTIONS]
    return root, model, adapter, prompts


def torch_run(model: Path, adapter: Path | None, prompts: list[list[int]]):
    """(greedy tokens, last-prompt-position logits) per prompt from our torch backend in float32."""
    from mlx_lora.backends.torch import TorchBackend

    torch.set_num_threads(1)
    cfg = Config()
    cfg.model.dtype = "float32"
    backend = TorchBackend()
    loaded = backend.load(model, adapter, cfg)
    tokens = backend.generate(loaded, prompts, GenerateConfig(max_new_tokens=NEW_TOKENS, temperature=0.0), [])
    with torch.no_grad():
        logits = [loaded.model(input_ids=torch.tensor([p])).logits[0, -1].numpy() for p in prompts]
    return tokens, logits


def llama_run(base: Path, lora: Path | None, prompts: list[list[int]]):
    """The same from llama.cpp, fed token ids (no text round trip), greedy by argmax over its logits."""
    llm = llama_cpp.Llama(
        model_path=str(base),
        lora_path=str(lora) if lora else None,
        n_ctx=256,
        n_batch=256,
        n_threads=1,
        logits_all=True,  # llama-cpp-python keeps logits only then; the test reads them after each step
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )
    tokens, first_logits = [], []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        first_logits.append(np.array(llm.scores[llm.n_tokens - 1]))
        out = []
        for _ in range(NEW_TOKENS):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        tokens.append(out)
    return tokens, first_logits, llm


def test_base_plus_adapter_gguf_matches_torch(setup):
    root, model, adapter, prompts = setup
    want_tokens, want_logits = torch_run(model, adapter, prompts)
    base_tokens, _ = torch_run(model, None, prompts)
    assert want_tokens != base_tokens, "the adapter must change the answers, or the test proves nothing"
    tokens, logits, _ = llama_run(root / "base.gguf", root / "adapter.gguf", prompts)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        np.testing.assert_allclose(got, want, rtol=0, atol=LOGIT_ATOL)


def test_merged_gguf_matches_torch(setup):
    root, model, adapter, prompts = setup
    want_tokens, want_logits = torch_run(model, adapter, prompts)
    tokens, logits, _ = llama_run(root / "merged.gguf", None, prompts)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        np.testing.assert_allclose(got, want, rtol=0, atol=LOGIT_ATOL)


def test_llama_cpp_tokenizes_and_templates_like_training(setup):
    """The GGUF's vocabulary, merges, split and chat template give llama.cpp our prompt token ids from text."""
    root, model, _, prompts = setup
    _, _, llm = llama_run(root / "base.gguf", None, prompts[:1])
    tok = ChatTokenizer.from_dir(model)
    for question, prompt in zip(QUESTIONS, prompts):
        text = tok.render([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}], True)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == prompt
    assert llm.metadata["tokenizer.chat_template"] == (model / "chat_template.jinja").read_text(encoding="utf-8")
