"""The split builder: ratios, determinism, answers from the KB, and no question shared between splits."""

import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_lora.core.config import DataConfig
from mlx_lora.core.textnorm import compact, normalize
from mlx_lora.data.dataset import build_splits, overlap_report, write_splits
from mlx_lora.data.kb import Doc, load_kb
from mlx_lora.data.questions import QuestionBank, load_questions


def test_normalize_folds_width_case_punctuation_and_space():
    assert normalize("ＶＰＮ　怎麼設定？！") == "vpn 怎麼設定"
    assert compact("VPN, 怎麼 設定?") == compact("ｖｐｎ怎麼設定")


def test_build_from_sample_files(tiny_kb, tiny_questions, tmp_path):
    cfg = DataConfig(
        kb=str(tiny_kb), questions=str(tiny_questions), dir=str(tmp_path / "out"), valid_fraction=0.2, test_fraction=0.2
    )
    kb = load_kb(tiny_kb)
    splits = build_splits(kb, load_questions(tiny_questions, kb), cfg)
    stats = write_splits(splits, cfg.dir, cfg)
    train = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    answerable = [r for r in train if r["meta"]["answerable"]]
    assert len(train) == stats["splits"]["train"]["rows"]
    # 75:25 in train: one refusal row for every three answerable rows
    assert len(train) - len(answerable) == round(len(answerable) / 3)
    for row in answerable:
        system, user, assistant = row["messages"]
        assert system["role"] == "system" and user["role"] == "user"
        assert assistant["content"] == "依據公司規範:" + kb[row["meta"]["doc_id"]].text
    assert stats["overlap"]["test"]["exact_overlap"] == 0
    assert all(stats["splits"][s]["per_doc"] for s in ("train", "valid", "test"))


def test_same_seed_same_files_other_seed_other_split(tiny_kb, tiny_questions, tmp_path):
    kb = load_kb(tiny_kb)
    bank = load_questions(tiny_questions, kb)
    a = build_splits(kb, bank, DataConfig(seed=1))
    b = build_splits(kb, bank, DataConfig(seed=1))
    c = build_splits(kb, bank, DataConfig(seed=2))
    assert a == b and a != c


def test_text_format_rows_are_chatml(tiny_kb, tiny_questions):
    kb = load_kb(tiny_kb)
    splits = build_splits(kb, load_questions(tiny_questions, kb), DataConfig(format="text"))
    row = splits["train"][0].row(DataConfig(format="text"))
    assert row["text"].startswith("<|im_start|>system\n") and row["text"].endswith("<|im_end|>\n")


def test_extra_questions_go_to_train_only_and_never_leak(tiny_kb, tiny_questions):
    kb = load_kb(tiny_kb)
    bank = load_questions(tiny_questions, kb)
    base = build_splits(kb, bank, DataConfig())
    held_out = [item.question for item in base["test"] if item.doc_id == "vpn"]
    extra = {"vpn": ["公司 VPN 要裝哪個版本?", held_out[0] + "!!"]}  # the second is a test question in disguise
    splits = build_splits(kb, bank, DataConfig(), extra)
    train_questions = {compact(i.question) for i in splits["train"]}
    assert compact("公司 VPN 要裝哪個版本?") in train_questions
    assert compact(held_out[0]) not in train_questions


def test_overlap_report_counts_near_duplicates():
    from mlx_lora.data.dataset import Item

    splits = {
        "train": [Item("請問 VPN 要怎麼設定才可以連線", "a", "vpn", "full")],
        "valid": [Item("請問 VPN 要怎麼設定才能連線", "a", "vpn", "full")],
        "test": [Item("午餐吃什麼", "r", None, "unanswerable")],
    }
    report = overlap_report(splits)
    assert report["valid"]["near_duplicates"] == 1 and report["test"]["near_duplicates"] == 0


question_text = st.text(alphabet="VPNvpn請假識別證 ,.?？、", min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    banks=st.lists(st.lists(question_text, min_size=1, max_size=12), min_size=1, max_size=4),
    pool=st.lists(question_text, min_size=1, max_size=10),
    seed=st.integers(0, 10_000),
)
def test_no_normalised_question_is_in_two_splits(banks, pool, seed):
    """Property: whatever the phrasings (duplicates, width and punctuation variants), splits never share one."""
    kb = {f"d{i}": Doc(f"d{i}", f"規則{i}", "") for i in range(len(banks))}
    by_doc, owner = {}, {}
    for i, questions in enumerate(banks):
        # The bank loader rejects a question under two docs; mirror that so the property is about the splitter.
        kept = [q for q in questions if compact(q) and owner.setdefault(compact(q), i) == i]
        if kept:
            by_doc[f"d{i}"] = {"short": kept}
    pool = [q for q in pool if compact(q) and compact(q) not in owner]
    if not by_doc or not pool:
        return
    bank = QuestionBank("抱歉", by_doc, pool)
    splits = build_splits(
        {k: kb[k] for k in by_doc}, bank, DataConfig(seed=seed, valid_fraction=0.2, test_fraction=0.3)
    )
    keys = {name: {compact(item.question) for item in items} for name, items in splits.items()}
    assert not keys["train"] & keys["valid"]
    assert not keys["train"] & keys["test"]
    assert not keys["valid"] & keys["test"]
    random.Random(seed)  # the split is seeded; nothing global is consumed


def test_build_data_names_kb_docs_that_no_question_asks_about(tiny_kb, tiny_questions, tmp_path):
    from mlx_lora.data.dataset import build_data

    stats = build_data(DataConfig(kb=str(tiny_kb), questions=str(tiny_questions), dir=str(tmp_path / "a")))
    assert stats["docs_without_questions"] == []
    text = tiny_questions.read_text(encoding="utf-8")
    tiny_questions.write_text(text[: text.index("  badge:")] + text[text.index("unanswerable:") :], encoding="utf-8")
    stats = build_data(DataConfig(kb=str(tiny_kb), questions=str(tiny_questions), dir=str(tmp_path / "b")))
    assert stats["docs_without_questions"] == ["badge"]


def test_loss_weights_mark_each_answers_first_token():
    from mlx_lora.data.batching import loss_weights, weight_sum
    from mlx_lora.data.render import Encoded

    mask = [0, 0, 1, 1, 1, 0, 0, 1, 1]  # two assistant turns
    assert loss_weights(mask, 5.0) == [0, 0, 5, 1, 1, 0, 0, 5, 1]
    assert loss_weights(mask, 1.0) == [float(m) for m in mask]
    assert loss_weights(mask, 5.0, lead=2) == [0, 0, 5, 5, 1, 0, 0, 5, 5]
    assert weight_sum([Encoded(list(range(9)), mask)], 3.0) == 5 + 2 * 2


def test_a_null_first_token_weight_gives_the_first_tokens_one_share_of_the_loss_whatever_the_answer_length():
    from mlx_lora.data.batching import DECISION_SHARE, decision_weight, weight_sum
    from mlx_lora.data.render import Encoded

    def rows(answer: int, lead_rows: int = 3) -> list[Encoded]:
        cite = [Encoded(list(range(9 + answer)), [0] * 9 + [1] * answer) for _ in range(lead_rows)]
        return [*cite, Encoded(list(range(29)), [0] * 9 + [1] * 20)]  # and a refusal

    weights = []
    for answer in (44, 131, 383):
        group = rows(answer)
        w = decision_weight(group)
        share = (weight_sum(group, w) - weight_sum(group, 0.0)) / weight_sum(group, w)
        assert abs(share - DECISION_SHARE) < 0.002  # the weight is rounded to a tenth
        weights.append(w)
    assert weights == sorted(weights) and weights[-1] > 2.5 * weights[0]  # longer answers, a heavier first token
    assert decision_weight(rows(2)) == 1.0  # answers so short the share is reached without weighting: a plain mean
    group, w2 = rows(131), decision_weight(rows(131), lead=2)
    share = (weight_sum(group, w2, 2) - weight_sum(group, 0.0, 2)) / weight_sum(group, w2, 2)
    assert abs(share - DECISION_SHARE) < 0.002


def test_valid_batches_are_wider_than_training_but_hold_few_logits():
    from mlx_lora.data.batching import VALID_BATCH, VALID_SUPERVISED, valid_batches
    from mlx_lora.data.render import Encoded

    def row(length, answer):
        return Encoded(list(range(length)), [0] * (length - answer) + [1] * answer)

    short = [row(20 + i, 5) for i in range(20)]
    batches = valid_batches(short, 2)
    assert sorted(i for b in batches for i in b) == list(range(20))  # every row once
    assert [len(b) for b in batches] == [VALID_BATCH, VALID_BATCH, 4]  # wider than training's 2
    assert all(len(short[b[0]].ids) <= len(short[b[-1]].ids) for b in batches)  # shortest first: little padding
    long = [row(600, 400) for _ in range(6)]  # long answers: the logits cap cuts batches to 2 rows
    assert [len(b) for b in valid_batches(long, 1)] == [2, 2, 2]
    assert all(sum(long[i].supervised for i in b) <= VALID_SUPERVISED for b in valid_batches(long, 1))
    assert [len(b) for b in valid_batches(long, 3)] == [3, 3]  # never fewer rows than a training batch


def test_a_bank_without_unanswerable_questions_is_an_error_naming_it(tiny_kb, tiny_questions):
    import pytest

    from mlx_lora.core.errors import UserError

    kb = load_kb(tiny_kb)
    tiny_questions.write_text(tiny_questions.read_text(encoding="utf-8").split("unanswerable:")[0], encoding="utf-8")
    cfg = DataConfig(questions=str(tiny_questions))
    with pytest.raises(UserError, match=r"questions.yaml: no unanswerable question left for train .*`unanswerable:`"):
        build_splits(kb, load_questions(tiny_questions, kb), cfg)
