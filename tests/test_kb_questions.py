"""KB and question-bank validation: hashes, duplicates, empty texts, unknown doc ids — each with its line."""

import json

import pytest

from mlx_lora.core.errors import UserError
from mlx_lora.data.kb import load_kb, text_sha256
from mlx_lora.data.questions import load_questions


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_hash_is_verified_and_computed_when_missing(tmp_path):
    kb = load_kb(
        write(
            tmp_path / "kb.jsonl",
            [
                {"doc_id": "a", "text": "甲規則", "text_hash": text_sha256("甲規則")},
                {"doc_id": "b", "text": "乙規則"},
            ],
        )
    )
    assert list(kb) == ["a", "b"] and kb["b"].text_hash == text_sha256("乙規則")


@pytest.mark.parametrize(
    "rows, needle",
    [
        ([{"doc_id": "a", "text": "x"}, {"doc_id": "a", "text": "y"}], "kb.jsonl:2: duplicate doc_id 'a'"),
        ([{"doc_id": "a", "text": "  "}], "kb.jsonl:1: doc 'a': \"text\" is empty"),
        ([{"doc_id": "a", "txt": "x"}], "kb.jsonl:1: doc 'a': \"text\" is missing; unknown key(s) ['txt']"),
        ([{"doc_id": "a", "text": "x", "text_hash": "0" * 64}], "kb.jsonl:1: text_hash of 'a' does not match"),
        ([{"text": "x"}], 'kb.jsonl:1: "doc_id" is missing'),
        ([{"id": "a", "text": "x"}], "kb.jsonl:1: \"doc_id\" is missing; unknown key(s) ['id']"),
        ([{"doc_id": 5, "text": "x"}], 'kb.jsonl:1: "doc_id" is 5, not a non-empty string'),
    ],
)
def test_bad_kb_rows_name_the_line(tmp_path, rows, needle):
    with pytest.raises(UserError, match=None) as info:
        load_kb(write(tmp_path / "kb.jsonl", rows))
    assert needle in str(info.value)


def test_malformed_json_line(tmp_path):
    path = tmp_path / "kb.jsonl"
    path.write_text('{"doc_id": "a", "text": "x"}\n{"doc_id": \n', encoding="utf-8")
    with pytest.raises(UserError, match=r"kb.jsonl:2: malformed JSON") as info:
        load_kb(path)
    assert "one JSON object per line" not in str(info.value)
    path.write_text('[\n  {"doc_id": "a", "text": "x"}\n]\n', encoding="utf-8")  # a JSON array, not JSONL
    with pytest.raises(UserError, match=r"kb.jsonl:1: malformed JSON .*one JSON object per line"):
        load_kb(path)


def test_non_utf8_jsonl_names_the_line_and_a_bom_is_accepted(tmp_path):
    path = tmp_path / "kb.jsonl"
    path.write_bytes(b'{"doc_id": "a", "text": "x"}\n{"doc_id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"kb.jsonl:2: not UTF-8 \(byte 0xe9 at column 29\)"):
        load_kb(path)
    path.write_bytes(b'\xef\xbb\xbf{"doc_id": "a", "text": "x"}\n')
    assert list(load_kb(path)) == ["a"]


def test_question_bank_loads(tiny_kb, tiny_questions):
    bank = load_questions(tiny_questions, load_kb(tiny_kb))
    assert len(bank.phrasings("vpn")) == 6 and len(bank.unanswerable) == 6 and bank.refusal.startswith("抱歉")


@pytest.mark.parametrize(
    "text, needle",
    [
        (
            'refusal: "no"\ndocs:\n  vpn:\n    short: ["a"]\n  ghost:\n    short: ["b"]\n',
            ":5: doc_id 'ghost' is not in",
        ),
        ('refusal: "no"\ndocs:\n  vpn:\n    terse: ["a"]\n', ":3: vpn: unknown style(s) ['terse']"),
        (
            'refusal: "no"\ndocs:\n  vpn:\n    short: ["VPN?"]\n  leave:\n    short: ["vpn"]\n',
            "listed for both 'vpn' and 'leave'",
        ),
        ('docs:\n  vpn:\n    short: ["a"]\n', '"refusal" must be'),
        ('refusal: "no"\ndocs:\n  vpn:\n    short: ["a"]\nextra: 1\n', "unknown key(s) ['extra']"),
        ('refusal: "no"\ndocs:\n  vpn:\n    short: [1, ""]\n', "vpn.short must be a list of non-empty strings"),
        ('refusal: "no"\ndocs: [\n', "questions.yaml:"),
        (
            'refusal: "no"\ndocs:\n  vpn:\n    short: ["a"]\n  vpn:\n    full: ["b"]\n',
            ":5: duplicate key 'vpn' (first at line 3)",
        ),  # PyYAML alone would silently drop the first vpn block
    ],
)
def test_bad_question_banks(tiny_kb, tmp_path, text, needle):
    path = tmp_path / "questions.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_questions(path, load_kb(tiny_kb))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_sample_data_meets_the_issue(tmp_path):
    from conftest import REPO

    kb = load_kb(REPO / "data" / "kb.jsonl")
    bank = load_questions(REPO / "data" / "questions.yaml", kb)
    assert len(kb) >= 20
    assert all(len(bank.phrasings(doc_id)) >= 15 for doc_id in kb)
    assert len(bank.unanswerable) >= 60


def test_a_device_given_as_the_kb_is_named_for_what_it_is():
    with pytest.raises(UserError, match="/dev/null: is not a regular file"):
        load_kb("/dev/null")
