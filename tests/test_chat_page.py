"""The chat page in a real browser against a real `mlx-lora serve` process: a typed question, its answer, its badge."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from browser import By, screenshot
from conftest import REPO

# The serve tests' questions; their tiny run (a random Qwen2 trained 2 steps, a 3-doc KB, a refuse and an override
# rule) is conftest's session fixture `tiny_run`.
from serve_helpers import REFUSE_Q, RULE_Q

KEY = "page-test-key"
STATIC = REPO / "mlx_lora" / "serve" / "static" / "index.html"


class Served:
    """`mlx-lora serve` in a subprocess on a free port; stderr is drained in a thread (a full pipe would block it)."""

    def __init__(self, root):
        args = [
            "serve",
            "--adapter", root / "run", "--kb", root / "kb.jsonl", "--rules", root / "rules.yaml",
            "--port", "0", "--backend", "torch", "--api-key", KEY, "--no-progress",
            "--set", "eval.embedder=char", "--set", "generate.max_new_tokens=6", "--set", "generate.temperature=0",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from mlx_lora.cli import main; main()", *map(str, args)],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self.ready.wait(180) or self.proc.poll() is not None:
            self.close()
            pytest.fail("mlx-lora serve did not start:\n" + "".join(self.lines[-30:]))
        self.url = re.search(r"on (http://\S+)", self.lines[-1]).group(1)

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("serving "):
                self.ready.set()
        self.ready.set()  # exited: let the waiter see it

    def ask(self, question: str) -> dict:
        """The same question without streaming, straight through the API: what the page should show."""
        body = json.dumps({"messages": [{"role": "user", "content": question}]}).encode()
        request = urllib.request.Request(
            f"{self.url}/v1/chat/completions",
            body,
            {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()  # uvicorn's SIGTERM handler: a graceful shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def served(tiny_run):
    running = Served(tiny_run)
    yield running
    running.close()


def _ask(browser, question: str, timeout: float = 120) -> str:
    box = browser.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    browser.find_element(By.ID, "send").click()
    deadline = time.monotonic() + timeout
    while (state := browser.find_element(By.ID, "answer").get_attribute("data-state")) in ("idle", "streaming"):
        assert time.monotonic() < deadline, "no answer in time"
        time.sleep(0.05)
    return state


def test_the_page_is_offline_by_construction():
    page = STATIC.read_text(encoding="utf-8")
    # Nothing fetched from elsewhere: no URL with a scheme or a protocol-relative one in an attribute or a fetch.
    assert not re.search(r"""(src|href|action)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert not re.search(r"""fetch\(\s*["'`](https?:)?//""", page)
    assert "connect-src 'self'" in page and "default-src 'none'" in page


def test_a_question_typed_in_the_page_streams_its_answer_and_source(browser, served, tmp_path):
    browser.get(served.url + "/")
    assert browser.title == "mlx-lora chat"
    browser.execute_script("localStorage.clear()")
    browser.refresh()

    # Without the key the server refuses, and the page says what to do.
    assert _ask(browser, RULE_Q) == "error"
    assert "API key" in browser.find_element(By.ID, "error").text

    browser.find_element(By.CSS_SELECTOR, "details.settings summary").click()
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(KEY)
    browser.find_element(By.ID, "question").click()  # leaving the field stores the key

    for question in (RULE_Q, REFUSE_Q):
        assert _ask(browser, question) == "done", browser.find_element(By.ID, "error").text
        expected = served.ask(question)
        decision = expected["mlx_lora"]
        answer = browser.find_element(By.ID, "answer")
        assert answer.text == expected["choices"][0]["message"]["content"].strip()
        badge = browser.find_element(By.ID, "source-badge")
        assert badge.text == decision["source"] == badge.get_attribute("data-source")
        doc, rule = (browser.find_element(By.ID, name).text for name in ("doc-badge", "rule-badge"))
        assert doc == (f"doc {decision['doc_id']}" if decision["doc_id"] else "")
        assert rule == (f"rule {decision['rule_id']}" if decision["rule_id"] else "")
        refused = "refusal" in answer.get_attribute("class").split()
        assert refused == (decision["source"] == "REFUSAL")
    # The refuse rule settles the stock question: a refusal, styled as one, naming its rule.
    assert decision["source"] == "REFUSAL" and refused and rule == "rule no-stock" and not doc
    assert browser.find_element(By.ID, "asked").text == REFUSE_Q
    assert len(browser.find_elements(By.CSS_SELECTOR, "#history .turn")) == 1  # the earlier answer, kept below

    screenshot(browser, tmp_path / "chat.png")
    browser.refresh()  # the key survives a reload (local storage)
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == KEY


def test_the_pages_stream_parser_handles_events_split_anywhere(browser):
    browser.get(STATIC.as_uri())  # no server needed: the parser is a plain function of the page
    parts = ['data: {"a"', ": 1}\r\n", "\r\ndata: x\ndata: y\n", "\n: comment\n\ndata: [DO", "NE]\n\n"]
    parsed = browser.execute_script(
        """const buffer = {text: ''}, out = [];
        for (const part of arguments[0]) { buffer.text += part; for (const data of events(buffer)) out.push(data); }
        return [out, buffer.text];""",
        parts,
    )
    assert parsed == [['{"a": 1}', "x\ny", "[DONE]"], ""]
