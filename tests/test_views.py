"""benchmarks/grounded/views.py: the other views of a row's passages and how their decisions are pooled."""

import math

from benchmarks.grounded.views import decided, summary, views


def _view(shown, margin, favourite):
    return {"shown": shown, "margin": margin, "numbers": [0.0 if d == favourite else -5.0 for d in shown]}


def test_views_put_each_passage_first_or_alone():
    assert views(["a", "b", "c"], "orders") == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert views(["a", "b"], "singles") == [["a", "b"], ["a"], ["b"]]


def test_a_passage_cited_alone_rescues_a_refusal_and_orders_average():
    row = {"views": [_view(["a", "b"], 2.0, "a"), _view(["a"], 1.0, "a"), _view(["b"], -1.5, "b")]}
    assert decided(row, None) == (2.0, "a")
    assert decided(row, "min") == (-1.5, "b")  # "b" alone is cited: no longer a refusal, and "b" is the answer
    margin, doc = decided(row, "mean")
    assert math.isclose(margin, 0.5) and doc == "a"  # (2.0 + 1.0 - 1.5) / 3


def test_summary_counts_refusals_and_right_docs_per_pooling():
    rows = [
        {"answerable": False, "gold": None, "shown": ["a"], "views": [_view(["a"], 3.0, "a"), _view(["a"], 3.0, "a")]},
        {
            "answerable": True,
            "gold": "b",
            "shown": ["a", "b"],
            "views": [_view(["a", "b"], 1.0, "a"), _view(["b"], -2.0, "b")],
        },
    ]
    got = summary(rows, "singles")
    assert got["as shown"]["answerable_refused"] == "1/1" and got["as shown"]["right_doc_when_shown"] == "0/1"
    assert got["pooled views"]["answerable_refused"] == "0/1" and got["pooled views"]["right_doc_when_shown"] == "1/1"
    assert got["pooled views"]["unanswerable_refused"] == "1/1" and got["pooled views"]["refusal_auc"] == 1.0


def test_gold_out_replaces_the_gold_passage_with_the_next_one_found_and_counts_refusals():

    # gold_out: as a hard negative shows it (the others up, the next one found last); gold_swap: in its place.
    assert views(["g", "b"], "gold_out", "g", ["g", "b", "c", "d"]) == [["g", "b"], ["b", "c"]]
    assert views(["g", "b"], "gold_swap", "g", ["g", "b", "c", "d"]) == [["g", "b"], ["c", "b"]]
    assert views(["a", "b"], "gold_out", "g", ["a", "b", "c"]) == [["a", "b"]]  # gold not shown: nothing to take
    assert views(["g", "b"], "gold_swap", "g", ["g", "b"]) == [["g", "b"], ["b"]]  # nothing to put in its place
    rows = [
        {"answerable": False, "views": [_view(["a"], 1.0, "a")]},
        {"answerable": True, "views": [_view(["g", "b"], -3.0, "g"), _view(["c", "b"], 0.5, "c")]},
        {"answerable": True, "views": [_view(["g", "b"], -2.0, "g"), _view(["c", "b"], -1.0, "c")]},
    ]
    got = summary(rows, "gold_out")["gold out"]
    assert got == {"bias": 0.0, "gold_shown_refused": "0/2", "gold_replaced_refused": "1/2", "margin_rose": "2/2"}


def test_first_out_drops_passage_one_for_every_row_and_ranks_by_the_rise():
    assert views(["a", "b"], "first_out", None, ["a", "b", "c"]) == [["a", "b"], ["b", "c"]]
    assert views(["a"], "first_out", "a", ["a"]) == [["a"], []]  # nothing found beyond what is shown
    rows = [  # the answerable row's margin rises by 4 without [1], the unanswerable one's by 0
        {"answerable": True, "views": [_view(["g", "b"], 0.5, "g"), _view(["b", "c"], 4.5, "b")]},
        {"answerable": False, "views": [_view(["a", "b"], 0.0, "a"), _view(["b", "c"], 0.0, "b")]},
    ]
    got = summary(rows, "first_out")["first out"]
    assert got["auc_margin"] == 0.0 and got["auc_minus_rise"] == 1.0 and got["auc_margin-1.0rise"] == 1.0
    assert got["rise_answerable_q25/50/75"] == [4.0, 4.0, 4.0]
    assert got["rise_unanswerable_q25/50/75"] == [0.0, 0.0, 0.0]
    only = summary(rows[:1], "first_out")["first out"]  # a split without unanswerable rows: no quartiles, no crash
    assert only["rise_unanswerable_q25/50/75"] is None and only["auc_margin"] == 0.0
