"""Torch generation on tiny random Qwen2 models: batched greedy equals unbatched and HF, early stops, sampling."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from conftest import build_tiny_model
from test_torch_backend import chat_rows, make_cfg, train

from mlx_lora.core.config import Config, GenerateConfig
from mlx_lora.data.render import ChatTokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lively(tmp_path_factory, qwen_tokenizer_dir):
    """A random model with large weights, so greedy output varies from token to token."""
    from mlx_lora.backends.torch import TorchBackend

    path = build_tiny_model(tmp_path_factory.mktemp("lively"), tokenizer_dir=qwen_tokenizer_dir, seed=3, init=0.3)
    backend = TorchBackend()
    return backend, backend.load(path, None, Config()), path


def _prompts(tok):
    questions = ["VPN?", "我在家要怎麼連回公司網路,請詳細說明步驟?", "請假", "badge 不見了要 report 給誰?"]
    return [tok.prompt_ids([{"role": "user", "content": q}], "你是助理") for q in questions]


@pytest.fixture(scope="module")
def tok(lively):
    return ChatTokenizer.from_dir(lively[2])


@pytest.fixture(scope="module")
def barely_trained(tmp_path_factory, qwen_tokenizer_dir):
    """A tiny model after 3 short epochs: it still repeats one token, which the repetition penalty must stop."""
    model = build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), tokenizer_dir=qwen_tokenizer_dir)
    rows_tok = ChatTokenizer.from_dir(model)
    _, _, backend, loaded = train(
        model,
        chat_rows(rows_tok, 12),
        chat_rows(rows_tok, 4, question="VPN 連線"),
        make_cfg(epochs=3),
        tmp_path_factory.mktemp("run"),
    )
    return backend, loaded


def test_batched_greedy_generation_equals_unbatched(lively, tok):
    backend, loaded, _ = lively
    prompts, stops = _prompts(tok), tok.stop_ids()
    streamed: list[tuple[int, int]] = []
    batched = backend.generate(
        loaded,
        prompts,
        GenerateConfig(max_new_tokens=12, batch_size=4),
        stops,
        on_token=lambda i, t: streamed.append((i, t)),
    )
    single = backend.generate(loaded, prompts, GenerateConfig(max_new_tokens=12, batch_size=1), stops)
    assert batched == single
    assert any(len(set(out)) > 3 for out in batched)  # the outputs are not one repeated token
    assert [[t for i, t in streamed if i == k] for k in range(len(prompts))] == batched
    # And the KV-cache loop agrees with transformers' own greedy search.
    for prompt, ours in zip(prompts, single):
        out = loaded.model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=151643,
        )
        hf = out[0, len(prompt) :].tolist()
        assert hf[: len(ours)] == ours and (len(ours) == 12 or hf[len(ours)] in stops)


def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(lively, tok):
    backend, loaded, _ = lively
    prompts = _prompts(tok)
    free = backend.generate(loaded, prompts, GenerateConfig(max_new_tokens=12, batch_size=1), [])
    # Stop on row 1's third token: row 1 (and any row that emits it) ends early, the rest run on in a shrunk batch.
    stop = free[1][2]
    assert any(stop not in out for out in free)
    streamed: list[tuple[int, int]] = []
    batched = backend.generate(
        loaded,
        prompts,
        GenerateConfig(max_new_tokens=12, batch_size=4),
        [stop],
        on_token=lambda i, t: streamed.append((i, t)),
    )
    expected = [out[: out.index(stop)] if stop in out else out for out in free]
    assert batched == expected
    # Streaming still names each token's own row after the batch shrank.
    assert [[t for i, t in streamed if i == k] for k in range(len(prompts))] == expected
    assert len(batched[1]) == 2 and any(len(out) == 12 for out in batched)


def test_sampling_options(lively, tok, barely_trained):
    backend, loaded, _ = lively
    prompts, stops = _prompts(tok), tok.stop_ids()
    greedy = backend.generate(loaded, prompts, GenerateConfig(max_new_tokens=8), stops)
    nucleus = backend.generate(loaded, prompts, GenerateConfig(max_new_tokens=8, temperature=1.0, top_p=1e-9), stops)
    assert nucleus == greedy  # top-p that keeps only the top token is greedy
    hot = GenerateConfig(max_new_tokens=8, temperature=5.0, top_p=1.0)
    assert backend.generate(loaded, prompts, hot, stops) == backend.generate(loaded, prompts, hot, stops)  # seeded
    assert backend.generate(loaded, prompts, hot, stops) != greedy
    # The barely trained model repeats one token; a strong repetition penalty forbids that.
    t_backend, t_loaded = barely_trained
    plain = t_backend.generate(t_loaded, prompts[:1], GenerateConfig(max_new_tokens=6), [])[0]
    penalised = t_backend.generate(t_loaded, prompts[:1], GenerateConfig(max_new_tokens=6, repetition_penalty=1e6), [])[
        0
    ]
    assert len(set(plain)) < len(plain) and len(set(penalised)) == len(penalised)
