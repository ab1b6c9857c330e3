"""The semantic route: topic classifier, thresholds, calibration on made-up rows, its place in the answer decider."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from mlx_lora.answer.build import retrieval_decisions
from mlx_lora.answer.calibration import calibrate, calibrate_route
from mlx_lora.answer.decide import Decider
from mlx_lora.answer.route import NEVER, Neighbour, SemanticRoute, neighbours_from, training_texts
from mlx_lora.answer.rules import Rule
from mlx_lora.data.classifier import TopicClassifier
from mlx_lora.data.formats import Example
from mlx_lora.data.retrieval import clauses
from mlx_lora.data.similarity import REFUSAL, CharScorer, EmbeddingScorer, answer_index

ANSWERS = {"vpn": "answer vpn", "leave": "answer leave"}
REFUSAL_TEXT = "answer sorry"


def unit(angle_deg: float) -> list[float]:
    a = np.radians(angle_deg)
    return [float(np.cos(a)), float(np.sin(a)), 0.0]


# Texts as 3-d vectors: cosine between two texts = cos(angle difference) (third axis = unlike everything).
VECTORS = {
    "vpn setup": unit(0),
    "vpn client download": unit(5),
    "vpn cannot connect": unit(10),
    "annual leave days": unit(60),
    "leave request form": unit(65),
    "weather today": unit(120),
    "tell me a joke": unit(130),
    "ask vpn": unit(2),
    "ask between": unit(40),
    "ask leave": unit(62),
    "ask nothing": [0.1, 0.0, 0.995],
    "weather tomorrow": unit(125),
    "answer vpn": unit(1),
    "answer leave": unit(61),
    "answer sorry": unit(121),
    # Answers about a doc but only 0.75 similar to its KB answer (below the 0.8 KB_MATCH threshold).
    "loose vpn": [0.75 * x for x in unit(1)[:2]] + [0.6614],
    "loose leave": [0.75 * x for x in unit(61)[:2]] + [0.6614],
}


def scorer() -> EmbeddingScorer:
    return EmbeddingScorer("fake", "fake", lambda texts: np.array([VECTORS[t] for t in texts]))


NEIGHBOURS = [
    Neighbour("vpn setup", "vpn", "question"),
    Neighbour("vpn client download", "vpn", "question"),
    Neighbour("vpn cannot connect", "vpn", "question"),
    Neighbour("annual leave days", "leave", "question"),
    Neighbour("leave request form", "leave", "question"),
    Neighbour("weather today", REFUSAL, "question"),
    Neighbour("tell me a joke", REFUSAL, "question"),
    Neighbour("answer vpn", "vpn", "kb"),
]


@pytest.fixture(scope="module")
def route() -> SemanticRoute:
    return SemanticRoute(scorer(), NEIGHBOURS)


def test_classify_names_the_doc_its_probability_and_the_refusal_probability(route):
    vpn, leave, weather, between = route.classify(["ask vpn", "ask leave", "weather tomorrow", "ask between"])
    assert route.classifier.classes == sorted(["vpn", "leave", REFUSAL])
    assert vpn.label == "vpn" and leave.label == "leave"
    assert vpn.confidence > 0.5 and vpn.refusal_p < 0.3
    assert weather.refusal_p > 0.5 and weather.refusal_p > weather.confidence  # label is the best *doc*
    assert between.confidence < vpn.confidence  # halfway between two topics: less sure
    # The detail names the class's nearest training question (not the nearer KB text "answer vpn", 1° away).
    assert vpn.neighbour.text == "vpn setup" and vpn.score == pytest.approx(np.cos(np.radians(1)))


def test_decide_refuse_retrieve_model(route):
    route.high, route.low, route.refuse_at = 0.5, 0.3, 0.5
    try:
        got = route.decide(["ask vpn", "ask nothing", "weather tomorrow", "ask between"])
        assert [d.kind for d in got[:3]] == ["retrieve", "refuse", "retrieve"]
        assert got[0].label == "vpn" and got[2].label == REFUSAL and got[2].confidence == got[2].refusal_p
        assert got[2].neighbour.label == REFUSAL
        route.high = 0.999  # nothing is that sure: the doc questions go to the model
        assert [d.kind for d in route.decide(["ask vpn", "ask leave"])] == ["model", "model"]
    finally:
        route.high, route.low, route.refuse_at = NEVER, 0.0, NEVER
    assert {d.kind for d in route.decide(["ask vpn", "ask nothing", "weather tomorrow"])} == {"model"}  # uncalibrated


def test_kb_clauses_are_extra_examples_of_their_doc():
    """The route learns from the clauses the retriever indexes (one definition of a clause)."""
    assert clauses("VPN 設定：請下載 client，以 SSO 登入；連不上時重開機。") == [
        "VPN 設定",
        "請下載 client",
        "以 SSO 登入",
        "連不上時重開機",
    ]
    assert clauses("短，也短。") == []  # pieces under 4 characters say too little
    # A time is not a clause boundary; an ASCII colon after a label is.
    assert clauses("可於 8:00–10:00 之間打卡上班，每日須滿 9 小時") == [
        "可於 8:00–10:00 之間打卡上班",
        "每日須滿 9 小時",
    ]
    assert clauses("VPN 設定:下載 client,以 SSO 登入") == ["VPN 設定", "下載 client", "以 SSO 登入"]
    texts, labels = training_texts([Neighbour("q", "vpn", "question"), Neighbour("甲乙丙丁，戊己庚辛", "leave", "kb")])
    assert texts == ["q", "甲乙丙丁，戊己庚辛", "甲乙丙丁", "戊己庚辛"] and labels == ["vpn", "leave", "leave", "leave"]


def test_classifier_on_char_ngrams_alone():
    # The character fallback scorer has no embeddings: TF-IDF n-grams still tell 請假 from VPN.
    clf = TopicClassifier(CharScorer()).fit(
        ["VPN 連不上", "VPN 怎麼設定", "請假怎麼請", "病假要證明嗎", "今天天氣"],
        ["vpn", "vpn", "leave", "leave", REFUSAL],
    )
    proba = clf.predict_proba(["VPN 設定", "請病假"])
    assert [clf.classes[int(k)] for k in proba.argmax(axis=1)] == ["vpn", "leave"]
    assert clf.predict_proba([]).shape == (0, 3)


def test_route_without_scikit_learn_only_refuses_below_low(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)  # import fails as if not installed
    route = SemanticRoute(scorer(), NEIGHBOURS, high=0.0, low=0.3)
    assert route.classifier is None and "scikit-learn" in route.missing
    got = route.decide(["ask vpn", "ask nothing"])
    assert got[0].label == "vpn" and got[0].confidence == 0.0 and got[1].kind == "refuse"
    assert [n.text for n, _ in route.nearest(["ask vpn"], kinds=("question",))] == ["vpn setup"]


def test_calibrate_floor_then_best_expected_accuracy():
    conf = [0.9, 0.9, 0.8, 0.6, 0.5, 0.3, 0.2]
    correct = [True, True, True, False, True, False, False]
    scores = [0.9, 0.9, 0.8, 0.7, 0.7, 0.6, 0.2]
    answerable = [True, True, True, True, True, False, False]
    info = calibrate(conf, correct, scores, answerable, precision=0.95, model_accuracy=0.5)
    # Below 0.7 only unanswerable rows (0.6, 0.2); 0.7 itself is answerable: low midway 0.6–0.7.
    assert info["low"] == pytest.approx(0.65)
    # Kept rows all answerable: refusing never pays. Routing all (4 right) ties with routing ≥ 0.8 (3 right +
    # 0.5 + 0.5 for the two left to the model); ties go to the lower threshold: the lowest value itself.
    assert info["refuse_at"] == NEVER and info["high"] == pytest.approx(0.5)
    assert (info["retrieved"], info["refused"], info["to_model"]) == (5, 2, 0)
    assert info["retrieved_correct"] == 4 and info["refused_unanswerable"] == 2


ROWS = dict(  # 0–1 answerable and right; 2 answerable, wrong doc; 3–6 unanswerable
    confidence=[0.9, 0.8, 0.4, 0.5, 0.3, 0.6, 0.6],
    correct=[True, True, False, False, False, False, False],
    scores=[0.9] * 7,
    answerable=[True, True, True, False, False, False, False],
    refusal_p=[0.05, 0.1, 0.5, 0.6, 0.9, 0.45, 0.4],
)


def test_calibrate_refusal_threshold_and_the_retrieval_budget():
    free = calibrate(**ROWS)
    # Refusing from P(REFUSAL) 0.25 up catches all four unanswerable rows at the price of answerable row 2.
    assert free["low"] == 0.0 and free["refuse_at"] == pytest.approx(0.25) and free["high"] <= 0.8
    assert free["refused"] == 5 and free["refused_unanswerable"] == 4 and free["retrieved"] == 2
    # The retrieval baseline refused no answerable valid row: the route may not refuse one either.
    held = calibrate(**ROWS, refusal_budget=0)
    assert held["refuse_at"] == pytest.approx(0.55) and held["high"] == pytest.approx(0.7)
    assert held["refused"] == 2 and held["to_model"] == 3 and held["retrieved"] == 2


def test_calibrate_when_nothing_is_reliable():
    info = calibrate([0.9, 0.8], [False, False], [0.9, 0.8], [True, True], refusal_p=[0.0, 0.1], refusal_budget=0)
    assert info["high"] == NEVER and info["refuse_at"] == NEVER and info["low"] == 0.0 and info["to_model"] == 2


def test_calibrate_with_no_rows_left_never_retrieves_or_refuses():
    info = calibrate([], [], [], [], refusal_p=[], refusal_budget=3)  # no labelled questions at all
    assert (info["high"], info["low"], info["refuse_at"], info["rows"]) == (NEVER, 0.0, NEVER, 0)


def test_calibrate_is_right_at_least_as_often_as_the_model_alone():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, 200)
    correct = rng.uniform(size=200) < conf  # more confident → more often right
    answerable = rng.uniform(size=200) < 0.8
    refusal_p = np.where(answerable, rng.uniform(0, 0.5, 200), rng.uniform(0.3, 1.0, 200))
    scores = rng.uniform(0.5, 1, 200)
    for m in (0.3, 0.7):
        info = calibrate(conf, correct, scores, answerable, model_accuracy=m, refusal_p=refusal_p)
        refused = refusal_p >= info["refuse_at"]
        routed = ~refused & (conf >= info["high"])
        gain = (refused & ~answerable).sum() + (routed & correct).sum() + m * (~refused & ~routed).sum()
        assert gain >= m * 200 and gain >= correct.sum() - 1e-9  # beats "all to the model" and "no refusals"


def chat(question, doc_id):
    answer = REFUSAL_TEXT if doc_id is None else ANSWERS[doc_id]
    return Example(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        meta={"doc_id": doc_id, "answerable": doc_id is not None},
    )


def test_neighbours_from_examples(route):
    s = scorer()
    index = answer_index(s, ANSWERS, REFUSAL_TEXT)
    train = [
        chat("vpn setup", "vpn"),
        chat("vpn setup", "vpn"),
        chat("annual leave days", "leave"),
        chat("weather today", None),
    ]
    neighbours = neighbours_from(train, {"vpn": "answer vpn"}, index)
    assert [(n.text, n.label, n.kind) for n in neighbours] == [
        ("vpn setup", "vpn", "question"),
        ("annual leave days", "leave", "question"),
        ("weather today", REFUSAL, "question"),
        ("answer vpn", "vpn", "kb"),
    ]


def test_calibrate_route_out_of_fold_on_train_and_valid_questions(route):
    index = answer_index(scorer(), ANSWERS, REFUSAL_TEXT)
    examples = [
        chat("vpn setup", "vpn"),
        chat("vpn client download", "vpn"),
        chat("vpn cannot connect", "vpn"),
        chat("ask vpn", "vpn"),
        chat("annual leave days", "leave"),
        chat("leave request form", "leave"),
        chat("ask leave", "leave"),
        chat("weather today", None),
        chat("tell me a joke", None),
        chat("weather tomorrow", None),
        chat("ask nothing", None),
        chat("vpn setup", "vpn"),
    ]
    try:
        info = calibrate_route(route, examples, index, folds=3)
        assert info["rows"] == 11  # distinct questions, each predicted by a fold route that never saw it
        assert info["method"].startswith("3-fold")
        assert (route.high, route.low, route.refuse_at) == (info["high"], info["low"], info["refuse_at"])
        kinds = dict(
            zip(
                ["ask vpn", "ask nothing", "weather tomorrow"],
                [(d.kind, d.label) for d in route.decide(["ask vpn", "ask nothing", "weather tomorrow"])],
            )
        )
        assert kinds["ask vpn"] == ("retrieve", "vpn")
        assert all(kinds[q][0] == "refuse" or kinds[q][1] == REFUSAL for q in ("ask nothing", "weather tomorrow"))
        again = calibrate_route(route, examples, index, folds=3)
        assert again == info  # the folds are seeded
    finally:
        route.high, route.low, route.refuse_at, route.answer_floor = NEVER, 0.0, NEVER, None


def test_route_in_the_decider_and_rule_precedence(route):
    s = scorer()
    index = answer_index(s, ANSWERS, REFUSAL_TEXT)
    route.high, route.low, route.refuse_at = 0.5, 0.3, 0.5
    try:
        rule = Rule("leave-rule", "leave", ["vpn"], [], priority=1)
        plain = Decider([], ANSWERS, index, REFUSAL_TEXT, 0.8, route)
        route.high = max(d.confidence for d in route.classify(["ask between"])) + 1e-6  # "ask between" → model
        got = plain.decide(
            ["ask vpn", "ask nothing", "ask between", "weather tomorrow"],
            ["answer leave", "answer vpn", "answer leave", "answer vpn"],
        )
        assert got[0].source == "KB_RETRIEVAL" and got[0].answer == "answer vpn"
        assert got[0].detail["neighbour"] == "vpn setup" and got[0].detail["vote"] == "vpn"
        assert got[1].source == "REFUSAL" and got[1].detail["by"] == "route" and got[1].answer == REFUSAL_TEXT
        assert got[2].source == "KB_MATCH" and got[2].detail["route"] == "model"  # band: the model's answer, checked
        # In the band, a loose answer about the doc the route voted for gives way to that doc's KB text...
        vote = got[2].detail["vote"]
        loose = plain.decide(["ask between"], [f"loose {vote}"])[0]
        assert loose.source == "KB_RETRIEVAL" and loose.answer == ANSWERS[vote]
        assert loose.detail["by"] == "route and model agree"
        # ...and one about another doc stays the model's own.
        other = {"leave": "loose vpn", "vpn": "loose leave"}[vote]
        assert plain.decide(["ask between"], [other])[0].source == "MODEL_GENERATED"
        assert got[3].source == "REFUSAL" and got[3].detail["vote"] == REFUSAL  # refused by P(REFUSAL)
        with_rule = Decider([rule], ANSWERS, index, REFUSAL_TEXT, 0.8, route)
        d = with_rule.decide(["ask vpn"], ["answer vpn"])[0]
        assert d.source == "RULE_OVERRIDE" and d.answer == "answer leave"  # an explicit rule beats the route...
        weather_rule = Rule("weather-is-leave", "leave", ["weather"], [], priority=1)
        both = Decider([weather_rule], ANSWERS, index, REFUSAL_TEXT, 0.8, route)
        d = both.decide(["weather tomorrow"], ["answer vpn"])[0]
        # ...except when the route is confident the KB cannot answer: a keyword names a topic, not a question.
        assert d.source == "REFUSAL" and d.answer == REFUSAL_TEXT
        assert d.detail["overrules"] == "weather-is-leave" and d.detail["by"] == "route"
        route.refuse_at = NEVER
        assert both.decide(["weather tomorrow"], ["answer vpn"])[0].source == "RULE_OVERRIDE"
    finally:
        route.high, route.low, route.refuse_at = NEVER, 0.0, NEVER


def test_retrieval_baseline_takes_the_nearest_training_question(route):
    # A KB text nearer than any question (1° from "ask vpn") must not count: the baseline uses questions only,
    # and never the classifier.
    got = retrieval_decisions(route, ["ask vpn", "ask between", "weather tomorrow"], ANSWERS, REFUSAL_TEXT)
    assert [d.answer for d in got] == ["answer vpn", "answer leave", REFUSAL_TEXT]
    assert all(d.source == "KB_RETRIEVAL" for d in got) and got[0].detail["neighbour"] == "vpn setup"


def test_describe_names_the_classifier(route):
    info = route.describe()
    assert info["classes"] == 3 and info["training_questions"] == 7 and info["kb_texts"] == 1
    assert "logistic regression" in info["classifier"] and "embeddings" in info["classifier"]
