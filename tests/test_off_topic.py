"""The built-in off-topic pool: train refusals in place of repeated ones, never near the KB or a held-out question."""

import json

from mlx_lora.core.config import DataConfig
from mlx_lora.core.textnorm import compact
from mlx_lora.data import off_topic
from mlx_lora.data.dataset import NEAR_DUPLICATE, Item, build_data, build_splits
from mlx_lora.data.kb import load_kb
from mlx_lora.data.questions import load_questions
from mlx_lora.data.similarity import CharScorer


def test_pool_is_large_unique_and_comment_free():
    pool = off_topic.pool_questions()
    assert len(pool) >= 150
    assert len({compact(q) for q in pool}) == len(pool)
    assert not any(q.startswith("#") for q in pool)


def test_usable_drops_questions_near_the_kb_or_a_held_out_question():
    kb = ["VPN 設定:下載新版 client,以 SSO 登入。", "請假須於三天前在 HR 系統申請。"]
    answerable = ["VPN 怎麼設定", "怎麼請假", "請假需要提前多久?"]
    pool = ["VPN 設定要下載新版 client 嗎?", "今天天氣如何?", "幫我寫一首關於海的詩", "番茄炒蛋好吃嗎"]
    held = ["今天天氣如何呢?"]
    kept = off_topic.usable(pool, kb, answerable, held, CharScorer(), NEAR_DUPLICATE)
    assert kept == ["幫我寫一首關於海的詩", "番茄炒蛋好吃嗎"]  # pool order; the KB-like and held-like ones gone
    assert off_topic.usable(pool, kb, [], held, CharScorer(), NEAR_DUPLICATE) == []  # nothing to measure the KB by


def _splits(tiny_kb, tiny_questions, **data):
    kb = load_kb(tiny_kb)
    bank = load_questions(tiny_questions, kb)
    cfg = DataConfig(answerable_ratio=0.5, valid_fraction=0.2, test_fraction=0.2, **data)
    return kb, bank, cfg, build_splits(kb, bank, cfg)


def test_repeats_are_replaced_in_place_and_nothing_else_moves(tiny_kb, tiny_questions):
    kb, bank, cfg, splits = _splits(tiny_kb, tiny_questions)
    before = [dict(vars(item)) for item in splits["train"]]
    repeats = off_topic.repeated(splits["train"])
    assert len(repeats) == 8  # 12 answerable train rows at 0.5 need 12 refusals; the bank leaves 4 for train
    refuse = lambda q: Item(q, bank.refusal, None, off_topic.STYLE)
    texts = {doc_id: doc.text for doc_id, doc in kb.items()}
    n = off_topic.fill_repeats(splits, texts, CharScorer(), cfg.seed, NEAR_DUPLICATE, refuse)
    train = splits["train"]
    assert n == len(repeats) and len(train) == len(before)
    assert off_topic.repeated(train) == []
    for i, (item, old) in enumerate(zip(train, before)):
        if i in repeats:
            assert item.style == off_topic.STYLE and item.answer == bank.refusal and item.doc_id is None
        else:
            assert vars(item) == old
    held = {compact(item.question) for name in ("valid", "test") for item in splits[name]}
    assert not held & {compact(train[i].question) for i in repeats}
    again = _splits(tiny_kb, tiny_questions)[3]
    off_topic.fill_repeats(again, texts, CharScorer(), cfg.seed, NEAR_DUPLICATE, refuse)
    assert again == splits  # seeded


def test_build_data_fills_only_when_asked(tiny_kb, tiny_questions, tmp_path):
    counts = {}
    for on in (True, False):
        cfg = DataConfig(
            kb=str(tiny_kb),
            questions=str(tiny_questions),
            dir=str(tmp_path / str(on)),
            answerable_ratio=0.5,
            valid_fraction=0.2,
            test_fraction=0.2,
            off_topic=on,
        )
        stats = build_data(cfg, embedder="char")
        rows = [json.loads(line) for line in (tmp_path / str(on) / "train.jsonl").read_text().splitlines()]
        refusals = [r["messages"][1]["content"] for r in rows if not r["meta"]["answerable"]]
        counts[on] = (len(refusals), len(set(refusals)), stats["splits"]["train"]["per_style"].get("off_topic", 0))
    assert counts[True] == (12, 12, 8)
    assert counts[False] == (12, 4, 0)


def test_folds_train_on_pool_rows_everywhere_and_never_hold_them(tmp_path):
    """benchmarks/grounded/folds.py: a pool row is no question of the KB's bank, so it is never scored as one."""
    import subprocess
    import sys

    from conftest import REPO

    def row(question, style, doc_id=None):
        answer = f"[1] {doc_id}" if doc_id else "抱歉"
        meta = {"question": question, "style": style, "answerable": doc_id is not None, "doc_id": doc_id}
        meta |= {"passages": ["a", "b"], "gold_in_passages": doc_id is not None, "cite": "number"}
        return {
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "meta": meta,
        }

    rows = [row(f"q{i}", "short", "a") for i in range(6)] + [row("u", "unanswerable"), row("u", "unanswerable")]
    rows += [row(f"o{i}", off_topic.STYLE) for i in range(3)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    (data / "valid.jsonl").write_text("", "utf-8")
    script = REPO / "benchmarks" / "grounded" / "folds.py"
    subprocess.run([sys.executable, str(script), str(data), str(tmp_path / "f"), "--folds", "3"], check=True)
    held_all = []
    for f in range(3):
        folder = tmp_path / "f" / f"fold-{f}"
        train, held = (
            [json.loads(x) for x in (folder / n).read_text().splitlines()] for n in ("train.jsonl", "held.jsonl")
        )
        assert sum(r["meta"]["style"] == off_topic.STYLE for r in train) == 3
        held_all += [r["meta"]["question"] for r in held]
        assert not {r["meta"]["question"] for r in held} & {r["meta"]["question"] for r in train}
    assert sorted(held_all) == sorted([f"q{i}" for i in range(6)] + ["u"])  # each bank question held once
