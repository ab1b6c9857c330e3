"""Conversations → token ids + a per-token loss mask, through the model's own chat template (both backends)."""

from __future__ import annotations

import json
import re
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


# A message's text goes into the template as a slot made of private-use characters (no template writes them);
# the text itself is put in afterwards and encoded on its own (see ChatTokenizer.render_parts).
_SLOT = "\ue000{}\ue001"
_SLOTS = re.compile("\ue000([0-9]+)\ue001")


def chatml_text(messages: list[dict], add_generation_prompt: bool = False) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@dataclass
class Encoded:
    """One training row as plain Python: token ids and 1 where the loss is taken."""

    ids: list[int]
    mask: list[int]
    full_length: int = 0  # tokens before the cut to max_length (0: not recorded)

    @property
    def supervised(self) -> int:
        return sum(self.mask)

    @property
    def truncated(self) -> bool:
        """Cut to max_length: the end of the row (its last answer) is missing."""
        return self.full_length > len(self.ids)


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
        """Ids of text in which special-token strings ARE special tokens: for the template's own text only."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Ids of text as plain text: a `<|im_end|>` (or any added token) in it is spelled out, never the token.

        The tokenizer's normaliser, pre-tokeniser and model without its added-token matching: the same ids as
        encode() for text holding no added token (tokenizers' own encode_special_tokens flag leaves non-special
        added tokens such as `<tool_call>` or `<think>` active)."""
        tok = self._tok
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        pieces = tok.pre_tokenizer.pre_tokenize_str(text) if tok.pre_tokenizer is not None else [(text, None)]
        ids = [token.id for piece, _ in pieces for token in tok.model.tokenize(piece)]
        if self._added_ids.intersection(ids):  # a vocabulary whose model spells an added token itself
            raise UserError(f"{self.path}: this tokenizer turns plain text into special tokens; use another model")
        return ids

    @cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self._tok.get_added_tokens_decoder())

    def render_parts(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """The conversation as the template lays it out, in pieces: (text, True) for a message's text, (text,
        False) for the template's own.

        The template renders with a slot in place of each message's text, which is put into its slot
        afterwards: the template never sees message text, so nothing a user or a document writes (a question,
        earlier turns, retrieved passages) can steer it, and every piece says whether it is message text, which
        is encoded as plain text (encode_plain). Only the template's own markers become special tokens."""
        slotted = [  # an empty text stays empty: a template may test for it
            {**m, "content": _SLOT.format(i)} if isinstance(m.get("content"), str) and m["content"] else m
            for i, m in enumerate(messages)
        ]
        pieces = _SLOTS.split(self.apply_chat_template(slotted, add_generation_prompt))
        parts = [(messages[int(p)]["content"], True) if k % 2 else (p, False) for k, p in enumerate(pieces)]
        return [(text, is_message) for text, is_message in parts if text]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The text render_parts() encodes: the template's rendering, message text inserted as given."""
        return "".join(text for text, _ in self.render_parts(messages, add_generation_prompt))

    def encode_parts(self, parts: list[tuple[str, bool]]) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of render_parts() pieces and each id's character span in their joined text (a message's ids all
        get its whole span: masks only ask which piece an id came from)."""
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        at = 0
        for text, is_message in parts:
            if is_message:
                piece = self.encode_plain(text)
                offsets += [(at, at + len(text))] * len(piece)
            else:
                enc = self._tok.encode(text, add_special_tokens=False)
                piece = enc.ids
                offsets += [(at + start, at + end) for start, end in enc.offsets]
            ids += piece
            at += len(text)
        return ids, offsets

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
        return self.encode_parts(self.render_parts(messages, add_generation_prompt=True))[0]


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
    full = tokenizer.render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        start = len(tokenizer.render(messages[:i], add_generation_prompt=True))
        through = tokenizer.render(messages[: i + 1]).rstrip()
        if not full.startswith(through) or start > len(through):
            raise UserError("the chat template does not render conversations incrementally; cannot mask turns")
        spans.append((start, len(through)))
    return full, spans


def encode_messages(tokenizer: ChatTokenizer, messages: list[dict], max_length: int) -> Encoded:
    """Token ids of the whole chat; mask = 1 on every assistant turn (content + end marker), 0 elsewhere."""
    _, spans = assistant_spans(tokenizer, messages)
    ids, offsets = tokenizer.encode_parts(tokenizer.render_parts(messages))
    mask = [int(any(s < span_end and e > span_start for span_start, span_end in spans)) for s, e in offsets]
    return Encoded(ids[:max_length], mask[:max_length], len(ids))


def encode_text(tokenizer: ChatTokenizer, text: str, max_length: int) -> Encoded:
    """Plain text rows train on every token (as mlx-lm does)."""
    ids = tokenizer.encode(text)
    return Encoded(ids[:max_length], [1] * min(len(ids), max_length), len(ids))
