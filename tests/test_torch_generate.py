"""Torch generation on tiny random Qwen2 models: batched greedy equals unbatched and HF, early stops, sampling."""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from conftest import build_tiny_model
from torch_helpers import chat_rows, make_cfg, train

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


def test_draft_takes_what_followed_the_latest_earlier_tail():
    from mlx_lora.backends.torch.lookup import draft

    assert draft([1, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2, 3], 2) == [4, 5]  # latest earlier "1 2 3", not the first
    assert draft([7, 8, 9, 8], 3) == []  # "9 8" never came before, and a 1-token match is not enough by default
    assert draft([7, 8, 9, 8], 3, min_ngram=1) == [9, 8]  # the 1-gram "8" did: what followed it
    assert draft([5], 4) == [] and draft([], 4) == []


def test_draft_falls_back_to_earlier_answers_and_remembers_each_once():
    from mlx_lora.backends.torch.lookup import AnswerMemory, draft

    memory = AnswerMemory()
    memory.add([[40, 41, 42, 43], [50, 51, 52]], max_new_tokens=8, stop_id=2)
    assert draft([1, 40, 41], 3, memory=memory) == [42, 43, 2]  # in no prompt: an earlier answer has it, and its stop
    assert draft([40, 41, 7, 40, 41], 2, memory=memory) == [7, 40]  # the row's own context comes first
    assert draft([1, 51, 52, 2], 3, memory=memory) == []  # a tail that ends a remembered answer has nothing after it
    assert draft([1, 9, 40, 41, 42], 1, memory=memory) == [43]  # the longest tail first
    kept = AnswerMemory(size=2)
    kept.add([[5, 6, 7], [5, 6, 7], [8, 9, 10, 11], [1]], max_new_tokens=4, stop_id=2)
    assert list(kept.answers) == [[5, 6, 7, 2], [8, 9, 10, 11]]  # stopped: its stop token follows; at the limit: none
    kept.add([[3, 4, 5], [8, 9, 4]], max_new_tokens=4, stop_id=2)
    assert list(kept.answers) == [[3, 4, 5, 2], [8, 9, 4, 2]]  # the oldest go
    assert kept.follow([5, 6], 2) == [] and kept.follow([8, 9], 2) == [4, 2]  # and their n-grams with them


def _looked_up(loaded, prompts, draft_tokens: int, stops: list[int], limit: int = 20, memory=None):
    """(tokens, streamed (row, token) pairs, forward passes) of prompt-lookup decoding, `limit` new tokens at most."""
    from mlx_lora.backends.torch import lookup

    model, calls, streamed = loaded.model, [], []
    forward = model.forward
    model.forward = functools.wraps(forward)(lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    try:
        got = lookup.generate_batch(
            model,
            prompts,
            limit,
            draft_tokens,
            stops,
            loaded.pad_id,
            "cpu",
            lambda i, t: streamed.append((i, t)),
            memory=memory,
        )
    finally:
        del model.forward
    return got, streamed, len(calls)


@pytest.mark.parametrize("draft_tokens", [1, 4])
def test_prompt_lookup_decoding_is_greedy_decoding(lively, barely_trained, tok, draft_tokens):
    """Same tokens as the plain loop, streamed per row, early stops and the limit kept; with fewer passes where
    the drafts are right (the barely trained model repeats a token that its context holds)."""
    from mlx_lora.backends.torch import generate as plain

    prompts = _prompts(tok)
    for loaded in (lively[1], barely_trained[1]):
        free = plain.generate_batch(loaded.model, prompts, GenerateConfig(max_new_tokens=20), [], loaded.pad_id, "cpu")
        # lively: row 1 stops at its third token, rows that never emit it run to the limit; the barely trained
        # model repeats one token, so it runs to the limit (a stop on that token would end every row at once)
        stop = free[1][2] if loaded is lively[1] else -1
        expected = [out[: out.index(stop)] if stop in out else out for out in free]
        got, streamed, passes = _looked_up(loaded, prompts, draft_tokens, [stop])
        assert got == expected
        assert [[t for i, t in streamed if i == k] for k in range(len(prompts))] == expected
        if loaded is barely_trained[1]:
            assert passes < max(map(len, expected))  # drafts were accepted: fewer passes than tokens
    # every row done after its first token: one pass, no cache left to shrink
    loaded = lively[1]
    one = plain.generate_batch(loaded.model, prompts, GenerateConfig(max_new_tokens=1), [], loaded.pad_id, "cpu")
    assert _looked_up(loaded, prompts, draft_tokens, [], limit=1)[0] == one


def test_remembered_answers_save_passes_and_change_no_token(lively, tok):
    """An answer the prompt does not predict (the lively model's free text) is drafted from the same answer
    written before: the same tokens, in fewer passes; the backend keeps that memory between calls."""
    from mlx_lora.backends.torch import TorchBackend
    from mlx_lora.backends.torch.lookup import AnswerMemory

    loaded, prompts = lively[1], _prompts(tok)[:1]
    first, _, passes = _looked_up(loaded, prompts, 8, [])
    memory = AnswerMemory()
    memory.add(first, max_new_tokens=20, stop_id=None)
    again, _, fewer = _looked_up(loaded, prompts, 8, [], memory=memory)
    assert again == first and fewer < passes / 2

    backend, cfg = TorchBackend(), GenerateConfig(max_new_tokens=20, precision="fp32")
    loaded.extra.pop("lookup_memory", None)
    assert backend.generate(loaded, prompts, cfg, []) == first
    assert list(loaded.extra["lookup_memory"].answers) == first  # at the limit: no stop token appended


def test_prompt_lookup_drafts_less_as_the_batch_grows():
    from mlx_lora.backends.torch.generate import _lookup
    from mlx_lora.backends.torch.lookup import STEP_BUDGET, adapt, draft_size

    # a row's draft grows by two after a draft kept whole, shrinks to what was kept otherwise (0: off for now)
    assert [adapt(8, 4, 4, 8), adapt(8, 4, 2, 8), adapt(8, 4, 0, 8), adapt(3, 0, 0, 8)] == [6, 2, 0, 3]
    assert adapt(4, 7, 7, 8) == 8

    assert draft_size(1, 8) == 8 and draft_size(8, 8) == STEP_BUDGET // 8 - 1 and draft_size(STEP_BUDGET, 8) == 0
    assert _lookup(GenerateConfig(), 1) and not _lookup(GenerateConfig(), STEP_BUDGET)  # 40 rows: the plain loop
    assert not _lookup(GenerateConfig(prompt_lookup=0), 1)
    assert not _lookup(GenerateConfig(temperature=0.7), 1) and not _lookup(GenerateConfig(repetition_penalty=1.1), 1)
