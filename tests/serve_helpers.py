"""The serve tests' shared pieces: their rules and questions, a Service behind uvicorn in a thread, audit reads.

Importing it skips the importing test module when serve's dependencies (or torch, which trains the tiny run) are
missing, and hands it the httpx and openai modules."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("torch")  # the tiny run is trained with the torch backend; both backends then serve it

from mlx_lora.core.config import Config
from mlx_lora.serve.server import bind, uvicorn_server
from mlx_lora.serve.service import ServeSettings, Service

RULES = """rules:
  - id: no-stock
    action: refuse
    keywords: [股價]
  - id: vpn
    doc_id: vpn
    keywords: [VPN]
"""
REFUSE_Q = "公司股價多少?"  # the refuse rule: settled before the model runs
RULE_Q = "VPN 怎麼設定?"  # the override rule: the model answers first (its answer may already say the doc)
SOURCES = {"RULE_OVERRIDE", "KB_MATCH", "KB_RETRIEVAL", "MODEL_GENERATED", "REFUSAL"}


def serve_cfg(root: Path, backend: str) -> Config:
    cfg = Config()
    cfg.backend.name, cfg.eval.embedder, cfg.data.kb = backend, "char", str(root / "kb.jsonl")
    cfg.generate.max_new_tokens = 6
    return cfg


class Running:
    """A Service behind uvicorn in a thread; .client is an openai client for it."""

    def __init__(self, root: Path, backend: str = "torch", rules="rules.yaml", **settings):
        settings = {"audit_path": str(root / f"audit-{time.monotonic_ns()}.jsonl"), **settings}
        rules_path = str(root / rules) if rules else None
        self.service = Service(
            serve_cfg(root, backend), str(root / "run"), None, rules_path, ServeSettings(**settings), progress=False
        )
        self.service.start()
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn_server(self.service)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        key = settings.get("api_key") or "unused"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def ask(self, question: str, **kw):
        return self.client.chat.completions.create(
            model=self.service.name, messages=[{"role": "user", "content": question}], **kw
        )

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.close()


def audit_lines(running: Running) -> list[dict]:
    path = Path(running.service.audit.path)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def unsettled(running: Running, candidates) -> str:
    """A question the decision layer cannot settle without the model."""
    for question in candidates:
        if running.service.answering.settled([question])[0] is None:
            return question
    pytest.skip("every candidate question was settled before the model (route too confident)")


def chat(question="VPN?", **extra) -> dict:
    return {"model": "run", "messages": [{"role": "user", "content": question}], **extra}
