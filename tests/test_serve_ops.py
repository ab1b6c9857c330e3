"""Running `mlx-lora serve`: reloads (admin route, SIGHUP), SIGTERM, exposure without a key, sockets, audit rotation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REPO
from serve_helpers import REFUSE_Q, RULE_Q, RULES, SOURCES, Running, chat, httpx, unsettled

from mlx_lora.serve.server import bind, check_exposure


def test_reload_swaps_rules_and_keeps_them_when_broken(tiny_run):
    rules = tiny_run / "reload-rules.yaml"
    rules.write_text(RULES, encoding="utf-8")
    running = Running(tiny_run, "torch", rules="reload-rules.yaml")
    try:
        question = "午餐吃什麼?"
        before = running.ask(question).model_extra["mlx_lora"]
        rules.write_text(RULES + "  - id: no-lunch\n    action: refuse\n    keywords: [午餐]\n", encoding="utf-8")
        reloaded = httpx.post(f"{running.url}/admin/reload", timeout=60).json()
        assert reloaded["reloaded"] and reloaded["rules"] == 3
        after = running.ask(question).model_extra["mlx_lora"]
        assert after["source"] == "REFUSAL" and after["rule_id"] == "no-lunch", (before, after)
        rules.write_text("rules:\n  - id: x\n    doc_id: ghost\n    keywords: [a]\n", encoding="utf-8")
        broken = httpx.post(f"{running.url}/admin/reload", timeout=60)
        assert broken.status_code == 422 and broken.json()["error"]["code"] == "reload_failed"
        message = broken.json()["error"]["message"]
        assert "reload-rules.yaml" in message and "\n" not in message
        assert running.ask(question).model_extra["mlx_lora"]["rule_id"] == "no-lunch"  # the old rules stay
        assert httpx.get(f"{running.url}/ready").json()["reloads"] == 1
    finally:
        running.close()


def test_reload_does_not_drop_requests_in_flight(tiny_run):
    running = Running(tiny_run, "torch", window_ms=50)
    try:
        question = unsettled(running, [RULE_Q, "VPN client 要去哪 download?"])
        with ThreadPoolExecutor(6) as pool:
            asked = [pool.submit(running.ask, q) for q in [question, REFUSE_Q] * 3]
            reloads = [pool.submit(httpx.post, f"{running.url}/admin/reload", timeout=60) for _ in range(2)]
            assert all(r.result().status_code == 200 for r in reloads)
            assert all(a.result().model_extra["mlx_lora"]["source"] in SOURCES for a in asked)
    finally:
        running.close()


def test_the_command_serves_reloads_on_sighup_and_stops_on_sigterm(tiny_run):
    rules = tiny_run / "hup-rules.yaml"
    rules.write_text(RULES, encoding="utf-8")
    args = ["serve", "--adapter", str(tiny_run / "run"), "--port", "0", "--rules", str(rules), "--backend", "torch"]
    args += ["--set", "eval.embedder=char", "--set", f"data.kb={tiny_run / 'kb.jsonl'}", "--no-progress"]
    args += ["--audit", str(tiny_run / "hup-audit.jsonl")]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from mlx_lora.cli import main; main()", *args],
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("serving "):
                break
        assert lines and lines[-1].startswith("serving "), "".join(lines)
        url = lines[-1].split(" on ")[1].split()[0]
        ask = lambda: httpx.post(f"{url}/v1/chat/completions", json=chat("午餐吃什麼?", model="run"), timeout=60).json()
        assert ask()["mlx_lora"]["rule_id"] != "no-lunch"
        rules.write_text(RULES + "  - id: no-lunch\n    action: refuse\n    keywords: [午餐]\n", encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        assert proc.stderr.readline().startswith("reloaded: 3 rules, 3 KB docs")
        assert ask()["mlx_lora"]["rule_id"] == "no-lunch"
        rules.write_text("rules: [\n", encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        failed = proc.stderr.readline()
        assert (
            failed.startswith("error: reload failed, keeping the previous rules and KB: ")
            and "hup-rules.yaml" in failed
        )
        assert ask()["mlx_lora"]["rule_id"] == "no-lunch"
        proc.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully, then ends by the signal it caught
        assert proc.wait(timeout=30) == -signal.SIGTERM
        assert "Traceback" not in proc.stderr.read()
        assert len((tiny_run / "hup-audit.jsonl").read_text().splitlines()) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_audit_log_rotates_whole_lines(tmp_path):
    from mlx_lora.serve.audit import AuditLog

    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=400, keep=2)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: log.write({"i": i, "text": "答" * 30}), range(60)))
    files = [tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1", tmp_path / "audit.jsonl.2"]
    assert all(f.exists() for f in files) and not (tmp_path / "audit.jsonl.3").exists()
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert text.endswith("\n") and f.stat().st_size <= 400
        assert all(json.loads(line)["text"] == "答" * 30 for line in text.splitlines())
    assert log.lines == 60


def test_accepted_connections_send_without_waiting_for_acks():
    """Nagle off on every accepted socket: with it on, a keep-alive client waited ~40 ms for each response's end."""
    import socket

    listener = bind("127.0.0.1", 0)
    client = socket.create_connection(listener.getsockname())
    try:
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.proto == socket.IPPROTO_TCP  # what asyncio checks before it sets TCP_NODELAY itself
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        client.close()
        listener.close()


def test_non_loopback_without_a_key_is_refused():
    from mlx_lora.core.errors import UserError

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_exposure(host, None)
    check_exposure("0.0.0.0", "key")
    for host in ("0.0.0.0", "192.168.1.10", "myhost.example"):
        with pytest.raises(UserError, match="API key"):
            check_exposure(host, None)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mlx_lora.cli import main; main()",
            "serve",
            "--adapter",
            str(REPO),
            "--host",
            "0.0.0.0",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "MLX_LORA_API_KEY"},
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "API key" in out.stderr
