"""Grounded rows: k retrieved passages, doc-id and numbered citations, moved gold, oracle-free rows, regrounding."""

from __future__ import annotations

import pytest
from conftest import REFUSAL, grounded

from mlx_lora.core.config import DataConfig
from mlx_lora.data.formats import read_examples
from mlx_lora.data.grounded import (
    own_citation_removed,
    parse_citation,
    reground,
    user_turn,
    with_doc_id,
    without_answer,
)
from mlx_lora.data.retrieval import PassageIndex
from mlx_lora.data.similarity import CharScorer


def test_every_row_shows_k_passages_and_answerable_answers_cite_their_doc(tiny_kb, tiny_questions, tmp_path):
    cfg, kb, _, rows = grounded(tiny_kb, tiny_questions, tmp_path, oracle_rate=1.0, cite="doc_id")
    for name, split in rows.items():
        for row in split:
            meta, user, answer = row["meta"], row["messages"][-2]["content"], row["messages"][-1]["content"]
            assert len(meta["passages"]) == 2 and len(set(meta["passages"])) == 2
            assert user == user_turn(meta["question"], [(d, kb[d].text) for d in meta["passages"]], cfg)
            assert user.endswith(meta["question"])  # the question comes last, after the passages
            if meta["answerable"]:
                assert answer == f"[{meta['doc_id']}] 依據公司規範:{kb[meta['doc_id']].text}"
                if name == "train":  # oracle_rate 1: every answerable train row sees its gold passage
                    assert meta["gold_in_passages"]
            else:
                assert answer == REFUSAL and meta["doc_id"] is None


@pytest.mark.parametrize("shuffle", [False, True])
def test_numbered_citations_name_the_gold_passage_by_its_place(tiny_kb, tiny_questions, tmp_path, shuffle):
    cfg, kb, _, rows = grounded(
        tiny_kb, tiny_questions, tmp_path, oracle_rate=1.0, cite="number", shuffle_passages=shuffle, passages=3
    )
    places = set()
    for split in rows.values():
        for row in split:
            meta, user, answer = row["meta"], row["messages"][-2]["content"], row["messages"][-1]["content"]
            ids = meta["passages"]
            # The prompt labels passages 1..k and shows no doc id.
            assert [line[:3] for line in user.splitlines()[1 : 1 + len(ids)]] == ["[1]", "[2]", "[3]"]
            assert not any(f"[{d}]" in user for d in kb)
            if meta["answerable"] and meta["doc_id"] in ids:
                n = ids.index(meta["doc_id"]) + 1
                places.add(n)
                assert answer == f"[{n}] 依據公司規範:{kb[meta['doc_id']].text}"
                example = read_examples(tmp_path / "out" / "train.jsonl")[0]  # any row: the helper reads meta
                assert with_doc_id(answer, ids, cfg) == f"[{meta['doc_id']}] 依據公司規範:{kb[meta['doc_id']].text}"
                assert own_citation_removed(type(example)(row["messages"], meta=meta)) == answer[len(f"[{n}] ") :]
    assert 1 in places and (places - {1} or not shuffle)  # shuffled rows put the gold passage elsewhere too


def test_move_gold_moves_first_place_gold_passages_of_train_rows_only(tiny_kb, tiny_questions, tmp_path):
    kept = grounded(tiny_kb, tiny_questions, tmp_path / "a", oracle_rate=1.0, passages=3)[3]
    moved = grounded(tiny_kb, tiny_questions, tmp_path / "b", oracle_rate=1.0, passages=3, move_gold=1.0)[3]

    def gold_places(rows):
        return [r["meta"]["passages"].index(r["meta"]["doc_id"]) + 1 for r in rows if r["meta"]["answerable"]]

    assert 1 in gold_places(kept["train"])  # retrieval put some gold passages first...
    assert 1 not in gold_places(moved["train"])  # ...and move_gold 1 moved every one of them
    assert moved["valid"] == kept["valid"] and moved["test"] == kept["test"]  # what inference sees is untouched
    for row in moved["train"]:
        meta = row["meta"]
        if meta["answerable"]:  # the answer cites the gold passage's new place, and the passages are the same set
            assert row["messages"][-1]["content"].startswith(f"[{meta['passages'].index(meta['doc_id']) + 1}] ")
    same = {r["meta"]["question"]: set(r["meta"]["passages"]) for r in kept["train"]}
    assert all(set(r["meta"]["passages"]) == same[r["meta"]["question"]] for r in moved["train"])


def test_with_doc_id_maps_only_a_shown_number_in_number_mode():
    number, by_id = DataConfig(mode="grounded", cite="number"), DataConfig(mode="grounded", cite="doc_id")
    shown = ["vpn", "leave"]
    assert with_doc_id("[2] 請假三天前", shown, number) == "[leave] 請假三天前"
    assert with_doc_id("[3] 沒有第三段", shown, number) == "[3] 沒有第三段"  # no such passage: left as it is
    assert with_doc_id("[vpn] 以 SSO", shown, number) == "[vpn] 以 SSO"  # a doc id stays a doc id
    assert with_doc_id("抱歉", shown, number) == "抱歉"
    assert with_doc_id("[2] 請假", ["1", "2"], by_id) == "[2] 請假"  # doc_id mode: "2" is a doc's id


def test_a_template_without_the_cited_label_is_refused(tmp_path):
    from mlx_lora.core.config import Config, validate
    from mlx_lora.core.errors import UserError

    cfg = Config()
    cfg.data.cite, cfg.data.passage_template = "number", "({doc_id}) {text}"
    with pytest.raises(UserError, match=r"data.passage_template: must contain \{label\} or \{n\}"):
        validate(cfg)
    cfg.data.passage_template = "[{doc_id}] {text}"  # a template written for doc-id citations
    with pytest.raises(UserError, match=r"or set data.cite: doc_id"):
        validate(cfg)
    cfg.data.cite = "doc_id"
    validate(cfg)
    cfg.data.cite, cfg.data.passage_template = "number", "第{n}段:{text}"
    validate(cfg)


def test_oracle_free_rows_lose_their_gold_passage_and_follow_the_policy(tiny_kb, tiny_questions, tmp_path):
    _, _, _, rows = grounded(tiny_kb, tiny_questions, tmp_path, oracle_rate=0.0, oracle_free="refuse")
    answerable = [r for r in rows["train"] if r["meta"]["answerable"]]
    assert answerable and all(not r["meta"]["gold_in_passages"] for r in answerable)
    assert all(r["messages"][-1]["content"] == REFUSAL for r in answerable)
    assert all(r["meta"]["style"].endswith("+oracle_free") for r in answerable)
    _, _, _, rows = grounded(tiny_kb, tiny_questions, tmp_path / "b", oracle_rate=0.0, oracle_free="answer")
    # Their doc is not among the passages, so even a numbered citation names it by its id.
    answerable = [r for r in rows["train"] if r["meta"]["answerable"]]
    assert all(r["messages"][-1]["content"].startswith(f"[{r['meta']['doc_id']}] ") for r in answerable)
    # Held-out rows are never forced either way: they get what inference gets.
    assert rows["test"] and all("+oracle_free" not in r["meta"]["style"] for r in rows["test"])


def test_the_same_data_builds_the_same_rows(tiny_kb, tiny_questions, tmp_path):
    a = grounded(tiny_kb, tiny_questions, tmp_path / "a", oracle_rate=0.5)[3]
    b = grounded(tiny_kb, tiny_questions, tmp_path / "b", oracle_rate=0.5)[3]
    assert a == b


def test_reground_rebuilds_the_prompt_from_todays_kb(tiny_kb, tiny_questions, tmp_path):
    cfg, kb, splits, _ = grounded(tiny_kb, tiny_questions, tmp_path)
    test = read_examples(tmp_path / "out" / "test.jsonl")
    texts = {d: doc.text for d, doc in kb.items()}
    train_questions = [(i.question, i.doc_id) for i in splits["train"] if i.doc_id]
    same = reground(test, PassageIndex(CharScorer(), texts, train_questions), cfg)
    assert [e.messages for e in same] == [e.messages for e in test]  # nothing changed: the same prompts
    asked = test[0].question
    added = {**texts, "new-doc": f"{asked}的新規定:一律線上申請。"}  # a doc added after training
    new = reground(test, PassageIndex(CharScorer(), added, train_questions), cfg)
    assert "new-doc" in new[0].meta["passages"] and "一律線上申請" in new[0].messages[-2]["content"]
    assert all(e.question == old.question for e, old in zip(new, test))


@pytest.mark.parametrize(
    "answer, cited, text",
    [
        ("[vpn-setup] 依據公司規範:VPN", "vpn-setup", "依據公司規範:VPN"),
        ("  [vpn] text", "vpn", "text"),
        ("依據公司規範:[vpn] 不是開頭", None, "依據公司規範:[vpn] 不是開頭"),
        ("[重要] 中文括號不是引用", None, "[重要] 中文括號不是引用"),
        ("", None, ""),
    ],
)
def test_parse_citation(answer, cited, text):
    assert parse_citation(answer) == (cited, text)


def test_stats_say_how_often_the_retriever_finds_valids_gold_passage(tiny_kb, tiny_questions, tmp_path):
    """A new user's first sign of whether retrieval works on their KB: counted from the rows as written."""
    import json

    from mlx_lora.data.dataset import format_stats

    _, _, _, rows = grounded(tiny_kb, tiny_questions, tmp_path, oracle_rate=1.0)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    answerable = [r["meta"] for r in rows["valid"] if r["meta"]["answerable"]]
    first = sum(m["passages"][0] == m["doc_id"] for m in answerable)
    shown = sum(m["gold_in_passages"] for m in answerable)
    got = stats["splits"]["valid"]["retrieval"]
    assert got == {
        "gold_first_pct": round(100 * first / len(answerable), 1),
        "gold_shown_pct": round(100 * shown / len(answerable), 1),
        "passages": 2,
    }
    assert "retrieval" not in stats["splits"]["train"]  # train rows' passages are rearranged on purpose
    assert f"first for {got['gold_first_pct']}% of the answerable" in format_stats(stats, tmp_path / "out")


def test_without_answer_keeps_the_part_least_related_to_the_question():
    text = "SSO 密碼每 90 天須更換一次；連續輸錯 5 次帳號會被鎖定 30 分鐘。"
    assert without_answer("密碼多久要更換一次？", text, CharScorer()) == "連續輸錯 5 次帳號會被鎖定 30 分鐘。"
    assert without_answer("輸錯幾次會被鎖定？", text, CharScorer()) == "SSO 密碼每 90 天須更換一次。"
    assert without_answer("密碼多久要更換？", "密碼每 90 天須更換一次。", CharScorer()) is None  # one part only
    assert without_answer("今天天氣如何？", text, CharScorer()) is None  # asks about no part more than another
    # One sentence splits at its commas (not inside a list); of two equally unrelated parts, the first is kept.
    one = "離職須提前 30 天申請，最後工作日前須歸還 laptop、員工證，並完成交接清單。"
    assert without_answer("離職要提前幾天申請？", one, CharScorer()) == "最後工作日前須歸還 laptop、員工證。"


def test_near_miss_rows_show_their_gold_passage_cut_short_and_refuse(tiny_kb, tiny_questions, tmp_path):
    _, kb, _, plain = grounded(tiny_kb, tiny_questions, tmp_path / "a", oracle_rate=1.0)
    _, _, _, cut = grounded(tiny_kb, tiny_questions, tmp_path / "b", oracle_rate=1.0, near_miss_rate=1.0)
    made = [r for r in cut["train"] if r["meta"]["style"].endswith("+near_miss")]
    # Only the vpn text has two parts ("VPN 設定:下載新版 client" / "以 SSO 登入"); the others cannot be cut.
    assert made and {r["meta"]["doc_id"] for r in made} == {"vpn"}
    for row in made:
        assert row["messages"][-1]["content"] == REFUSAL
        user = row["messages"][-2]["content"]
        assert kb["vpn"].text not in user and ("以 SSO 登入。" in user or "VPN 設定:下載新版 client。" in user)
    others = [r for r in cut["train"] if not r["meta"]["style"].endswith("+near_miss")]
    assert others == [r for r in plain["train"] if r["meta"]["question"] in {o["meta"]["question"] for o in others}]
    assert cut["valid"] == plain["valid"] and cut["test"] == plain["test"]  # what inference sees is untouched
