"""Grounded rows: passages retrieved (own question left out), RAFT oracle/oracle-free rows, citations, attribution."""

from __future__ import annotations

import json

import pytest

from mlx_lora.answer.decide import Decider
from mlx_lora.answer.route import Neighbour, RouteDecision
from mlx_lora.core.config import DataConfig
from mlx_lora.data.dataset import build_splits, ground_splits, write_splits
from mlx_lora.data.formats import read_examples
from mlx_lora.data.grounded import (
    fit_passages,
    fit_rows,
    own_citation_removed,
    parse_citation,
    reground,
    user_turn,
    with_doc_id,
)
from mlx_lora.data.kb import load_kb
from mlx_lora.data.questions import load_questions
from mlx_lora.data.retrieval import PassageIndex
from mlx_lora.data.similarity import REFUSAL as REFUSAL_LABEL
from mlx_lora.data.similarity import CharScorer, answer_index

REFUSAL = "抱歉,知識庫沒有這個資訊。"


def grounded(tiny_kb, tiny_questions, tmp_path, **data):
    data = {"passages": 2, **data}
    cfg = DataConfig(kb=str(tiny_kb), questions=str(tiny_questions), dir=str(tmp_path / "out"), mode="grounded", **data)
    kb = load_kb(tiny_kb)
    splits = build_splits(kb, load_questions(tiny_questions, kb), cfg)
    ground_splits(splits, kb, REFUSAL, cfg, CharScorer())
    write_splits(splits, cfg.dir, cfg)
    rows = {s: [json.loads(x) for x in (tmp_path / "out" / f"{s}.jsonl").read_text().splitlines()] for s in splits}
    return cfg, kb, splits, rows


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


def test_a_train_row_never_retrieves_its_own_question(tiny_kb, tiny_questions):
    kb = {d: doc.text for d, doc in load_kb(tiny_kb).items()}
    index = PassageIndex(CharScorer(), kb, [("VPN 連不上", "vpn"), ("請假", "leave")])
    own = index.doc_scores(["VPN 連不上"])[0]
    left_out = index.doc_scores(["VPN 連不上"], leave_out_own=True)[0]
    without = PassageIndex(CharScorer(), kb, [("請假", "leave")]).doc_scores(["VPN 連不上"])[0]
    vpn = list(kb).index("vpn")
    assert own[vpn] > left_out[vpn] + 0.3  # found itself; left out, only the doc's own text finds it
    assert left_out == pytest.approx(without)  # exactly as if the question had never been asked


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


def test_questions_about_a_doc_deleted_from_the_kb_are_left_out_of_the_index():
    index = PassageIndex(CharScorer(), {"a": "甲"}, [("問題", "deleted-doc")])
    assert index.labels == ["a"]  # a train question whose doc is gone finds nothing, and breaks nothing
    assert index.search(["問題"], 3) == [[("a", pytest.approx(index.doc_scores(["問題"])[0, 0]))]]


def _chars(example) -> int:
    """A stand-in token count: characters of the whole row (every turn)."""
    return sum(len(m["content"]) for m in example.messages) if example.messages else len(example.text)


@pytest.mark.parametrize("fmt", ["messages", "text"])
def test_an_overlong_row_shows_fewer_passages_never_a_shorter_answer(tiny_kb, tiny_questions, tmp_path, fmt):
    cfg, kb, _, _ = grounded(tiny_kb, tiny_questions, tmp_path, oracle_rate=1.0, passages=3, format=fmt, cite="doc_id")
    texts = {d: doc.text for d, doc in kb.items()}
    rows = [e for e in read_examples(tmp_path / "out" / "train.jsonl") if e.meta["answerable"]]
    row = max(rows, key=_chars)
    gold, ids = row.meta["doc_id"], row.meta["passages"]
    assert gold in ids and len(ids) == 3
    answer = row.answer if fmt == "messages" else row.text[row.text.rindex("[" + gold + "]") :]

    def check(fitted, limit):
        assert _chars(fitted) <= limit
        whole = fitted.answer if fmt == "messages" else fitted.text
        assert answer in whole  # the answer is never touched
        assert fitted.meta["passages_shortened"] and gold in fitted.meta["passages"]

    # One passage too many: the lowest-ranked non-gold one goes, the others are shown whole.
    drop = max(i for i, d in enumerate(ids) if d != gold)
    kept = [d for i, d in enumerate(ids) if i != drop]
    limit = _chars(row) - len(texts[ids[drop]]) - 1
    fitted, what = fit_passages(row, texts, cfg, _chars, limit)
    assert what == "shortened" and fitted.meta["passages"] == kept
    check(fitted, limit)
    # Room for less than the gold passage alone: it is cut at the end, marked "…", the question still last.
    limit = _chars(row) - sum(len(texts[d]) for d in ids) + 3
    fitted, what = fit_passages(row, texts, cfg, _chars, limit)
    assert what == "shortened" and fitted.meta["passages"] == [gold]
    check(fitted, limit)
    turn = fitted.messages[-2]["content"] if fmt == "messages" else fitted.text
    assert "…" in turn and row.question in turn
    # No room even for the question: left as it was (the usual cut from the end, warned about by training).
    assert fit_passages(row, texts, cfg, _chars, 5) == (row, "kept")
    # A row that fits, or whose passages today's KB no longer has, is left alone.
    assert fit_passages(row, texts, cfg, _chars, 10**6) == (row, "fits")
    assert fit_passages(row, {d: t + "改" for d, t in texts.items()}, cfg, _chars, limit) == (row, "kept")


def test_fit_rows_uses_the_tokenizer_and_warns_once(tiny_kb, tiny_questions, tmp_path, qwen_tokenizer_dir):
    from mlx_lora.data.formats import encode_example, token_count
    from mlx_lora.data.render import ChatTokenizer

    cfg, _, _, _ = grounded(tiny_kb, tiny_questions, tmp_path, oracle_rate=1.0, passages=3)
    tokenizer = ChatTokenizer.from_dir(qwen_tokenizer_dir)
    rows = read_examples(tmp_path / "out" / "train.jsonl")
    lengths = sorted(encode_example(tokenizer, e, 10**9).full_length for e in rows)
    limit = lengths[len(lengths) // 2]  # half the rows are over
    fitted, warnings = fit_rows(rows, token_count(tokenizer), limit, cfg, "train.jsonl")
    over = sum(n > limit for n in lengths)
    assert len(warnings) == 1 and f"{over} of {len(rows)} grounded rows" in warnings[0]
    for before, after in zip(rows, fitted):
        # The same answer, its numbered citation following the gold passage if one before it was dropped.
        assert own_citation_removed(after) == own_citation_removed(before)
        assert parse_citation(after.answer)[0] == parse_citation(before.answer)[0] or after.meta["passages_shortened"]
        encoded = encode_example(tokenizer, after, limit)
        assert not encoded.truncated  # every row now fits whole


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


@pytest.mark.parametrize("fmt", ["messages", "text"])
def test_a_numbered_citation_follows_its_passage_when_one_before_it_is_dropped(tiny_kb, tiny_questions, tmp_path, fmt):
    cfg, kb, _, _ = grounded(
        tiny_kb, tiny_questions, tmp_path, oracle_rate=1.0, passages=3, format=fmt, cite="number", shuffle_passages=True
    )
    texts = {d: doc.text for d, doc in kb.items()}
    rows = [e for e in read_examples(tmp_path / "out" / "train.jsonl") if e.meta["answerable"]]
    row = next(e for e in rows if e.meta["passages"][-1] == e.meta["doc_id"])  # gold shown last, as [3]
    ids, gold = row.meta["passages"], row.meta["doc_id"]
    assert row.answer.startswith("[3] ")
    fitted, what = fit_passages(row, texts, cfg, _chars, _chars(row) - len(texts[ids[1]]) - 1)
    assert what == "shortened" and fitted.meta["passages"] == [ids[0], gold]
    assert fitted.answer == "[2] " + row.answer[4:]  # the same answer, now citing the gold passage's new place
    if fmt == "text":
        assert fitted.text.rstrip().endswith("[2] " + row.answer[4:] + "<|im_end|>")
        assert "[3] " + row.answer[4:] not in fitted.text


def test_training_refuses_rows_built_with_another_citation_style(tiny_kb, tiny_questions, tmp_path):
    from mlx_lora.core.errors import UserError

    cfg = grounded(tiny_kb, tiny_questions, tmp_path, cite="number")[0]
    rows = read_examples(tmp_path / "out" / "train.jsonl")
    assert fit_rows(rows, _chars, 10**6, cfg, "train.jsonl")[0] == rows
    other = DataConfig(kb=cfg.kb, mode="grounded", cite="doc_id")
    with pytest.raises(UserError, match=r"train.jsonl:1: this row was built with data.cite=number .* data.cite=doc_id"):
        fit_rows(rows, _chars, 10**6, other, "train.jsonl")
    # Rows built before data.cite existed cited doc ids: a numbered config refuses them too.
    for row in rows:
        del row.meta["cite"]
    with pytest.raises(UserError, match=r"built with data.cite=doc_id but the config says data.cite=number"):
        fit_rows(rows, _chars, 10**6, cfg, "train.jsonl")


def test_eval_reads_numbered_citations_as_the_doc_of_that_rows_passage(tiny_kb, tiny_questions, tmp_path):
    from mlx_lora.core.config import Config
    from mlx_lora.evaluation.run import evaluate_run

    data_cfg = grounded(tiny_kb, tiny_questions, tmp_path, cite="number", passages=3)[0]
    out = tmp_path / "out"
    test = read_examples(out / "test.jsonl")
    cfg = Config(data=data_cfg)
    cfg.eval.embedder = "char"
    cited = [e for e in test if e.meta["answerable"] and e.meta["gold_in_passages"]]
    assert cited and all(e.answer.startswith(f"[{e.meta['passages'].index(e.meta['doc_id']) + 1}] ") for e in cited)
    report = evaluate_run(
        cfg, None, "unused-adapter", out / "test.jsonl", out / "valid.jsonl", out / "train.jsonl", tiny_kb,
        tmp_path / "report", rules_path=None, answers={"tuned": [e.answer for e in test]},
        variants=("tuned", "tuned_rules"), progress=False,
    )  # fmt: skip
    assert report["summary"]["tuned"]["mean_similarity"] == 100.0  # a perfect model, citations and all
    audit = {a["question"]: a for a in map(json.loads, (tmp_path / "report" / "audit.jsonl").read_text().splitlines())}
    for e in cited:
        record = audit[e.question]
        assert record["model_answer"].startswith(f"[{e.meta['doc_id']}] ")  # the number became the doc id
        assert record["source"] == "KB_MATCH" and record["detail"]["cited"] == e.meta["doc_id"]
