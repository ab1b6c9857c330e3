"""The semantic route: k-NN vote, thresholds, calibration on made-up neighbours, and its place in the rule layer."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_lora.evaluate_run import retrieval_decisions
from mlx_lora.formats import Example
from mlx_lora.route import Neighbour, SemanticRoute, calibrate, calibrate_route, neighbours_from
from mlx_lora.rules import RuleLayer, Rule
from mlx_lora.similarity import REFUSAL, EmbeddingScorer, answer_index

ANSWERS = {"vpn": "answer vpn", "leave": "answer leave"}
REFUSAL_TEXT = "answer sorry"


def unit(angle_deg: float) -> list[float]:
    a = np.radians(angle_deg)
    return [float(np.cos(a)), float(np.sin(a)), 0.0]


# Texts as 3-d vectors: cosine between two texts = cos(angle difference) (third axis = unlike everything).
VECTORS = {
    "vpn q1": unit(0), "vpn q2": unit(5), "vpn q3": unit(10),
    "leave q1": unit(60), "leave q2": unit(65),
    "weather q": unit(120),
    "ask vpn": unit(2), "ask between": unit(40), "ask leave": unit(62), "ask nothing": [0.1, 0.0, 0.995],
    "answer vpn": unit(1), "answer leave": unit(61), "answer sorry": unit(121),
}


def scorer() -> EmbeddingScorer:
    return EmbeddingScorer("fake", "fake", lambda texts: np.array([VECTORS[t] for t in texts]))


NEIGHBOURS = [Neighbour("vpn q1", "vpn", "question"), Neighbour("vpn q2", "vpn", "question"),
              Neighbour("vpn q3", "vpn", "question"), Neighbour("leave q1", "leave", "question"),
              Neighbour("leave q2", "leave", "question"), Neighbour("weather q", REFUSAL, "question")]


def test_vote_label_confidence_and_nearest():
    route = SemanticRoute(scorer(), NEIGHBOURS, k=3)
    vpn, between = route.vote(["ask vpn", "ask between"])
    assert vpn.label == "vpn" and vpn.confidence == pytest.approx(1.0)
    assert vpn.neighbour.text == "vpn q1" and vpn.score == pytest.approx(np.cos(np.radians(2)))
    # 40°: the 3 nearest are leave q1 (20°), leave q2 (25°), vpn q3 (30°).
    assert between.label == "leave" and 0.5 < between.confidence < 0.8


def test_decide_retrieve_refuse_model():
    route = SemanticRoute(scorer(), NEIGHBOURS, high=0.9, low=0.3, k=3)
    kinds = [d.kind for d in route.decide(["ask vpn", "ask between", "ask nothing"])]
    assert kinds == ["retrieve", "model", "refuse"]
    uncalibrated = SemanticRoute(scorer(), NEIGHBOURS)
    assert {d.kind for d in uncalibrated.decide(["ask vpn", "ask nothing"])} == {"model"}


def test_calibrate_on_made_up_neighbours():
    conf = [1.0, 1.0, 0.9, 0.8, 0.6, 0.5, 0.4]
    correct = [True, True, True, True, False, False, False]
    scores = [0.9, 0.9, 0.8, 0.8, 0.5, 0.6, 0.2]
    answerable = [True, True, True, True, False, True, False]
    info = calibrate(conf, correct, scores, answerable, precision=0.95)
    # Below 0.6 only unanswerable rows (0.5, 0.2); 0.6 itself is answerable: low midway 0.5–0.6.
    assert info["low"] == pytest.approx(0.55)
    # Of the rest, ≥ 0.8 is the lowest confidence whose upper set is all right: midway to 0.5 → 0.65.
    assert info["high"] == pytest.approx(0.65)
    assert (info["retrieved"], info["refused"], info["to_model"]) == (4, 2, 1)
    assert info["retrieved_correct"] == 4 and info["refused_unanswerable"] == 2


def test_calibrate_when_nothing_is_reliable():
    info = calibrate([0.9, 0.8], [False, False], [0.9, 0.8], [True, True])
    assert info["high"] == 1.01 and info["low"] == 0.0 and info["to_model"] == 2


def test_calibrate_precision_target_is_honoured():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, 200)
    correct = rng.uniform(size=200) < conf  # more confident → more often right
    scores = rng.uniform(0, 1, 200)
    answerable = rng.uniform(size=200) < 0.8
    for target in (0.8, 0.9):
        info = calibrate(conf, correct, scores, answerable, precision=target)
        chosen = (conf >= info["high"]) & (scores >= info["low"])
        refused = scores < info["low"]
        assert not refused.any() or (~answerable[refused]).mean() >= target
        assert chosen.any() and correct[chosen].mean() >= target


def chat(question, doc_id):
    answer = REFUSAL_TEXT if doc_id is None else ANSWERS[doc_id]
    return Example([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                   meta={"doc_id": doc_id, "answerable": doc_id is not None})


def test_neighbours_from_examples_and_calibrate_route():
    s = scorer()
    index = answer_index(s, ANSWERS, REFUSAL_TEXT)
    train = [chat("vpn q1", "vpn"), chat("vpn q1", "vpn"), chat("leave q1", "leave"), chat("weather q", None)]
    neighbours = neighbours_from(train, {"vpn": "answer vpn"}, index)
    assert [(n.text, n.label, n.kind) for n in neighbours] == [
        ("vpn q1", "vpn", "question"), ("leave q1", "leave", "question"), ("weather q", REFUSAL, "question"),
        ("answer vpn", "vpn", "kb")]
    route = SemanticRoute(s, NEIGHBOURS, k=3)
    valid = [chat("ask vpn", "vpn"), chat("ask leave", "leave"), chat("ask between", "vpn"), chat("ask nothing", None)]
    info = calibrate_route(route, valid, index)
    assert route.high == info["high"] and route.low == info["low"]
    decided = {q: d.kind for q, d in zip(["ask vpn", "ask leave", "ask between", "ask nothing"],
                                         route.decide(["ask vpn", "ask leave", "ask between", "ask nothing"]))}
    assert decided["ask vpn"] == decided["ask leave"] == "retrieve"
    assert decided["ask between"] == "model"  # its vote (leave) was wrong on valid: left to the model
    assert decided["ask nothing"] == "refuse"


def test_route_in_the_rule_layer_and_rule_precedence():
    s = scorer()
    index = answer_index(s, ANSWERS, REFUSAL_TEXT)
    route = SemanticRoute(s, NEIGHBOURS, high=0.9, low=0.3, k=3)
    rule = Rule("leave-rule", "leave", ["vpn"], [], priority=1)
    plain = RuleLayer([], ANSWERS, index, REFUSAL_TEXT, 0.8, route)
    got = plain.decide(["ask vpn", "ask nothing", "ask between"], ["answer leave", "answer vpn", "answer leave"])
    assert got[0].source == "KB_RETRIEVAL" and got[0].answer == "answer vpn"
    assert got[0].detail["neighbour"] == "vpn q1" and got[0].detail["score"] == pytest.approx(np.cos(np.radians(2)),
                                                                                            abs=1e-4)
    assert got[1].source == "REFUSAL" and got[1].detail["by"] == "route" and got[1].answer == REFUSAL_TEXT
    assert got[2].source == "KB_MATCH" and got[2].detail["route"] == "model"  # band: the model's answer, checked
    with_rule = RuleLayer([rule], ANSWERS, index, REFUSAL_TEXT, 0.8, route)
    d = with_rule.decide(["ask vpn"], ["answer vpn"])[0]
    assert d.source == "RULE_OVERRIDE" and d.answer == "answer leave"  # an explicit rule beats the route


def test_retrieval_baseline_takes_the_nearest_training_question():
    # A KB text nearer than any question (1° from "ask vpn") must not count: the baseline uses questions only.
    route = SemanticRoute(scorer(), NEIGHBOURS + [Neighbour("answer vpn", "leave", "kb")])
    got = retrieval_decisions(route, ["ask vpn", "ask between"], ANSWERS, REFUSAL_TEXT)
    assert [d.answer for d in got] == ["answer vpn", "answer leave"]
    assert all(d.source == "KB_RETRIEVAL" for d in got) and got[0].detail["neighbour"] == "vpn q1"
