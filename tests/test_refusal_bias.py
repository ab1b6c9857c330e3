"""The run's refusal bias: picked on valid rows, written after training, read by generation, applied to the first new
token only, on both backends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_lora.core.config import Config, GenerateConfig
from mlx_lora.core.errors import UserError
from mlx_lora.training.refusal_bias import pick


def test_pick_shifts_only_on_evidence():
    # Answerable rows sure of answering (margin −4), unanswerable ones hesitating (−0.6): a bias of 0.75 refuses them
    # all and no answerable one.
    bias, figures = pick([-4.0, -4.2, -0.6, -0.6, -5.0], [True, True, False, False, True])
    assert bias == 0.75
    assert figures["unanswerable_refused"] == {"unbiased": 0, "biased": 2}
    assert figures["answerable_refused"] == {"unbiased": 0, "biased": 0}
    # Already right at 0: no shift (the smallest bias among equals).
    assert pick([-4.0, 1.0], [True, False])[0] == 0.0
    # Every gain costs as much: no shift either.
    assert pick([-1.0, -1.0], [True, False])[0] == 0.0
    # Never negative, even when the valid split over-refuses (held-out folds lost more than they gained).
    assert pick([0.5, 0.6, -3.0], [True, True, False])[0] == 0.0


def _prompts(tok):
    questions = ["VPN?", "我在家要怎麼連回公司網路,請詳細說明步驟?", "請假", "badge 不見了要 report 給誰?"]
    return [tok.prompt_ids([{"role": "user", "content": q}], "你是助理") for q in questions]


@pytest.fixture(scope="module")
def lively_torch(tmp_path_factory, qwen_tokenizer_dir):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from conftest import build_tiny_model

    from mlx_lora.backends.torch import TorchBackend
    from mlx_lora.data.render import ChatTokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("lively"), tokenizer_dir=qwen_tokenizer_dir, seed=3, init=0.3)
    backend = TorchBackend()
    return backend, backend.load(path, None, Config()), ChatTokenizer.from_dir(path)


@pytest.mark.parametrize("lookup", [0, 8], ids=["plain", "prompt-lookup"])
def test_torch_bias_moves_the_first_token_only(lively_torch, lookup):
    backend, loaded, tok = lively_torch
    prompts, token = _prompts(tok), tok.encode("抱歉")[0]
    cfg = GenerateConfig(max_new_tokens=5, temperature=0.0, batch_size=4, prompt_lookup=lookup, precision="fp32")
    loaded.first_token_bias = {}
    plain = backend.generate(loaded, prompts, cfg, [])
    margins = backend.token_margins(loaded, prompts, cfg, token)
    assert all(m < 0 for m in margins)  # a random model does not start with 抱歉: the bias below must move it
    # Just enough for the two most hesitant prompts: exactly those now start with the token.
    bias = -sorted(margins)[-2] + 1e-3
    loaded.first_token_bias = {token: bias}
    try:
        moved = backend.generate(loaded, prompts, cfg, [])
        # Per prompt: a prompt flagged False (it shows a doc added after training) is answered unbiased.
        loaded.first_token_bias = {token: -min(margins) + 1e-3}  # enough to flip every prompt
        flags = [True, False, True, False]
        some = backend.generate(loaded, prompts, cfg, [], biased=flags)
    finally:
        loaded.first_token_bias = {}
    for margin, before, after in zip(margins, plain, moved):
        if margin + bias > 0:
            assert after[0] == token and before[0] != token
        else:
            assert after == before  # the bias changed nothing where it did not flip the first token
    assert sum(a[0] == token for a in moved) == 2
    assert [a[0] == token for a in some] == flags and all(s == p for s, p, f in zip(some, plain, flags) if not f)


def test_mlx_bias_moves_the_first_token_only(tiny_model, rows_and_vocab):
    pytest.importorskip("mlx.core", reason="the mlx backend needs mlx")
    from mlx_lora.backends.mlx import MLXBackend

    rows, _, _ = rows_and_vocab
    backend = MLXBackend()
    loaded = backend.load(tiny_model, None, Config())
    prompts = [rows[0].ids[:9], rows[3].ids[:5], rows[2].ids[:12]]
    cfg = GenerateConfig(max_new_tokens=4, temperature=0.0, batch_size=3)
    plain = backend.generate(loaded, prompts, cfg, [])
    token = next(t for t in range(5, 50) if all(p[0] != t for p in plain))
    margins = backend.token_margins(loaded, prompts, cfg, token)
    assert all(m < 0 for m in margins)
    bias = -max(margins) + 1e-3  # only the most hesitant prompt flips
    loaded.first_token_bias = {token: bias}
    moved = backend.generate(loaded, prompts, cfg, [])
    flipped = [i for i, m in enumerate(margins) if m + bias > 0]
    assert len(flipped) == 1 and moved[flipped[0]][0] == token
    assert all(moved[i] == plain[i] for i in range(3) if i not in flipped)
    loaded.first_token_bias = {token: -min(margins) + 1e-3}  # enough to flip every prompt, but one is not flagged
    some = backend.generate(loaded, prompts, cfg, [], biased=[True, False, True])
    assert [s[0] == token for s in some] == [True, False, True] and some[1] == plain[1]


def _grounded_like_data(folder: Path) -> Path:
    """Chat rows with answerable and unanswerable (refusal) rows, as `data build` writes them."""
    folder.mkdir()
    refusal = "抱歉,知識庫沒有這個問題的規範。"

    def row(question, answerable):
        answer = "[1] 依據公司規範:以 SSO 登入。" if answerable else refusal
        return json.dumps(
            {
                "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "meta": {"answerable": answerable, "doc_id": "vpn" if answerable else None},
            },
            ensure_ascii=False,
        )

    (folder / "train.jsonl").write_text("\n".join(row(f"VPN 問題 {i}", i % 3 > 0) for i in range(9)))
    (folder / "valid.jsonl").write_text(
        "\n".join(row(q, a) for q, a in [("VPN 怎麼連?", True), ("午餐吃什麼?", False)])
    )
    return folder


def _train(model: Path, data: Path, run: Path, *settings: str) -> None:
    """`mlx-lora train` on the torch backend, one epoch of batches of 3, with extra `--set` settings."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from mlx_lora.cli import main

    args = ["train", "--backend", "torch", "--model", str(model), "--data", str(data), "--out", str(run)]
    main([*args, "--epochs", "1", "--no-progress", "--set", "train.batch_size=3", *(f"--set={s}" for s in settings)])


def test_training_writes_the_calibration_and_generation_reads_it(tiny_qwen2, tmp_path, capsys):
    from mlx_lora.backends.loading import first_token_bias, load_for_generation
    from mlx_lora.data.render import ChatTokenizer

    run = tmp_path / "run"
    _train(tiny_qwen2, _grounded_like_data(tmp_path / "data"), run, "train.precision=fp32")
    saved = json.loads((run / "calibration.json").read_text(encoding="utf-8"))
    assert f"refusal bias: {saved['refusal_bias']:+g} on '抱歉' (valid: unanswerable refused" in capsys.readouterr().out
    assert saved["token"] == ChatTokenizer.from_dir(tiny_qwen2).encode("抱歉")[0] and saved["token_text"] == "抱歉"
    assert saved["valid"]["rows"] == 2 and saved["valid"]["unanswerable"] == 1
    assert 0 <= saved["refusal_bias"] <= 3
    assert json.loads((run / "summary.json").read_text(encoding="utf-8"))["refusal_bias"] == saved
    assert f"- refusal bias {saved['refusal_bias']:+g} on '抱歉' (valid:" in (run / "README.md").read_text(
        encoding="utf-8"
    )

    cfg = Config()
    cfg.backend.name = "torch"
    _, loaded, _, _ = load_for_generation(None, run, cfg, progress=False)
    assert loaded.first_token_bias == ({saved["token"]: saved["refusal_bias"]} if saved["refusal_bias"] else {})
    cfg.generate.refusal_bias = 2.5  # a set value replaces the calibrated one
    assert first_token_bias(run, cfg) == {saved["token"]: 2.5}
    cfg.generate.refusal_bias = 0.0
    assert first_token_bias(run, cfg) == {}

    (run / "calibration.json").write_text("{not json", encoding="utf-8")
    cfg.generate.refusal_bias = None
    with pytest.raises(UserError, match=r"calibration.json: unreadable calibration .*delete it"):
        first_token_bias(run, cfg)
    (run / "calibration.json").unlink()
    assert first_token_bias(run, cfg) == {}  # a run from before calibration answers unbiased
    cfg.generate.refusal_bias = 1.0
    assert first_token_bias(run, cfg) == {}
    assert "refusal_bias 1.0 ignored" in capsys.readouterr().err


def test_a_bias_set_at_training_is_the_runs_own_unscored(tiny_qwen2, tmp_path, capsys):
    from mlx_lora.backends.loading import first_token_bias

    run = tmp_path / "run"
    _train(tiny_qwen2, _grounded_like_data(tmp_path / "data"), run, "generate.refusal_bias=1.5")
    saved = json.loads((run / "calibration.json").read_text(encoding="utf-8"))
    assert saved["refusal_bias"] == 1.5 and saved["chosen_by"] == "generate.refusal_bias" and "valid" not in saved
    assert "refusal bias: +1.5 on '抱歉' (set by generate.refusal_bias)" in capsys.readouterr().out
    assert first_token_bias(run, Config()) == {saved["token"]: 1.5}  # generation needs no setting of its own


def test_valid_without_unanswerable_rows_writes_no_calibration(tiny_qwen2, tmp_path):
    data = _grounded_like_data(tmp_path / "data")
    lines = (data / "valid.jsonl").read_text(encoding="utf-8").splitlines()
    (data / "valid.jsonl").write_text(lines[0], encoding="utf-8")  # the answerable row only
    run = tmp_path / "run"
    _train(tiny_qwen2, data, run, "train.precision=fp32")
    assert (run / "adapter").is_dir() and not (run / "calibration.json").exists()
    assert "refusal_bias" not in json.loads((run / "summary.json").read_text(encoding="utf-8"))


def test_familiar_means_every_shown_doc_was_asked_in_training():
    from mlx_lora.data.grounded import familiar
    from mlx_lora.data.retrieval import PassageIndex
    from mlx_lora.data.similarity import CharScorer

    kb = {"vpn": "VPN 用 SSO 登入。", "new": "新規範:週五便服。"}
    index = PassageIndex(CharScorer(), kb, [("VPN 怎麼連", "vpn")])
    assert index.asked == {"vpn"}
    assert familiar(["vpn"], index) and familiar([], index)
    assert not familiar(["vpn", "new"], index)  # "new" was added after training: no bias
    assert familiar(["new"], None)  # closed-book: no retriever, the bias applies


def test_a_calibration_that_names_another_token_is_a_one_line_error(tmp_path, qwen_tokenizer_dir):
    from mlx_lora.backends.loading import first_token_bias
    from mlx_lora.data.render import ChatTokenizer

    tok = ChatTokenizer.from_dir(qwen_tokenizer_dir)
    token = tok.encode("抱歉")[0]
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"token": token, "token_text": "抱歉", "refusal_bias": 0.5}), encoding="utf-8")
    assert first_token_bias(tmp_path, Config(), tok) == {token: 0.5}
    for bad in (token + 1, 10**9):  # an edited file, or an id past the vocabulary
        path.write_text(json.dumps({"token": bad, "token_text": "抱歉", "refusal_bias": 0.5}), encoding="utf-8")
        with pytest.raises(UserError, match=rf"token {bad} is .* not the '抱歉' the run was calibrated with"):
            first_token_bias(tmp_path, Config(), tok)


def _prompt_of(row) -> list[int]:
    """A training row's prompt: its tokens up to the answer's first supervised one."""
    return row.ids[: row.mask.index(1)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torch_valid_pass_margins_equal_a_separate_scoring_pass(tiny_model, rows_and_vocab, precision):
    """The margins training's valid pass returns are those token_margins gives for the same weights (fp32: to
    float rounding; bf16: training's arithmetic, frozen bf16 weights and fp32 LoRA, against generation's all-bf16),
    in the rows' own order, beside the same loss as before."""
    pytest.importorskip("peft")
    import torch

    from mlx_lora.backends.torch import TorchBackend
    from mlx_lora.backends.torch.generate import token_margins

    rows, _, _ = rows_and_vocab
    cfg = Config()
    cfg.train.batch_size, cfg.train.precision, cfg.lora.rank = 2, precision, 4
    backend = TorchBackend()
    engine = backend.engine(backend.load(tiny_model, None, cfg), cfg)
    for step in range(3):  # lora_B starts at zero: move it, so the margins are the adapter's, not the base's
        engine.step([rows[2 * step : 2 * step + 2]], 5e-3, step)
    valid = [rows[5], rows[1], rows[4], rows[0], rows[3]]  # unsorted: margins come back in this order
    token = 7
    result = engine.validate(valid, token)
    with torch.no_grad():  # the loss as eval_loss computed it: summed masked CE over the supervised tokens
        expected = sum(engine.loss_fn(engine._tensor([r.ids]), engine._tensor([r.mask])).item() for r in valid)
    assert result.loss == pytest.approx(expected / sum(sum(r.mask[1:]) for r in valid), rel=1e-2)
    assert engine.validate(valid).margins is None  # nothing asked, nothing scored
    model = engine.model
    if precision == "bf16":
        model = model.to(torch.bfloat16)  # as generate.precision bf16 casts the loaded model, LoRA included
    separate = token_margins(model, [_prompt_of(r) for r in valid], token, engine.loaded.pad_id, "cpu", 8)
    tolerance = 1e-3 if precision == "fp32" else 0.02  # bf16 measured 0.0034 here
    assert result.margins == pytest.approx(separate, abs=tolerance)
    assert len(set(round(m, 2) for m in separate)) > 1  # distinct rows: a shuffled order would show


def test_mlx_valid_pass_margins_equal_a_separate_scoring_pass(tiny_model, rows_and_vocab):
    pytest.importorskip("mlx.core", reason="the mlx backend needs mlx")
    from mlx_lora.backends.mlx import MLXBackend

    rows, _, _ = rows_and_vocab
    cfg = Config()
    cfg.train.batch_size, cfg.lora.rank = 2, 4
    backend = MLXBackend()
    loaded = backend.load(tiny_model, None, cfg)
    engine = backend.engine(loaded, cfg)
    for step in range(3):
        engine.step([rows[2 * step : 2 * step + 2]], 5e-3, step)
    valid = [rows[5], rows[1], rows[4], rows[0], rows[3]]
    token = 7
    result = engine.validate(valid, token)
    assert engine.validate(valid).loss == pytest.approx(result.loss) and engine.validate(valid).margins is None
    separate = backend.token_margins(loaded, [_prompt_of(r) for r in valid], GenerateConfig(), token)
    assert result.margins == pytest.approx(separate, abs=1e-3)
    assert len(set(round(m, 2) for m in separate)) > 1


def test_training_calibrates_from_its_valid_pass_as_a_second_pass_would(tiny_qwen2, tmp_path, monkeypatch):
    """calibration.json from training's own valid pass (no reload, no second pass) holds what scoring the saved
    adapter again, loaded as generation loads it, picks."""
    import shutil

    from mlx_lora.backends.torch import TorchBackend
    from mlx_lora.data.formats import read_examples
    from mlx_lora.data.render import ChatTokenizer
    from mlx_lora.training.refusal_bias import calibrate

    data, run, rescored = _grounded_like_data(tmp_path / "data"), tmp_path / "run", tmp_path / "rescored"
    with monkeypatch.context() as patched:  # training must not score valid a second time
        patched.setattr(TorchBackend, "token_margins", lambda *a, **k: pytest.fail("a second pass over valid"))
        _train(tiny_qwen2, data, run, "train.precision=fp32")
    saved = json.loads((run / "calibration.json").read_text(encoding="utf-8"))
    shutil.copytree(run / "adapter", rescored / "adapter")
    cfg = Config()
    cfg.generate.precision = "fp32"
    tokenizer = ChatTokenizer.from_dir(tiny_qwen2)
    valid, train = read_examples(data / "valid.jsonl"), read_examples(data / "train.jsonl")
    again = calibrate(TorchBackend(), tiny_qwen2, rescored, valid, train, tokenizer, cfg)
    assert again == saved
