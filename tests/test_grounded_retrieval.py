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


KB3 = {
    "leave": "請假須於三天前在 HR 系統申請,病假可事後補。",
    "vpn": "VPN 設定:下載 GlobalProtect client,以 SSO 登入。",
    "wifi": "訪客 Wi-Fi:名稱 Guest-Net,密碼每週一更換。",
}
ASKED3 = [
    ("想休假要走什麼流程", "leave"),
    ("休假單要誰簽", "leave"),
    ("明天臨時休假可以嗎", "leave"),
    ("在家連不上內網", "vpn"),
    ("內網連線一直失敗", "vpn"),
    ("出差時連回內網", "vpn"),
]


def test_the_topic_classifier_ranks_by_the_words_a_docs_questions_use(monkeypatch):
    """No single entry is like the query, but every question asking for "leave" says 休假: the classifier knows."""
    import mlx_lora.data.retrieval as retrieval

    query = "休假要先跟誰講"
    table = {(query, "出差時連回內網"): 0.5}  # the nearest entry is a vpn question, half alike
    index = PassageIndex(_FixedScorer(table), KB3, ASKED3)
    assert index.search([query], 1)[0][0][0] == "leave"
    monkeypatch.setattr(retrieval, "TOPIC_WEIGHT", 0.0)
    assert index.search([query], 1)[0][0][0] == "vpn"  # by entries and words alone


def test_a_doc_nobody_asked_about_gets_the_rows_best_topic_probability():
    """The classifier learnt such a doc from its text alone; it competes on its text, not on that handicap."""
    index = PassageIndex(_FixedScorer({}), KB3, ASKED3)  # wifi: no questions
    probs = index._topics.probabilities(["休假單", "連不上", "密碼"], leave_out_own=False)
    wifi = list(KB3).index("wifi")
    assert (probs[:, wifi] == probs.max(axis=1)).all()
    assert probs[0, wifi] == probs[0, list(KB3).index("leave")]  # 休假單 is leave's; wifi ties, not below


def test_a_train_question_gets_the_topic_probability_of_a_classifier_that_never_saw_it():
    """With one question a fold, leaving a question out is exactly an index built without it (so a training row's
    passages come from the same kind of ranking a user's question gets)."""
    asked = ASKED3[:2] + ASKED3[3:5]  # four questions, five folds: one question a fold
    index = PassageIndex(CharScorer(), KB3, asked)
    for i, (question, _) in enumerate(asked):
        without = PassageIndex(CharScorer(), KB3, asked[:i] + asked[i + 1 :])
        left_out = index.doc_scores([question], leave_out_own=True)[0]
        assert left_out == pytest.approx(without.doc_scores([question])[0]), question
        assert not index.doc_scores([question])[0] == pytest.approx(left_out)  # in sample it differs
