"""The MLX backend on a tiny random Qwen2 built with mlx itself: training contract, resume, generation, rope trap."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core", reason="the mlx backend needs mlx: pip install -e '.[mlx]'")

from conftest import EVENT_SCHEMA as SCHEMA  # noqa: E402
from mlx_lora.core.config import Config, GenerateConfig  # noqa: E402
from mlx_lora.core.errors import UserError  # noqa: E402
from mlx_lora.data.render import ChatTokenizer, Encoded, encode_messages  # noqa: E402

QA = [("VPN 怎麼設定?", "依據公司規範:VPN 設定:下載新版 client,以 SSO 登入。"),
      ("怎麼請假", "依據公司規範:請假須於三天前在 HR 系統申請。"),
      ("識別證掉了怎麼辦", "依據公司規範:識別證遺失請立即通報總務並補辦。"),
      ("今天天氣如何?", "抱歉,知識庫沒有這個資訊。"),
      ("badge 不見了要 report 給誰?", "依據公司規範:識別證遺失請立即通報總務並補辦。"),
      ("請假需要提前多久?", "依據公司規範:請假須於三天前在 HR 系統申請。")]
HIDDEN, LAYERS, HEADS, KV_HEADS, INTER = 64, 3, 4, 2, 128


def model_config(vocab: int, rope_theta: float = 10000.0, top_level_rope: bool = True) -> dict:
    """A config.json as transformers 5 writes it (rope inside rope_parameters), optionally with the top-level key."""
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": HIDDEN,
              "num_hidden_layers": LAYERS, "intermediate_size": INTER, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-6, "vocab_size": vocab,
              "max_position_embeddings": 512, "tie_word_embeddings": True, "eos_token_id": 2,
              "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta}, "dtype": "float32"}
    if top_level_rope:
        config["rope_theta"] = rope_theta
    return config


def build_model(dst: Path, vocab: int, seed: int = 0, **kw) -> Path:
    from mlx_lm.models import qwen2
    from mlx_lm.utils import save_model

    dst.mkdir(parents=True, exist_ok=True)
    config = model_config(vocab, **kw)
    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict({**config, "rope_theta": config["rope_parameters"]["rope_theta"]}))
    mx.eval(model.parameters())
    save_model(dst, model)
    (dst / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def rows_and_vocab(tmp_path_factory, request):
    """Chat rows encoded by the real Qwen tokenizer, then renumbered into a small vocabulary: the reference
    BLAS of mlx-cpu makes a 150k-word lm_head the slowest thing in a test, and masks/lengths stay real."""
    tok_dir = request.getfixturevalue("qwen_tokenizer_dir")
    tokenizer = ChatTokenizer.from_dir(tok_dir)
    encoded = [encode_messages(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], 64)
               for q, a in QA]
    im_end = tokenizer.token_id("<|im_end|>")
    ids = sorted({i for r in encoded for i in r.ids} - {im_end})
    remap = {old: new for new, old in enumerate(ids, start=3)}
    remap[im_end] = 2  # the model config's eos_token_id
    rows = [Encoded([remap[i] for i in r.ids], list(r.mask)) for r in encoded]
    return rows, 128 * math.ceil((len(ids) + 3) / 128), tok_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, rows_and_vocab) -> Path:
    rows, vocab, tok_dir = rows_and_vocab
    out = build_model(tmp_path_factory.mktemp("tiny-mlx") / "model", vocab)
    for name in tok_dir.iterdir():  # mlx_lm.load also loads a tokenizer (never used for these ids)
        shutil.copy(name, out / name.name)
    return out


def make_cfg(**train) -> Config:
    cfg = Config()
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = 4, 8.0, 0.0
    cfg.train.batch_size, cfg.train.grad_accum, cfg.train.epochs = 2, 2, 3
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.max_grad_norm = 1e-2, 1, 1.0
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def run_training(model_dir, rows, cfg, run_dir, resume=None, on_event=None):
    from mlx_lora.backends.mlx import MLXBackend

    backend = MLXBackend()
    loaded = backend.load(model_dir, None, cfg)
    events = []

    def listen(event):
        assert set(event) == SCHEMA[event["type"]], event  # both backends emit exactly the shared schema
        events.append(event)
        if on_event:
            on_event(event)

    outcome = backend.train(loaded, rows[:4] + rows[5:], rows[4:5], cfg, run_dir, listen, resume=resume)
    return backend, loaded, outcome, events


def test_available_names_the_blas_fix_on_linux(monkeypatch):
    import sys

    from mlx_lora.backends.mlx import MLXBackend

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    ok, why = MLXBackend().available()
    assert ok and "mlx" in why
    assert "reference BLAS" in why and "LD_PRELOAD" in why and "libopenblas0-pthread libgfortran5" in why
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
    assert "reference BLAS" not in MLXBackend().available()[1]
    monkeypatch.setattr(sys, "platform", "darwin")  # Metal: nothing to warn about
    monkeypatch.delenv("LD_PRELOAD")
    assert "reference BLAS" not in MLXBackend().available()[1]


def test_training_on_linux_warns_about_blas_once(tiny, rows_and_vocab, tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    rows, _, _ = rows_and_vocab
    _, _, _, events = run_training(tiny, rows, make_cfg(max_steps=1), tmp_path / "run")
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert len(warnings) == 1 and "LD_PRELOAD" in warnings[0]


def test_contract_loss_falls_adapter_exists_param_count_exact(tiny, rows_and_vocab, tmp_path):
    from mlx_lm import load as mlx_lm_load

    rows, vocab, _ = rows_and_vocab
    cfg = make_cfg()
    run = tmp_path / "run"
    _, loaded, outcome, events = run_training(tiny, rows, cfg, run)
    steps = [e for e in events if e["type"] == "step"]
    evals = [e for e in events if e["type"] == "eval"]
    # 5 rows, batch 2 → 3 batches → 2 groups of ≤2 per epoch, 3 epochs
    assert outcome.steps == len(steps) == 6 and outcome.stopped == "completed"
    assert [e["epoch"] for e in steps] == [1, 1, 2, 2, 3, 3] and [e["epoch"] for e in evals] == [1, 2, 3]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and steps[-1]["loss"] < steps[0]["loss"]
    assert steps[0]["lr"] == pytest.approx(1e-2) and steps[-1]["lr"] < steps[1]["lr"]  # warmup 1 then cosine
    # q/k/v/o on 3 layers: r·(in+out) each; q,o: 64→64, k,v: 64→32 (2 kv heads × 16)
    expected = LAYERS * 4 * (2 * (64 + 64) + 2 * (64 + 32))
    start = events[0]
    assert start["type"] == "start" and start["trainable_params"] == expected and start["backend"] == "mlx"
    assert (run / "adapter" / "adapters.safetensors").is_file()
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == LAYERS
    assert config["lora_parameters"]["scale"] == pytest.approx(8.0 / 4) and config["lora_parameters"]["rank"] == 4
    assert sorted(config["lora_parameters"]["keys"]) == ["self_attn.k_proj", "self_attn.o_proj",
                                                         "self_attn.q_proj", "self_attn.v_proj"]
    best = min(evals, key=lambda e: e["eval_loss"])
    assert outcome.best_step == best["step"] and outcome.best_eval_loss == pytest.approx(best["eval_loss"])
    # plain mlx-lm accepts the adapter folder and gives the same logits as our trained model
    theirs, _ = mlx_lm_load(str(tiny), adapter_path=str(run / "adapter"))
    x = mx.array([rows[0].ids])
    assert mx.abs(theirs(x) - loaded.model(x)).max().item() < 1e-5
    assert done_event(events)["stopped"] == "completed"


def done_event(events):
    assert events[-1]["type"] == "done"
    return events[-1]


def test_targets_and_num_layers(tiny, rows_and_vocab, tmp_path):
    from mlx_lora.backends.mlx.model import attach_lora, load

    cfg = make_cfg()
    cfg.lora.targets, cfg.lora.num_layers = ["q_proj", "v_proj"], 1
    loaded = load(tiny, None, cfg)
    settings = attach_lora(loaded, cfg.lora)
    assert settings["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    trainable = sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(loaded.model.trainable_parameters()))
    assert trainable == 4 * ((64 + 64) + (64 + 32))
    cfg.lora.targets = ["q_proj", "nope_proj"]
    with pytest.raises(UserError, match="nope_proj"):
        attach_lora(load(tiny, None, cfg), cfg.lora)
    cfg.lora.targets, cfg.lora.num_layers = ["q_proj"], LAYERS + 1
    with pytest.raises(UserError, match="num_layers"):
        attach_lora(load(tiny, None, cfg), cfg.lora)


def test_ctrl_c_saves_and_resume_continues_exactly(tiny, rows_and_vocab, tmp_path):
    rows, _, _ = rows_and_vocab
    cfg = make_cfg(eval_every=0)
    cfg.lora.dropout = 0.1  # dropout noise must also replay identically after a resume
    _, _, straight, events = run_training(tiny, rows, cfg, tmp_path / "straight")
    losses = [e["loss"] for e in events if e["type"] == "step"]

    def interrupt_at_3(event):
        if event["type"] == "step" and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does; the loop stops after this step

    _, _, first, _ = run_training(tiny, rows, cfg, tmp_path / "cut", on_event=interrupt_at_3)
    assert first.stopped == "interrupted" and first.steps == 3
    assert (tmp_path / "cut" / "checkpoints" / "step-3" / "optimizer.safetensors").is_file()
    _, _, resumed, events2 = run_training(tiny, rows, cfg, tmp_path / "cut", resume=tmp_path / "cut")
    resumed_losses = [e["loss"] for e in events2 if e["type"] == "step"]
    assert [e["step"] for e in events2 if e["type"] == "step"] == [4, 5, 6]
    assert resumed_losses == pytest.approx(losses[3:], abs=1e-5)
    assert resumed.best_eval_loss == pytest.approx(straight.best_eval_loss, abs=1e-5)
    a = mx.load(str(tmp_path / "straight" / "adapter" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "cut" / "adapter" / "adapters.safetensors"))
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) < 1e-5


def test_resume_refuses_other_settings(tiny, rows_and_vocab, tmp_path):
    rows, _, _ = rows_and_vocab
    run_training(tiny, rows, make_cfg(max_steps=2), tmp_path / "run")
    with pytest.raises(UserError, match="batch_size"):
        run_training(tiny, rows, make_cfg(max_steps=4, batch_size=1), tmp_path / "run", resume=tmp_path / "run")


def test_early_stopping_keeps_the_best_adapter(tiny, rows_and_vocab, tmp_path, monkeypatch):
    from mlx_lora.backends.mlx import engine as trainer

    rows, _, _ = rows_and_vocab
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])  # the stopping logic under test, not the model's loss
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: next(scripted))
    kept = {}

    def remember(event):
        if event["type"] == "eval" and event["best"]:
            kept[event["step"]] = mx.load(str(tmp_path / "run" / "adapter" / "adapters.safetensors"))

    cfg = make_cfg(eval_every=1, early_stopping_patience=2)
    _, loaded, outcome, events = run_training(tiny, rows, cfg, tmp_path / "run", on_event=remember)
    assert outcome.stopped == "early_stopped" and outcome.steps == 4 and outcome.best_step == 2
    final = mx.load(str(tmp_path / "run" / "adapter" / "adapters.safetensors"))
    assert all(mx.array_equal(final[k], kept[2][k]).item() for k in final)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    # the loaded model now holds the best weights too (later generation uses what the run dir holds)
    from mlx_lora.backends.mlx.model import adapter_weights
    assert all(mx.array_equal(adapter_weights(loaded.model)[k], final[k]).item() for k in final)


def test_non_finite_loss_stops_the_run(tiny, rows_and_vocab, tmp_path):
    rows, _, _ = rows_and_vocab
    cfg = make_cfg(lr=1e38, max_grad_norm=0.0, warmup_steps=0, weight_decay=0.0)
    _, _, outcome, events = run_training(tiny, rows, cfg, tmp_path / "run")
    assert outcome.stopped == "non_finite" and outcome.steps < 6
    assert any(e["type"] == "warning" and "not finite" in e["message"] for e in events)
    assert (tmp_path / "run" / "adapter" / "adapters.safetensors").is_file()


def greedy_reference(model, prompt, steps):
    """Greedy decoding by full forward passes, no cache: what the batched generator must reproduce."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    return ids[len(prompt):]


def test_generate_batched_greedy_matches_reference_and_stops(tiny, rows_and_vocab):
    from mlx_lora.backends.mlx import MLXBackend

    rows, _, _ = rows_and_vocab
    backend = MLXBackend()
    loaded = backend.load(tiny, None, make_cfg())
    prompts = [rows[0].ids[:9], rows[3].ids[:5], rows[2].ids[:12]]
    gen = GenerateConfig(max_new_tokens=6, temperature=0.0, batch_size=2)  # 3 prompts: batches of 2 + 1
    streamed = {i: [] for i in range(3)}
    out = backend.generate(loaded, prompts, gen, [], lambda i, t: streamed[i].append(t))
    refs = [greedy_reference(loaded.model, p, 6) for p in prompts]
    assert out == refs and [streamed[i] for i in range(3)] == refs
    stop = refs[0][2]
    cut = backend.generate(loaded, prompts[:1], gen, [stop])[0]
    assert cut == refs[0][:refs[0].index(stop)]


def test_rope_theta_trap_is_handled(rows_and_vocab, tmp_path):
    from mlx_lm.utils import load_model

    from mlx_lora.backends.mlx.model import load, rope_override

    rows, vocab, _ = rows_and_vocab
    top = build_model(tmp_path / "top", vocab, seed=1, rope_theta=10000.0)
    nested = build_model(tmp_path / "nested", vocab, seed=1, rope_theta=10000.0, top_level_rope=False)
    assert rope_override(json.loads((nested / "config.json").read_text())) == {"rope_theta": 10000.0}
    assert rope_override(json.loads((top / "config.json").read_text())) == {}
    x = mx.array([rows[1].ids])
    reference = load(top).model(x)
    assert mx.abs(load(nested).model(x) - reference).max().item() < 1e-6
    naive, _ = load_model(nested)  # mlx-lm alone falls back to rope_theta 1e6: the trap is real
    assert mx.abs(naive(x) - reference).max().item() > 1e-3


def test_adapter_of_either_format_loads(tiny, rows_and_vocab, tmp_path):
    from mlx_lora.backends.adapters import mlx_to_peft
    from mlx_lora.backends.mlx import MLXBackend

    rows, _, _ = rows_and_vocab
    backend, trained, _, _ = run_training(tiny, rows, make_cfg(max_steps=2), tmp_path / "run")
    mlx_to_peft(tmp_path / "run" / "adapter", tmp_path / "peft")
    x = mx.array([rows[2].ids])
    expected = trained.model(x)
    for source in (tmp_path / "run", tmp_path / "peft"):
        loaded = backend.load(tiny, source, make_cfg())
        assert mx.abs(loaded.model(x) - expected).max().item() < 1e-5
    with pytest.raises(UserError, match="not found|neither"):
        backend.load(tiny, tmp_path / "missing", make_cfg())


def test_fuse_through_mlx_lm(tiny, rows_and_vocab, tmp_path):
    from mlx_lm.utils import load_model

    from mlx_lora.backends.mlx import MLXBackend

    rows, _, _ = rows_and_vocab
    backend, trained, _, _ = run_training(tiny, rows, make_cfg(max_steps=2), tmp_path / "run")
    x = mx.array([rows[2].ids])
    expected = trained.model(x)
    backend.fuse(backend.load(tiny, tmp_path / "run" / "adapter", make_cfg()), tmp_path / "fused")
    fused, _ = load_model(tmp_path / "fused")
    assert mx.abs(fused(x) - expected).max().item() < 1e-5


def test_dora_trains_and_loads_in_mlx_lm(tiny, rows_and_vocab, tmp_path):
    from mlx_lm import load as mlx_lm_load

    rows, _, _ = rows_and_vocab
    cfg = make_cfg(max_steps=2)
    cfg.lora.dora = True
    _, loaded, outcome, events = run_training(tiny, rows, cfg, tmp_path / "run")
    # DoRA adds a magnitude per output feature: q,o 64 and k,v 32 on each layer
    lora_only = LAYERS * 4 * (2 * (64 + 64) + 2 * (64 + 32))
    assert events[0]["trainable_params"] == lora_only + LAYERS * (64 + 32 + 32 + 64)
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    theirs, _ = mlx_lm_load(str(tiny), adapter_path=str(tmp_path / "run" / "adapter"))
    x = mx.array([rows[0].ids])
    assert mx.abs(theirs(x) - loaded.model(x)).max().item() < 1e-5
