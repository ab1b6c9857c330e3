"""Rendering through the real Qwen tokenizer: ids + a mask on every assistant turn and its end marker, nothing else."""

import pytest

from mlx_lora.core.errors import UserError
from mlx_lora.data.formats import encode_example, parse_row, read_examples
from mlx_lora.data.render import ChatTokenizer, encode_messages, encode_text

CHAT = [
    {"role": "system", "content": "你是 FAQ 助理。"},
    {"role": "user", "content": "VPN 怎麼設定?"},
    {"role": "assistant", "content": "依據公司規範:下載新版 client。"},
    {"role": "user", "content": "那 MFA 呢?"},
    {"role": "assistant", "content": "MFA 請用 Authenticator app 重設。"},
]


@pytest.fixture(scope="module")
def tok(qwen_tokenizer_dir):
    return ChatTokenizer.from_dir(qwen_tokenizer_dir)


def supervised_text(tok, enc):
    return tok._tok.decode([i for i, m in zip(enc.ids, enc.mask) if m], skip_special_tokens=False)


def test_every_assistant_turn_and_its_end_marker_is_trained(tok):
    enc = encode_messages(tok, CHAT, max_length=512)
    assert len(enc.ids) == len(enc.mask)
    assert (
        supervised_text(tok, enc)
        == "依據公司規範:下載新版 client。<|im_end|>MFA 請用 Authenticator app 重設。<|im_end|>"
    )
    im_end = tok.token_id("<|im_end|>")
    ends = [m for i, m in zip(enc.ids, enc.mask) if i == im_end]
    assert ends == [0, 0, 1, 0, 1]  # system, user, assistant, user, assistant


def test_ids_equal_tokenising_the_rendered_text(tok):
    enc = encode_messages(tok, CHAT, max_length=512)
    assert enc.ids == tok.encode(tok.apply_chat_template(CHAT))


def test_truncation_keeps_the_mask_aligned(tok):
    full = encode_messages(tok, CHAT, max_length=512)
    for cut in (5, 20, len(full.ids) - 3):
        short = encode_messages(tok, CHAT, max_length=cut)
        assert short.ids == full.ids[:cut] and short.mask == full.mask[:cut]


def test_zero_weight_turns_are_not_trained(tok):
    chat = [dict(m) for m in CHAT]
    chat[2]["weight"] = 0  # OpenAI fine-tuning format: weight 0 = keep as context, do not learn
    text = supervised_text(tok, encode_messages(tok, chat, max_length=512))
    assert text == "MFA 請用 Authenticator app 重設。<|im_end|>"


def test_plain_text_rows_train_every_token(tok):
    enc = encode_text(tok, "just text", 10)
    assert enc.mask == [1] * len(enc.ids) and enc.ids


def test_shipped_qwen3_template_masks_the_same_answer(qwen_tokenizer_dir):
    """The package's own (Qwen3) template renders differently but the trained text is still exactly the answers."""
    from conftest import qwen_tokenizer_files

    from mlx_lora.data.render import read_chat_template

    template = read_chat_template(qwen_tokenizer_files())
    assert template and "im_start" in template
    tok3 = ChatTokenizer(qwen_tokenizer_files() / "tokenizer.json", template)
    text = supervised_text(tok3, encode_messages(tok3, CHAT[:3], max_length=512))
    assert text.endswith("依據公司規範:下載新版 client。<|im_end|>")
    assert "VPN" not in text


@pytest.mark.parametrize(
    "row",
    [
        {"messages": CHAT[:3]},
        {"prompt": "VPN 怎麼設定?", "completion": "依據公司規範:下載新版 client。"},
        {
            "text": "<|im_start|>user\nVPN 怎麼設定?<|im_end|>\n<|im_start|>assistant\n依據公司規範:下載新版 client。<|im_end|>\n"  # noqa: E501
        },
    ],
)
def test_every_format_masks_only_the_answer(tok, row):
    example = parse_row(row, "x.jsonl", 1)
    text = supervised_text(tok, encode_example(tok, example, 512))
    assert text == "依據公司規範:下載新版 client。<|im_end|>"


def test_generation_prompt_adds_the_system_prompt_like_training(tok):
    ids = tok.prompt_ids([{"role": "user", "content": "VPN?"}], system_prompt="你是 FAQ 助理。")
    rendered = tok._tok.decode(ids, skip_special_tokens=False)
    assert (
        rendered
        == "<|im_start|>system\n你是 FAQ 助理。<|im_end|>\n<|im_start|>user\nVPN?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "line, needle",
    [
        ('{"messages": []}', 'x.jsonl:1: "messages" must be a non-empty list'),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "x.jsonl:1: each message needs a role"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "at least one assistant message"),
        ('{"prompt": "a"}', '"prompt" and "completion" must both be strings'),
        ('{"foo": 1}', "unknown row format"),
        (  # an empty answer would teach "answer with nothing": every format says so
            '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": " "}]}',
            "x.jsonl:1: the last assistant message is empty",
        ),
        ('{"prompt": "VPN?", "completion": ""}', 'x.jsonl:1: "completion" is empty'),
        (
            '{"text": "<|im_start|>user\\nVPN?<|im_end|>\\n<|im_start|>assistant\\n<|im_end|>"}',
            "x.jsonl:1: the last assistant message is empty",
        ),
        ('{"text": "a"', "x.jsonl:1: malformed JSON"),
    ],
)
def test_malformed_rows_give_file_line_errors(tmp_path, line, needle):
    path = tmp_path / "x.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        read_examples(path)
    assert needle in str(info.value)
