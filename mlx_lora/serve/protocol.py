"""The OpenAI chat-completions wire format: request checking, responses, stream chunks and error bodies."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from mlx_lora.core.userfiles import lone_surrogate

# Fields of a chat-completions request that are read; any other field is accepted and ignored, as OpenAI-compatible
# servers do, except the ones below that would change what is answered and cannot be honoured.
UNSUPPORTED = ("tools", "functions", "tool_choice", "response_format", "logprobs")


class ApiError(Exception):
    """A request the server refuses: HTTP status + OpenAI's error body {"error": {message, type, code}}."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error", param=None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat request: the question (the last user turn) and the generation settings."""

    question: str
    earlier_turns: int  # messages before the last user turn: accepted, not shown to the model (see README)
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]


def _text(content, where: str) -> str:
    """A message's text: a string, or OpenAI's list of parts whose text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}: only text parts are supported", "invalid_content", param=where)
            out.append(part["text"])
        return "".join(out)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", "invalid_content", param=where)


def _number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, kind)
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise ApiError(
            400, f"{key}: expected a {'whole ' if integer else ''}number, got {value!r}", "invalid_type", param=key
        )
    if not low <= value <= high:
        code = (
            "max_tokens_too_large"
            if key in ("max_tokens", "max_completion_tokens") and value > high
            else "out_of_range"
        )
        raise ApiError(400, f"{key}: {value} is outside [{low}, {high}]", code, param=key)
    return value


def parse_chat(raw: bytes, served: str, default_max_tokens: int, max_tokens_cap: int, defaults) -> ChatRequest:
    """Check a chat-completions body; anything wrong is an ApiError (4xx) naming the field."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", "invalid_json") from None
    except RecursionError:  # arrays or objects nested thousands deep: no chat request looks like that
        raise ApiError(400, "the request body is nested too deeply", "invalid_json") from None
    if (char := lone_surrogate(body)) is not None:  # an escape JSON allows, but no text: it cannot be written out
        raise ApiError(
            400,
            f"escape \\u{ord(char):04x} is half of a UTF-16 pair, not a character; send the text as UTF-8",
            "invalid_json",
        )
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    model = body.get("model", served)
    if model != served:
        raise ApiError(404, f"model {model!r} is not served here; this server serves {served!r}", "model_not_found")
    for key in UNSUPPORTED:
        if body.get(key) not in (None, [], False):
            raise ApiError(400, f"{key}: not supported by this server", "unsupported_parameter", param=key)
    if body.get("n", 1) != 1:
        raise ApiError(400, "n: only one choice per request is supported", "unsupported_parameter", param="n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of {role, content}", "invalid_messages", "messages")
    roles = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}]: expected an object with a role", "invalid_messages", param="messages")
        roles.append(message["role"])
    users = [i for i, role in enumerate(roles) if role == "user"]
    if not users:
        raise ApiError(400, "messages: no user turn to answer", "no_user_message", param="messages")
    last = users[-1]
    question = _text(messages[last].get("content"), f"messages[{last}].content")
    if not question.strip():
        raise ApiError(400, f"messages[{last}].content: the question is empty", "empty_question", param="messages")
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, max_key, default_max_tokens, 1, max_tokens_cap, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop):
        stop = tuple(stop)
    else:
        raise ApiError(400, "stop: expected a string or a list of up to 4 non-empty strings", "invalid_stop", "stop")
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise ApiError(400, "stream: expected true or false (stream_options: an object)", "invalid_type", "stream")
    return ChatRequest(
        question=question,
        earlier_turns=len(messages) - 1,
        model=served,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", defaults.temperature, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", defaults.top_p, 1e-6, 1.0)),
        stop=stop,
    )


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """(text up to the first stop sequence, whether one was found)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def completion(request_id: str, model: str, answer: str, finish: str, extra: dict, usage: dict) -> dict:
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}],
        "usage": usage,
        "mlx_lora": extra,
    }


def chunk(request_id: str, model: str, delta: dict, finish: str | None = None, **extra) -> str:
    """One server-sent event of a streamed completion."""
    body = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else [],
        **extra,
    }
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def pieces(text: str, size: int = 24) -> list[str]:
    """The accepted answer in small deltas, so a client renders it as it would a generated stream."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]
