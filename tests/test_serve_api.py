"""`mlx-lora serve`'s OpenAI API through the official openai client: answers, streams, 4xx errors, routes, keys."""

from __future__ import annotations

import json

import pytest
from serve_helpers import REFUSE_Q, RULE_Q, SOURCES, Running, audit_lines, chat, httpx, openai, unsettled

from mlx_lora import backends

BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(not backends.installed(name), reason=f"{name} not installed"))
    for name in backends.names()
]
FIELD_KEYS = {"source", "doc_id", "rule_id", "model_answer", "request_id", "latency_ms"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_and_plain_answers_carry_the_decision(tiny_run, backend, torch_server):
    running = torch_server if backend == "torch" else Running(tiny_run, backend)
    try:
        ask = unsettled(running, [RULE_Q, "VPN client 要去哪 download?", "我在家要怎麼連回公司網路?"])
        for question in (REFUSE_Q, ask):
            plain = running.ask(question, temperature=0)
            extra = plain.model_extra["mlx_lora"]
            assert set(extra) == FIELD_KEYS and extra["source"] in SOURCES and extra["latency_ms"] >= 0
            assert plain.choices[0].message.content and plain.choices[0].finish_reason in ("stop", "length")
            assert plain.model == running.service.name and plain.id == f"chatcmpl-{extra['request_id']}"
            chunks = list(running.ask(question, temperature=0, stream=True))
            first = chunks[0].model_extra["mlx_lora"]
            assert set(first) == FIELD_KEYS and first["source"] == extra["source"]
            assert all("mlx_lora" not in (c.model_extra or {}) for c in chunks[1:])
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == plain.choices[0].message.content  # greedy: the same answer either way
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        refused = running.ask(REFUSE_Q).model_extra["mlx_lora"]
        assert refused["source"] == "REFUSAL" and refused["rule_id"] == "no-stock" and refused["model_answer"] is None
        usage = running.ask(REFUSE_Q).usage
        assert usage.completion_tokens == 0  # settled before the model: no generation at all
        assert running.ask(ask, max_tokens=3).usage.completion_tokens <= 3
    finally:
        if running is not torch_server:
            running.close()


def post(running: Running, body, headers=None, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body, ensure_ascii=False).encode()
    headers = {"content-type": "application/json", **(headers or {})}
    return httpx.post(f"{running.url}/v1/chat/completions", content=content, headers=headers, timeout=60)


@pytest.mark.parametrize(
    "body, raw, status, code",
    [
        (None, b"{not json", 400, "invalid_json"),
        (None, b"[1, 2]", 400, "invalid_json"),
        (None, "\udcff".encode("utf-8", "surrogatepass"), 400, "invalid_json"),
        ({"model": "run", "messages": [{"role": "system", "content": "hi"}]}, None, 400, "no_user_message"),
        ({"model": "run", "messages": []}, None, 400, "invalid_messages"),
        ({"model": "run", "messages": [{"role": "user", "content": 5}]}, None, 400, "invalid_content"),
        ({"model": "run", "messages": [{"role": "user", "content": "  "}]}, None, 400, "empty_question"),
        (chat(model="gpt-4o"), None, 404, "model_not_found"),
        (chat(max_tokens=10**6), None, 400, "max_tokens_too_large"),
        (chat(max_tokens=0), None, 400, "out_of_range"),
        (chat(temperature="hot"), None, 400, "invalid_type"),
        (chat(top_p=1.5), None, 400, "out_of_range"),
        (chat(stop=[1]), None, 400, "invalid_stop"),
        (chat(n=3), None, 400, "unsupported_parameter"),
        (chat(tools=[{"type": "function"}]), None, 400, "unsupported_parameter"),
        (chat("問" * 300_000), None, 413, "request_too_large"),
    ],
)
def test_bad_requests_are_openai_style_4xx(torch_server, body, raw, status, code):
    if body is not None and body.get("model") == "run":
        body["model"] = torch_server.service.name
    before = len(audit_lines(torch_server))
    response = post(torch_server, body, raw=raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert "Traceback" not in response.text
    assert len(audit_lines(torch_server)) == before  # nothing was answered


def test_oversize_chunked_body_and_unknown_routes(torch_server):
    def chunks():
        for _ in range(40):
            yield b"x" * 10_000

    response = httpx.post(f"{torch_server.url}/v1/chat/completions", content=chunks(), timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    missing = httpx.get(f"{torch_server.url}/v1/nothing", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(f"{torch_server.url}/v1/chat/completions", timeout=10)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_health_ready_models_and_page(torch_server):
    assert httpx.get(f"{torch_server.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{torch_server.url}/ready").json()
    assert ready["ready"] and ready["model"] and ready["index"] and ready["kb_docs"] == 3
    models = torch_server.client.models.list()
    assert [m.id for m in models.data] == [torch_server.service.name]
    page = httpx.get(f"{torch_server.url}/")
    assert page.status_code == 200 and "<" in page.text


def test_api_key_guards_v1_and_admin(torch_server):
    settings = torch_server.service.settings
    settings.api_key = "s3cret"
    try:
        with pytest.raises(openai.AuthenticationError):
            torch_server.ask(REFUSE_Q)
        keyed = openai.OpenAI(base_url=f"{torch_server.url}/v1", api_key="s3cret", max_retries=0)
        assert keyed.chat.completions.create(
            model=torch_server.service.name, messages=[{"role": "user", "content": REFUSE_Q}]
        )
        for method, path in (("GET", "/v1/models"), ("POST", "/admin/reload"), ("POST", "/v1/chat/completions")):
            response = httpx.request(method, f"{torch_server.url}{path}", headers={"authorization": "Bearer nope"})
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{torch_server.url}/health").status_code == 200  # probes need no key
    finally:
        settings.api_key = None
