"""Answerability: the pairwise model on real multilingual embeddings, its out-of-fold floor, its use in the decider."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_lora.answer.answerability import AnswerabilityModel
from mlx_lora.answer.calibration import calibrate_answer_floor
from mlx_lora.answer.decide import Decider
from mlx_lora.answer.rules import Rule
from mlx_lora.data.similarity import REFUSAL, CharScorer, answer_index, make_scorer

KB = {
    "vpn": "VPN 設定：請從 IT 入口網站下載 GlobalProtect client，閘道填 vpn.xinghe.tw 並以公司 SSO 帳號登入。",
    "printer": "各樓層事務機採 Follow-Me Print，送出列印後須在機器上刷員工證才會印出；卡紙請撥分機 2200。",
    "leave": "特休須在 eHR 系統提前 3 個工作天申請並經主管核准；未休完的特休最多可遞延 5 天。",
}
TRAIN = [
    ("VPN 怎麼設定？", "vpn"),
    ("VPN 軟體要去哪裡下載？", "vpn"),
    ("VPN 閘道位址是什麼？", "vpn"),
    ("在家怎麼連公司內網？", "vpn"),
    ("印表機卡紙要找誰？", "printer"),
    ("送出列印後怎麼拿文件？", "printer"),
    ("事務機要刷什麼才會印？", "printer"),
    ("Follow-Me Print 怎麼用？", "printer"),
    ("特休要提前幾天申請？", "leave"),
    ("特休沒休完可以遞延嗎？", "leave"),
    ("請特休要誰核准？", "leave"),
    ("特休在哪個系統申請？", "leave"),
    ("今天天氣如何？", REFUSAL),
    ("講個笑話給我聽", REFUSAL),
    ("公司股價多少？", REFUSAL),
    ("推薦一部電影", REFUSAL),
    ("日本的首都是哪裡？", REFUSAL),
]


@pytest.fixture(scope="module")
def model() -> AnswerabilityModel:
    return AnswerabilityModel(make_scorer("use")).fit(TRAIN, KB)


def test_a_question_scores_higher_with_the_doc_that_answers_it(model):
    asked = ["VPN 的 gateway 要填哪個？", "列印的文件要怎麼取出？", "特休可以延到明年用嗎？"]
    right = model.score(asked, ["vpn", "printer", "leave"])
    wrong = model.score(asked, ["printer", "leave", "vpn"])
    assert (right > wrong).all(), (right, wrong)
    off_topic = model.score(["貓為什麼喜歡紙箱？"], ["printer"])
    assert off_topic[0] < right.min()


def test_the_model_needs_embeddings_and_both_kinds_of_pairs():
    with pytest.raises(ValueError, match="sentence embedder"):
        AnswerabilityModel(CharScorer())
    with pytest.raises(ValueError, match="answerable and unanswerable"):
        AnswerabilityModel(make_scorer("use")).fit([("VPN 怎麼設定？", "vpn")], {"vpn": KB["vpn"]})


def test_floor_refuses_at_most_the_budget_of_answerable_and_only_when_it_pays():
    answerable = [True] * 100 + [False] * 4
    scores = list(np.arange(100.0)) + [-5.0, -4.0, -3.0, 50.0]
    info = calibrate_answer_floor(scores, answerable, budget=0.01)
    assert info["answer_floor"] == 1.0  # one answerable score (0.0) lies below it: 1 % of 100
    assert info["answer_floor_refused_answerable"] == 1 and info["answer_floor_refused_unanswerable"] == 3
    useless = calibrate_answer_floor(list(np.arange(100.0)) + [60.0, 70.0], [True] * 100 + [False] * 2, 0.01)
    assert useless["answer_floor"] is None and useless["answer_floor_refused_unanswerable"] == 0
    assert calibrate_answer_floor([None, 1.0], [True, False])["answer_floor"] is None


class _Route:
    """Stands in for SemanticRoute: never decides by itself; answerability scores from a table."""

    def __init__(self, floor, scores):
        self.answer_floor, self.scores = floor, scores

    def decide(self, questions):
        return [None] * len(questions)

    def answer_scores(self, questions, doc_ids):
        return [self.scores.get((q, d)) for q, d in zip(questions, doc_ids)]

    def asked_docs(self):
        return {d for _, d in self.scores}


ANSWERS = {"vpn": "依據公司規範:VPN 以 SSO 登入。", "printer": "依據公司規範:列印後刷員工證。"}
REFUSAL_TEXT = "抱歉,知識庫沒有這個資訊。"


def _decider(route, rules=()):
    char = CharScorer()
    return Decider(list(rules), ANSWERS, answer_index(char, ANSWERS, REFUSAL_TEXT), REFUSAL_TEXT, 0.8, route)


def test_a_kb_answer_whose_doc_does_not_answer_becomes_the_refusal():
    printer = Rule("printer", "printer", ["事務機"], [], priority=1)
    no_pay = Rule("no-pay", None, ["獎金"], [], action="refuse", priority=2)
    route = _Route(
        -1.0, {("事務機可以印彩色嗎？", "printer"): -3.0, ("事務機卡紙", "printer"): 2.0, ("VPN?", "vpn"): -2.0}
    )
    got = _decider(route, [printer, no_pay]).decide(
        ["事務機可以印彩色嗎？", "事務機卡紙", "VPN?", "事務機獎金"], [None, None, ANSWERS["vpn"], None]
    )
    assert got[0].source == "REFUSAL" and got[0].answer == REFUSAL_TEXT
    assert got[0].detail["by"] == "answerability" and got[0].detail["instead_of"] == "RULE_OVERRIDE"
    assert got[0].detail["rule"] == "printer" and got[0].detail["answerability"] == -3.0
    assert got[1].source == "RULE_OVERRIDE" and got[1].answer == ANSWERS["printer"]  # above the floor: kept
    assert got[2].source == "REFUSAL" and got[2].detail["instead_of"] == "KB_MATCH"  # a matched model answer too
    assert got[3].source == "REFUSAL" and got[3].detail["by"] == "rule"  # refuse rules are not re-checked
    off = _decider(_Route(None, route.scores), [printer]).decide(["事務機可以印彩色嗎？"], [None])[0]
    assert off.source == "RULE_OVERRIDE"  # no calibrated floor: the check is off


def test_a_doc_nobody_asked_about_is_not_checked():
    """A doc added to the KB after training has no training questions: the model has no evidence about it (half its
    features are closeness to the doc's questions), so its answers are not checked rather than always refused."""
    from mlx_lora.answer.route import SemanticRoute

    kb = {**KB, "wifi": "訪客 Wi-Fi:名稱 Guest-Net,密碼每週一更換,請向 1F 櫃台索取。"}
    scorer = make_scorer("use")
    route = SemanticRoute.__new__(SemanticRoute)  # only the answerability part is exercised here
    route.answerability = AnswerabilityModel(scorer).fit(TRAIN, kb)
    scores = route.answer_scores(["訪客 Wi-Fi 密碼去哪拿？", "VPN 閘道位址是什麼？"], ["wifi", "vpn"])
    assert scores[0] is None and scores[1] is not None
