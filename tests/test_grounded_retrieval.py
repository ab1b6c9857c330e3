"""The passage index: own question left out, deleted docs, clauses, question weight, no scikit-learn."""

from __future__ import annotations

import pytest

from mlx_lora.data.kb import load_kb
from mlx_lora.data.retrieval import PassageIndex
from mlx_lora.data.similarity import CharScorer


def test_a_train_row_never_retrieves_its_own_question(tiny_kb, tiny_questions):
    kb = {d: doc.text for d, doc in load_kb(tiny_kb).items()}
    index = PassageIndex(CharScorer(), kb, [("VPN 連不上", "vpn"), ("請假", "leave")])
    own = index.doc_scores(["VPN 連不上"])[0]
    left_out = index.doc_scores(["VPN 連不上"], leave_out_own=True)[0]
    without = PassageIndex(CharScorer(), kb, [("請假", "leave")]).doc_scores(["VPN 連不上"])[0]
    vpn = list(kb).index("vpn")
    assert own[vpn] > left_out[vpn] + 0.3  # found itself; left out, only the doc's own text finds it
    assert left_out == pytest.approx(without)  # exactly as if the question had never been asked


def test_questions_about_a_doc_deleted_from_the_kb_are_left_out_of_the_index():
    index = PassageIndex(CharScorer(), {"a": "甲"}, [("問題", "deleted-doc")])
    assert index.labels == ["a"]  # a train question whose doc is gone finds nothing, and breaks nothing
    assert index.search(["問題"], 3) == [[("a", pytest.approx(index.doc_scores(["問題"])[0, 0]))]]


def test_a_doc_nobody_asked_about_is_found_by_its_clauses_and_words():
    """A doc added after training has no questions in the index: its clauses and its words must find it."""
    from mlx_lora.data.retrieval import clauses

    kb = {
        "vpn": "VPN 設定:下載 GlobalProtect client,閘道填 vpn.example.tw,以 SSO 登入;連不上時先重開機。",
        "wifi": "訪客 Wi-Fi:名稱 Guest-Net,密碼每週一更換,請向櫃台索取。",
        "leave": "請假須於三天前在 HR 系統申請,病假可事後補。",
    }
    assert clauses(kb["leave"]) == ["請假須於三天前在 HR 系統申請", "病假可事後補"]
    assert clauses("一句話") == []
    asked = [("VPN 連不上怎麼辦", "vpn"), ("我要請病假", "leave"), ("密碼忘了怎麼辦", "vpn")]
    index = PassageIndex(CharScorer(), kb, asked)
    # Whole texts and questions alone ranked vpn first here (its question shares "密碼…是"); wifi's clause wins.
    for question in ("訪客的無線網路密碼是多少", "訪客密碼找誰拿"):
        assert index.search([question], 1)[0][0][0] == "wifi", question


class _FixedScorer:
    """Similarities from a table: (query, entry text) → score, 0 elsewhere."""

    def __init__(self, table):
        self.table = table

    def matrix(self, a, b):
        import numpy as np

        return np.array([[self.table.get((x, y), 0.0) for y in b] for x in a])


def test_a_question_like_the_query_counts_less_than_a_docs_own_words():
    """A doc added after training has no question entries: a training question about another doc, a bit more like
    the query than the new doc's text, must not push it out of first place."""
    from mlx_lora.data.retrieval import QUESTION_WEIGHT

    kb = {"old": "甲乙丙", "new": "丁戊己"}
    table = {("q", "丁戊己"): 0.7, ("q", "甲乙丙"): 0.2, ("q", "舊的問題"): 0.8}
    assert 0.8 * QUESTION_WEIGHT < 0.7 < 0.8  # the case this test is about
    index = PassageIndex(_FixedScorer(table), kb, [("舊的問題", "old")])
    assert [d for d, _ in index.search(["q"], 2)[0]] == ["new", "old"]
    table[("q", "舊的問題")] = 0.95  # a question (nearly) the same as the query still wins
    assert index.search(["q"], 1)[0][0][0] == "old"


def test_without_scikit_learn_the_index_still_ranks_by_embeddings(monkeypatch):
    import sys

    kb = {"vpn": "VPN 設定:以 SSO 登入。", "leave": "請假須於三天前申請。"}
    monkeypatch.setitem(sys.modules, "sklearn.feature_extraction.text", None)  # import fails as if not installed
    index = PassageIndex(CharScorer(), kb, [("我要請假", "leave")])
    assert "scikit-learn" in index.missing
    assert index.search(["請假要多久前申請"], 1)[0][0][0] == "leave"
