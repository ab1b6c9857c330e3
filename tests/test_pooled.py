"""benchmarks/grounded: pooled.py pools out-of-fold figures and sums the guards; redecide.py reads saved answers."""

import json

from benchmarks.grounded.pooled import guards, pooled


def _row(answerable: bool, refused: bool, similarity: float, doc: str = "vpn", predicted: str = "vpn") -> dict:
    return {
        "answerable": answerable,
        "refused": refused,
        "similarity": similarity,
        "expected_doc": doc if answerable else "REFUSAL",
        "predicted_doc": predicted,
    }


def _report(path, rows, route):
    report = {
        "variants": {"tuned": {"rows": rows}},
        "meta": {"guards": {"tuned_rules": {"route": route}}},
    }
    path.write_text(json.dumps(report), encoding="utf-8")
    return str(path)


def test_pooled_counts_every_held_row_and_sums_the_guards(tmp_path):
    a = _report(
        tmp_path / "a.json",
        [_row(True, False, 100.0), _row(False, True, 100.0)],
        {"overruled": 2, "guard_right_model_wrong": 1, "model_right_guard_wrong": 1},
    )
    b = _report(
        tmp_path / "b.json",
        [_row(True, True, 40.0, predicted="REFUSAL"), _row(True, False, 60.0, predicted="leave")],
        {"overruled": 1, "guard_right_model_wrong": 0, "model_right_guard_wrong": 1},
    )
    got = pooled([a, b])["tuned"]
    # Pooled over rows, not averaged over folds: (100 + 100 + 40 + 60) / 4.
    assert got["mean_similarity"] == 75.0 and got["rows"] == 4
    assert got["unanswerable_refused"] == "1/1" and got["answerable_refused"] == "1/3" and got["right_doc"] == "1/3"
    route = guards([a, b])["tuned_rules"]["route"]
    assert route == {"overruled": 3, "guard_right_model_wrong": 1, "model_right_guard_wrong": 2}


def test_redecide_reads_the_tuned_answers_in_question_order(tmp_path):
    from benchmarks.grounded.redecide import saved_answers

    (tmp_path / "ev").mkdir()
    records = [
        {"variant": "tuned_rules", "question": "q1", "model_answer": "[vpn] a"},
        {"variant": "base_rules", "question": "q1", "model_answer": "base"},
        {"variant": "tuned_rules", "question": "q2", "model_answer": "抱歉"},
    ]
    (tmp_path / "ev" / "audit.jsonl").write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    assert saved_answers(tmp_path) == ["[vpn] a", "抱歉"]
