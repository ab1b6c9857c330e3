"""Grounded rows past the build: fitted to the token limit, the citation style training accepts, eval's citations."""

from __future__ import annotations

import json

import pytest
from conftest import grounded

from mlx_lora.core.config import DataConfig
from mlx_lora.data.fitting import fit_passages, fit_rows
from mlx_lora.data.formats import read_examples
from mlx_lora.data.grounded import own_citation_removed, parse_citation


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


def test_fit_rows_fits_prompts_to_the_budget_and_warns_once(tiny_kb, tiny_questions, tmp_path, qwen_tokenizer_dir):
    import dataclasses

    from mlx_lora.data.fitting import prompt_budget, prompt_length
    from mlx_lora.data.formats import encode_example
    from mlx_lora.data.render import ChatTokenizer

    cfg, _, _, _ = grounded(tiny_kb, tiny_questions, tmp_path, oracle_rate=1.0, passages=3)
    tokenizer = ChatTokenizer.from_dir(qwen_tokenizer_dir)
    rows = read_examples(tmp_path / "out" / "train.jsonl")
    length = prompt_length(tokenizer)
    prompts = sorted(length(e) for e in rows)
    answers = [encode_example(tokenizer, e, 10**9).supervised for e in rows]
    whole = [encode_example(tokenizer, e, 10**9).full_length for e in rows]
    assert [length(e) + a for e, a in zip(rows, answers)] == whole
    budget = prompts[len(prompts) // 2]  # half the prompts are over
    max_length = budget + max(answers)
    uncut = [encode_example(tokenizer, e, 10**9) for e in rows]
    assert prompt_budget(uncut, max_length) == budget  # max_length less the longest answer
    assert fit_rows(rows, length, cfg, "train.jsonl", max_length) == (rows, [])  # no budget: nothing to fit
    cfg = dataclasses.replace(cfg, prompt_tokens=budget)
    fitted, warnings = fit_rows(rows, length, cfg, "train.jsonl", max_length)
    over = sum(n > budget for n in prompts)
    assert len(warnings) == 1 and f"{over} of {len(rows)} grounded prompts" in warnings[0]
    assert f"data.prompt_tokens={budget} (train.max_length={max_length}" in warnings[0]
    for before, after in zip(rows, fitted):
        # The same answer, its numbered citation following the gold passage if one before it was dropped.
        assert own_citation_removed(after) == own_citation_removed(before)
        assert parse_citation(after.answer)[0] == parse_citation(before.answer)[0] or after.meta["passages_shortened"]
        assert length(after) <= budget and not encode_example(tokenizer, after, max_length).truncated


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
    cfg.prompt_tokens = 10**6
    assert fit_rows(rows, _chars, cfg, "train.jsonl", 10**6)[0] == rows
    other = DataConfig(kb=cfg.kb, mode="grounded", cite="doc_id", prompt_tokens=10**6)
    with pytest.raises(UserError, match=r"train.jsonl:1: this row was built with data.cite=number .* data.cite=doc_id"):
        fit_rows(rows, _chars, other, "train.jsonl", 10**6)
    # Rows built before data.cite existed cited doc ids: a numbered config refuses them too.
    for row in rows:
        del row.meta["cite"]
    with pytest.raises(UserError, match=r"built with data.cite=doc_id but the config says data.cite=number"):
        fit_rows(rows, _chars, cfg, "train.jsonl", 10**6)


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


def test_a_prompt_at_inference_is_fitted_as_its_training_row_was(tiny_kb, tiny_questions, tmp_path, qwen_tokenizer_dir):
    """Train/inference parity: a question shown at inference the passages its training row showed, cut the same
    way, when its gold passage is not one fitting would have kept for training's sake (first, or no gold)."""
    import dataclasses

    from mlx_lora.data.fitting import fit_prompts, fitted_turn, prompt_length
    from mlx_lora.data.render import ChatTokenizer

    cfg, kb, _, _ = grounded(tiny_kb, tiny_questions, tmp_path, oracle_rate=1.0, passages=3)
    texts = {d: doc.text for d, doc in kb.items()}
    tokenizer = ChatTokenizer.from_dir(qwen_tokenizer_dir)
    length = prompt_length(tokenizer)
    rows = [
        e
        for e in read_examples(tmp_path / "out" / "train.jsonl")
        if e.meta.get("doc_id") in (None, e.meta["passages"][0])
    ]
    cfg = dataclasses.replace(cfg, prompt_tokens=sorted(map(length, rows))[len(rows) // 3])
    shortened = 0
    for row in rows:
        trained, what = fit_passages(row, texts, cfg, length, cfg.prompt_tokens)
        system = row.messages[0]["content"] if row.messages[0]["role"] == "system" else None
        passages = [(d, texts[d]) for d in row.meta["passages"]]
        turn, shown = fitted_turn(row.question, passages, cfg, length, system)
        assert (turn, shown) == (trained.messages[-2]["content"], trained.meta["passages"])
        shortened += what == "shortened"
    assert 0 < shortened < len(rows)
    # Without the run's budget (a run from before it) or a tokenizer: every passage, whole.
    whole = fitted_turn(rows[0].question, [(d, texts[d]) for d in rows[0].meta["passages"]], cfg)
    assert whole == (rows[0].messages[-2]["content"], rows[0].meta["passages"])
    # eval's rows, the same way.
    assert fit_prompts(rows, texts, cfg, length) == [
        fit_passages(r, texts, cfg, length, cfg.prompt_tokens)[0] for r in rows
    ]
    assert fit_prompts(rows, texts, dataclasses.replace(cfg, prompt_tokens=None), length) == rows


def test_eval_fits_a_prompt_as_serving_does_even_where_the_gold_passage_ranks_last(
    tiny_kb, tiny_questions, tmp_path, qwen_tokenizer_dir
):
    """A scored question must see what a user's would: fitting drops the lowest-ranked passage, gold or not."""
    import dataclasses

    from mlx_lora.data.fitting import fit_prompts, fitted_turn, prompt_length
    from mlx_lora.data.render import ChatTokenizer

    cfg, kb, _, _ = grounded(tiny_kb, tiny_questions, tmp_path, oracle_rate=1.0, passages=3)
    texts = {d: doc.text for d, doc in kb.items()}
    length = prompt_length(ChatTokenizer.from_dir(qwen_tokenizer_dir))
    rows = [
        e for e in read_examples(tmp_path / "out" / "train.jsonl") if e.meta.get("doc_id") == e.meta["passages"][-1]
    ]
    assert rows
    cfg = dataclasses.replace(cfg, prompt_tokens=min(map(length, rows)) - 1)  # no row fits with all three
    lost = 0
    for row, fitted in zip(rows, fit_prompts(rows, texts, cfg, length)):
        system = row.messages[0]["content"] if row.messages[0]["role"] == "system" else None
        served = fitted_turn(row.question, [(d, texts[d]) for d in row.meta["passages"]], cfg, length, system)
        assert (fitted.messages[-2]["content"], fitted.meta["passages"]) == served
        assert fitted.meta["doc_id"] == row.meta["doc_id"]  # still scored against its doc
        lost += row.meta["doc_id"] not in fitted.meta["passages"]
        assert row.meta["doc_id"] in fit_passages(row, texts, cfg, length, cfg.prompt_tokens)[0].meta["passages"]
    assert lost  # where training's fitting keeps the gold passage, a user's prompt drops it


def test_a_null_max_length_leaves_room_for_the_longest_answer_after_a_whole_long_passage(
    tiny_kb, tiny_questions, tmp_path, qwen_tokenizer_dir
):
    """A KB with a long text: the fixed 320 left no room (a 400-token answer), so every row was dropped; null fits
    the length to the rows: each prompt shows its top passage whole and no answer is cut."""
    from mlx_lora.core.config import Config
    from mlx_lora.data.fitting import AUTO_MAX_LENGTH, fit_rows, prompt_length, with_lengths
    from mlx_lora.data.formats import encode_example
    from mlx_lora.data.kb import text_sha256
    from mlx_lora.data.render import ChatTokenizer

    tokenizer = ChatTokenizer.from_dir(qwen_tokenizer_dir)
    cfg = Config()
    cfg.train.max_length = None
    cfg.data, _, _, _ = grounded(tiny_kb, tiny_questions, tmp_path / "short", oracle_rate=1.0, passages=3)
    rows = read_examples(tmp_path / "short" / "out" / "train.jsonl")
    short = with_lengths(cfg, tokenizer, rows)
    assert short.train.max_length == AUTO_MAX_LENGTH  # short texts: the measured default
    longest_answer = max(encode_example(tokenizer, e, 10**9).supervised for e in rows)
    assert short.data.prompt_tokens == AUTO_MAX_LENGTH - longest_answer
    assert cfg.train.max_length is None and cfg.data.prompt_tokens is None  # the caller's config is left alone

    lines = [json.loads(x) for x in tiny_kb.read_text(encoding="utf-8").splitlines()]
    clause = "第{i}條：VPN 閘道 vpn{i}.example.com 僅限週{d}使用，連線逾時 {i} 分鐘後自動中斷。"
    long_text = "".join(clause.format(i=i, d=i % 7 + 1) for i in range(12))
    lines[0].update(text=long_text, text_hash=text_sha256(long_text))
    tiny_kb.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    cfg.data, _, _, _ = grounded(tiny_kb, tiny_questions, tmp_path / "long", oracle_rate=1.0, passages=3)
    rows = read_examples(tmp_path / "long" / "out" / "train.jsonl")
    fitted = with_lengths(cfg, tokenizer, rows)
    max_length, budget = fitted.train.max_length, fitted.data.prompt_tokens
    long_tokens = len(tokenizer.encode_plain(long_text))
    assert long_tokens > AUTO_MAX_LENGTH and max_length > 2 * long_tokens  # the answer after its passage
    out, _ = fit_rows(rows, prompt_length(tokenizer), fitted.data, "train.jsonl", max_length)
    texts = {x["doc_id"]: x["text"] for x in lines}
    assert sum(after.meta["passages"][0] == lines[0]["doc_id"] for after in out) >= 3  # the long one is top for some
    for before, after in zip(rows, out):
        assert not encode_example(tokenizer, after, max_length).truncated  # every answer whole
        assert texts[after.meta["passages"][0]] in after.messages[-2]["content"]  # its top passage whole
        assert own_citation_removed(after) == own_citation_removed(before)
    assert budget == max_length - max(encode_example(tokenizer, e, 10**9).supervised for e in rows)

    cfg.train.max_length = 320  # set: kept as it is, however short
    assert with_lengths(cfg, tokenizer, rows).train.max_length == 320


def test_a_null_max_length_is_the_longest_row_for_closed_book_rows(
    tiny_kb, tiny_questions, tmp_path, qwen_tokenizer_dir
):
    from mlx_lora.core.config import Config
    from mlx_lora.data.dataset import build_data
    from mlx_lora.data.fitting import with_lengths
    from mlx_lora.data.formats import encode_example
    from mlx_lora.data.render import ChatTokenizer

    cfg = Config()
    cfg.train.max_length = None
    cfg.data.kb, cfg.data.questions, cfg.data.dir = str(tiny_kb), str(tiny_questions), str(tmp_path / "out")
    build_data(cfg.data, "char")
    rows = read_examples(tmp_path / "out" / "train.jsonl")
    tokenizer = ChatTokenizer.from_dir(qwen_tokenizer_dir)
    fitted = with_lengths(cfg, tokenizer, rows)
    assert fitted.train.max_length == max(encode_example(tokenizer, e, 10**9).full_length for e in rows)
    assert fitted.data.prompt_tokens is None
