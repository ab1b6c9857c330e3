"""Conversations → token ids + a per-token loss mask, through the model's own chat template (both backends)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mlx_lora.core.errors import UserError

# The ChatML layout of Qwen models. Used when a tokenizer ships no template, and for `text` rows.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chatml_text(messages: list[dict], add_generation_prompt: bool = False) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@dataclass
class Encoded:
    """One training row as plain Python: token ids and 1 where the loss is taken."""

    ids: list[int]
    mask: list[int]

    @property
    def supervised(self) -> int:
        return sum(self.mask)


class ChatTokenizer:
    """A model folder's tokenizer.json + chat template, without transformers (so the core stays light)."""

    def __init__(self, tokenizer_file: str | Path, template: str | None = None):
        from tokenizers import Tokenizer  # light: the Rust tokenizers package, no torch

        self.path = Path(tokenizer_file)
        self._tok = Tokenizer.from_file(str(self.path))
        self.template_source = template or CHATML_TEMPLATE

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTokenizer:
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise UserError(f"{model_dir}: no tokenizer.json; point --model at a Hugging Face model folder")
        return cls(tokenizer_file, read_chat_template(model_dir))

    @cached_property
    def _template(self):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise UserError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda value, **kw: json.dumps(value, ensure_ascii=False, **kw)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.template_source)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token="", eos_token="<|im_end|>"
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def stop_ids(self) -> list[int]:
        """Tokens that end an answer: ChatML's end-of-turn and the end-of-text marker, where the vocabulary has them."""
        found = (self.token_id(t) for t in ("<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "</s>"))
        return [i for i in found if i is not None]

    def prompt_ids(self, messages: list[dict], system_prompt: str | None = None) -> list[int]:
        """Token ids of a generation prompt; the system prompt is added exactly as the data builder did."""
        if system_prompt and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": system_prompt}] + list(messages)
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=True))


def read_chat_template(model_dir: Path) -> str | None:
    """The template transformers would use: chat_template.jinja, else tokenizer_config.json's entry."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template
    return None


def assistant_spans(tokenizer: ChatTokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn's content + end marker.

    Each span runs from the end of the prompt that precedes the turn (rendered with the generation prompt)
    to the end of the conversation rendered through that turn, minus trailing whitespace: the content and
    its closing `<|im_end|>`, nothing of the next turn.
    """
    full = tokenizer.apply_chat_template(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True))
        through = tokenizer.apply_chat_template(messages[: i + 1]).rstrip()
        if not full.startswith(through) or start > len(through):
            raise UserError("the chat template does not render conversations incrementally; cannot mask turns")
        spans.append((start, len(through)))
    return full, spans


def encode_messages(tokenizer: ChatTokenizer, messages: list[dict], max_length: int) -> Encoded:
    """Token ids of the whole chat; mask = 1 on every assistant turn (content + end marker), 0 elsewhere."""
    text, spans = assistant_spans(tokenizer, messages)
    ids, offsets = tokenizer.encode_with_offsets(text)
    mask = [int(any(s < span_end and e > span_start for span_start, span_end in spans)) for s, e in offsets]
    return Encoded(ids[:max_length], mask[:max_length])


def encode_text(tokenizer: ChatTokenizer, text: str, max_length: int) -> Encoded:
    """Plain text rows train on every token (as mlx-lm does)."""
    ids = tokenizer.encode(text)[:max_length]
    return Encoded(ids, [1] * len(ids))
