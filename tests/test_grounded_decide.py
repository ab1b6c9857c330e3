"""The decider and grounded answers: a cited reproduced passage is the model's, a route refusal yields to new docs."""

from __future__ import annotations

from conftest import REFUSAL

from mlx_lora.answer.decide import Decider
from mlx_lora.answer.route import Neighbour, RouteDecision
from mlx_lora.data.similarity import REFUSAL as REFUSAL_LABEL
from mlx_lora.data.similarity import CharScorer, answer_index


def test_the_decider_credits_a_cited_reproduced_passage_to_the_model():
    scorer = CharScorer()
    answers = {"vpn": "依據公司規範:VPN 以 SSO 登入。", "leave": "依據公司規範:請假三天前申請。"}
    decider = Decider([], answers, answer_index(scorer, answers, REFUSAL), REFUSAL, 0.8, None, model_first=True)
    got = decider.decide(
        ["VPN?", "請假?", "天氣?", "VPN??"],
        [f"[vpn] {answers['vpn']}", f"[leave] {answers['leave']}", REFUSAL, "[ghost] 依據公司規範:VPN 以 SSO 登入。"],
    )
    assert [(d.source, d.detail.get("doc_id"), d.detail.get("by")) for d in got[:3]] == [
        ("KB_MATCH", "vpn", "model"),
        ("KB_MATCH", "leave", "model"),
        ("REFUSAL", None, "model"),
    ]
    assert got[0].answer == answers["vpn"] and got[0].detail["cited"] == "vpn"
    # A citation of no KB doc is no citation: the text alone is checked (here it still reproduces vpn).
    assert got[3].detail.get("doc_id") == "vpn" and "cited" not in got[3].detail


class _RefusingRoute:
    """A route sure that every question is unanswerable, trained on questions about `asked` docs only."""

    low, refuse_at, answer_floor = 0.0, 0.5, None

    def __init__(self, asked):
        self.asked = set(asked)

    def asked_docs(self):
        return self.asked

    def decide(self, questions):
        label = REFUSAL_LABEL  # the route's refusal class, not the refusal's text
        return [RouteDecision("retrieve", 0.9, Neighbour("q", label, "question"), label, 0.1, 0.9) for _ in questions]


def test_the_route_refusal_yields_to_a_citation_of_a_doc_it_never_saw_asked_about():
    scorer = CharScorer()
    answers = {"vpn": "依據公司規範:VPN 以 SSO 登入。", "wifi": "依據公司規範:訪客 Wi-Fi 每週一換密碼。"}
    index = answer_index(scorer, answers, REFUSAL)
    questions, cited = ["Wi-Fi 密碼?", "VPN?"], [f"[wifi] {answers['wifi']}", f"[vpn] {answers['vpn']}"]
    added = Decider([], answers, index, REFUSAL, 0.8, _RefusingRoute({"vpn"}), model_first=True)
    got = added.decide(questions, cited)
    # wifi was added to the KB after training: the route cannot judge it, the model's citation stands.
    assert (got[0].source, got[0].detail["by"], got[0].detail["doc_id"]) == ("KB_MATCH", "model", "wifi")
    assert got[0].detail["route_refusal_set_aside"] and got[0].answer == answers["wifi"]
    assert (got[1].source, got[1].detail["by"]) == ("REFUSAL", "route")  # vpn has training questions
    # So a route refusal can no longer be settled before the model answers (serve must wait for it)...
    assert added.settled(questions) == [None, None]
    # ...while with every doc asked about, it settles, exactly as decide() decides it.
    known = Decider([], answers, index, REFUSAL, 0.8, _RefusingRoute({"vpn", "wifi"}), model_first=True)
    early = known.settled(questions)
    assert [(d.source, d.detail["by"]) for d in early] == [("REFUSAL", "route")] * 2
    assert [(d.answer, d.source) for d in known.decide(questions, cited)] == [(d.answer, d.source) for d in early]
    # Closed-book deciders are unchanged: the route's refusal settles whatever the KB holds.
    closed = Decider([], answers, index, REFUSAL, 0.8, _RefusingRoute({"vpn"}))
    assert [d.source for d in closed.settled(questions)] == ["REFUSAL", "REFUSAL"]
