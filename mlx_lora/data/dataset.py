"""KB + question bank → ChatML train/valid/test rows that never share a question, written with their statistics."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mlx_lora.core.config import DataConfig
from mlx_lora.core.errors import UserError, located
from mlx_lora.core.files import write_dir
from mlx_lora.core.jsonl import json_text, jsonl_text
from mlx_lora.core.textnorm import compact
from mlx_lora.core.userfiles import load_yaml
from mlx_lora.data import off_topic
from mlx_lora.data.grounded import cited_answer, retrieve, user_turn, without_answer
from mlx_lora.data.kb import Doc, load_kb
from mlx_lora.data.questions import QuestionBank, load_questions
from mlx_lora.data.render import chatml_text
from mlx_lora.data.retrieval import PassageIndex
from mlx_lora.data.similarity import closest_ratio, make_scorer

SPLITS = ("train", "valid", "test")
NEAR_DUPLICATE = 0.8  # character similarity of normalised questions at which two count as near-duplicates


@dataclass
class Item:
    question: str
    answer: str
    doc_id: str | None  # None for unanswerable questions
    style: str
    passages: list[tuple[str, str]] | None = None  # grounded rows: (doc_id, text) shown with the question

    def row(self, cfg: DataConfig) -> dict:
        messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        user = self.question if self.passages is None else user_turn(self.question, self.passages, cfg)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": self.answer}]
        meta = {"doc_id": self.doc_id, "style": self.style, "answerable": self.doc_id is not None}
        if self.passages is not None:
            ids = [doc_id for doc_id, _ in self.passages]
            meta |= {"question": self.question, "passages": ids, "gold_in_passages": self.doc_id in ids}
            meta["cite"] = cfg.cite
        if cfg.format == "text":
            return {"text": chatml_text(messages), "meta": meta}
        return {"messages": messages, "meta": meta}


def _split_counts(n: int, cfg: DataConfig) -> tuple[int, int]:
    """(valid, test) sizes for a group of n questions; each held-out split gets ≥ 1 once there are ≥ 3."""
    n_test = round(n * cfg.test_fraction)
    n_valid = round(n * cfg.valid_fraction)
    if n >= 3:
        n_test = max(n_test, 1 if cfg.test_fraction > 0 else 0)
        n_valid = max(n_valid, 1 if cfg.valid_fraction > 0 else 0)
    return n_valid, n_test


def _unique(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for style, question in pairs:
        if compact(question) not in seen:
            seen.add(compact(question))
            out.append((style, question))
    return out


def load_extra_questions(path: str | Path, kb: dict[str, Doc]) -> dict[str, list[str]]:
    """Extra training questions, `{doc_id: [question, ...]}` (what `diagnose` proposes)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: extra questions file not found")
    data, root = load_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise located(path, 1, "expected a mapping doc_id → list of questions")
    lines = {key.value: key.start_mark.line + 1 for key, _ in root.value}
    for doc_id, questions in data.items():
        if doc_id not in kb:
            raise located(path, lines.get(doc_id), f"doc_id {doc_id!r} is not in the knowledge base")
        if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
            raise located(path, lines.get(doc_id), f"{doc_id}: expected a list of questions")
    return data


def build_splits(
    kb: dict[str, Doc], bank: QuestionBank, cfg: DataConfig, extra: dict[str, list[str]] | None = None
) -> dict[str, list[Item]]:
    """Split each doc's phrasings (and the unanswerable pool) by question, seeded; train gets the set ratio."""
    if not 0 < cfg.answerable_ratio <= 1:
        raise UserError(f"data.answerable_ratio must be in (0, 1], got {cfg.answerable_ratio}")
    if cfg.valid_fraction + cfg.test_fraction >= 1:
        raise UserError("data.valid_fraction + data.test_fraction must be below 1")
    rng = random.Random(cfg.seed)
    splits: dict[str, list[Item]] = {name: [] for name in SPLITS}
    for doc_id, doc in kb.items():
        pairs = _unique(bank.phrasings(doc_id))
        rng.shuffle(pairs)
        n_valid, n_test = _split_counts(len(pairs), cfg)
        answer = cfg.answer_prefix + doc.text
        for i, (style, question) in enumerate(pairs):
            name = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
            splits[name].append(Item(question, answer, doc_id, style))

    held_out = {compact(item.question) for name in ("valid", "test") for item in splits[name]}
    for doc_id, questions in (extra or {}).items():
        known = {compact(item.question) for item in splits["train"]}
        for question in questions:
            key = compact(question)
            if key and key not in held_out and key not in known:
                splits["train"].append(Item(question, cfg.answer_prefix + kb[doc_id].text, doc_id, "extra"))
                known.add(key)

    pool = [q for _, q in _unique([("none", q) for q in bank.unanswerable])]
    rng.shuffle(pool)
    n_valid, n_test = _split_counts(len(pool), cfg)
    refuse = lambda q: Item(q, bank.refusal, None, "unanswerable")
    splits["test"] += [refuse(q) for q in pool[:n_test]]
    splits["valid"] += [refuse(q) for q in pool[n_test : n_test + n_valid]]
    train_pool = pool[n_test + n_valid :]
    answerable = len(splits["train"])
    wanted = round(answerable * (1 - cfg.answerable_ratio) / cfg.answerable_ratio)
    if wanted and not train_pool:
        raise UserError(
            f"{cfg.questions}: no unanswerable question left for train once valid and test took theirs ({len(pool)} "
            "in the bank): add more to its `unanswerable:` list (questions on your KB's topics that it cannot "
            "answer, and a few off-topic ones) — every split needs some, to teach and to score the refusal"
        )
    # Fewer unique refusals than the ratio needs: repeat some (within train only, never across splits).
    splits["train"] += [refuse(train_pool[i % len(train_pool)]) for i in range(wanted)] if wanted else []
    for name in SPLITS:
        rng.shuffle(splits[name])
    return splits


def ground_splits(splits: dict[str, list[Item]], kb: dict[str, Doc], refusal: str, cfg: DataConfig, scorer) -> None:
    """Give every row its retrieved passages (data.mode grounded), in place.

    The index holds the KB texts and the train questions. A train row's own question is left out of it when its
    passages are retrieved: a user's question is never in the index, so a row that found itself would teach the
    model to trust a neighbour it will never see. Valid and test rows get exactly what inference gets.

    Train rows follow RAFT (Zhang et al. 2024): a data.oracle_rate share of the answerable rows see their gold
    passage (put in at a seeded position when retrieval missed it); the rest see the next retrieved passages
    instead and answer by data.oracle_free: the refusal (the passages do not answer) or the gold answer from
    memory. Unanswerable rows keep what retrieval finds: on-topic passages that do not answer are the near-miss
    lesson; data.near_miss_rate adds more of it: a share of the rows that see their gold passage see only its
    part least related to the question instead (grounded.without_answer) and answer the refusal. data.move_gold
    moves a share of the train rows' first-place gold passages to a seeded later place; with
    data.shuffle_passages, train rows show their passages in a seeded random order. Answers cite the passage they
    come from by its label (data.cite): "[2] <answer>" or "[doc_id] <answer>"."""
    texts = {doc_id: doc.text for doc_id, doc in kb.items()}
    index = PassageIndex(scorer, texts, [(i.question, i.doc_id) for i in splits["train"] if i.doc_id])
    rng = random.Random(cfg.seed + 1)
    near_miss = random.Random(cfg.seed + 2)  # its own stream: the other rows' draws stay as they were
    k = cfg.passages
    for name, items in splits.items():
        wider = retrieve(index, [i.question for i in items], _wider(cfg), leave_out_own=name == "train")
        for item, found in zip(items, wider):
            passages = found[:k]
            ids = [doc_id for doc_id, _ in passages]
            if item.doc_id is not None and name == "train":
                if rng.random() < cfg.oracle_rate:
                    if item.doc_id not in ids:
                        passages = passages[: k - 1]
                        passages.insert(rng.randrange(len(passages) + 1), (item.doc_id, texts[item.doc_id]))
                    cut = None
                    if cfg.near_miss_rate and near_miss.random() < cfg.near_miss_rate / max(cfg.oracle_rate, 1e-9):
                        cut = without_answer(item.question, texts[item.doc_id], scorer)
                    if cut is not None:
                        item.passages = [(d, cut if d == item.doc_id else t) for d, t in passages]
                        item.answer, item.style = refusal, item.style + "+near_miss"
                        continue
                else:
                    passages = [p for p in found if p[0] != item.doc_id][:k]
                    item.style += "+oracle_free"
                    if cfg.oracle_free == "refuse":
                        item.answer = refusal
                        item.passages = rng.sample(passages, len(passages)) if cfg.shuffle_passages else passages
                        continue
            if (
                name == "train"
                and cfg.move_gold
                and len(passages) > 1
                and passages[0][0] == item.doc_id
                and rng.random() < cfg.move_gold
            ):
                # Retrieval puts the gold passage first for ~88-94% of the sample's train rows, so a model may learn
                # "cite [1]"; then every question whose gold comes 2nd or 3rd is lost. Moving it down in a share of
                # rows keeps first place informative but makes the model read.
                passages = list(passages)
                passages.insert(rng.randrange(1, len(passages)), passages.pop(0))
            if name == "train" and cfg.shuffle_passages:
                # Retrieval puts the gold passage first for ~80% of questions, so a model may learn "copy the first
                # passage" (a 16-step adapter's topic accuracy on valid equalled the top passage's, 81.2%).
                # Shuffled, it must read — but a 20-step run then picked worse (52.1%): off by default.
                passages = list(passages)
                rng.shuffle(passages)
            if item.doc_id is not None:  # cited as shown (a number names the gold passage's final place)
                item.answer = cited_answer(item.doc_id, item.answer, [doc_id for doc_id, _ in passages], cfg)
            item.passages = passages


def _wider(cfg: DataConfig) -> DataConfig:
    """One passage more than shown: what replaces the gold one in oracle-free rows."""
    return dataclasses.replace(cfg, passages=cfg.passages + 1)


def overlap_report(splits: dict[str, list[Item]]) -> dict:
    """Exact (normalised) and near-duplicate question overlap of valid/test against train."""
    train_keys = sorted({compact(item.question) for item in splits["train"]})
    report = {}
    for name in ("valid", "test"):
        keys = [compact(item.question) for item in splits[name]]
        train_set = set(train_keys)
        exact = sum(key in train_set for key in keys)
        scores = [closest_ratio(key, train_keys) for key in keys]
        near = sum(best >= NEAR_DUPLICATE for best in scores)
        report[name] = {
            "rows": len(keys),
            "exact_overlap": exact,
            "near_duplicates": near,
            "near_duplicate_pct": _pct(near, max(len(keys), 1)),
            "mean_max_similarity": round(sum(scores) / max(len(scores), 1), 3),
        }
    return report


def split_stats(splits: dict[str, list[Item]]) -> dict:
    stats = {}
    for name, items in splits.items():
        answerable = [item for item in items if item.doc_id is not None]
        stats[name] = {
            "rows": len(items),
            "answerable": len(answerable),
            "unanswerable": len(items) - len(answerable),
            "unique_questions": len({compact(item.question) for item in items}),
            "per_doc": dict(sorted(Counter(item.doc_id for item in answerable).items())),
            "per_style": dict(sorted(Counter(item.style for item in items).items())),
        }
        shown = [item for item in answerable if item.passages is not None]
        if name == "valid" and shown:  # what inference gets: valid rows keep the retriever's order
            stats[name]["retrieval"] = {
                "gold_first_pct": _pct(sum(item.passages[0][0] == item.doc_id for item in shown), len(shown)),
                "gold_shown_pct": _pct(sum(item.doc_id in dict(item.passages) for item in shown), len(shown)),
                "passages": max(len(item.passages) for item in shown),
            }
    return stats


def _pct(part: int, whole: int) -> float:
    return round(100 * part / whole, 1)


def write_splits(splits: dict[str, list[Item]], out_dir: str | Path, cfg: DataConfig) -> dict:
    """Write DIR/{train,valid,test}.jsonl and DIR/stats.json; return the stats. DIR is replaced whole: the four
    files change together (DIR becomes a link to a new generation folder, see files.replaced_dir), and a folder
    holding anything else is refused rather than replaced."""
    stats = {"splits": split_stats(splits), "overlap": overlap_report(splits), "seed": cfg.seed}
    files = {f"{name}.jsonl": jsonl_text(item.row(cfg) for item in items) for name, items in splits.items()}
    files["stats.json"] = json_text(stats)
    write_dir(out_dir, files, allowed={*files, *(f"{name}.jsonl" for name in SPLITS)})
    return stats


def build_data(cfg: DataConfig, embedder: str = "use") -> dict:
    """Load and validate the KB and question bank (plus any extra questions), split, write; return the statistics."""
    kb = load_kb(cfg.kb)
    bank = load_questions(cfg.questions, kb)
    extra = load_extra_questions(cfg.extra_questions, kb) if cfg.extra_questions else None
    splits = build_splits(kb, bank, cfg, extra)
    fill = cfg.off_topic and off_topic.repeated(splits["train"])
    scorer = make_scorer(embedder) if cfg.mode == "grounded" or fill else None
    if fill:
        refuse = lambda q: Item(q, bank.refusal, None, off_topic.STYLE)
        texts = {doc_id: doc.text for doc_id, doc in kb.items()}
        off_topic.fill_repeats(splits, texts, scorer, cfg.seed, NEAR_DUPLICATE, refuse)
    if cfg.mode == "grounded":
        ground_splits(splits, kb, bank.refusal, cfg, scorer)
    stats = write_splits(splits, cfg.dir, cfg)
    stats["docs_without_questions"] = [d for d in kb if not bank.phrasings(d) and not (extra or {}).get(d)]
    return stats


def format_stats(stats: dict, out_dir) -> str:
    """build_data's statistics as the lines `data build` and `run` print: files, rows per split, overlap."""
    lines = [
        f"wrote {out_dir}/train.jsonl, valid.jsonl, test.jsonl, stats.json",
        f"{'split':<6} {'rows':>5} {'answerable':>10} {'unanswerable':>12} {'docs':>5}",
    ]
    for name, s in stats["splits"].items():
        lines.append(f"{name:<6} {s['rows']:>5} {s['answerable']:>10} {s['unanswerable']:>12} {len(s['per_doc']):>5}")
    if pooled := stats["splits"]["train"]["per_style"].get(off_topic.STYLE):
        lines.append(
            f"train: {pooled} refusal rows are general off-topic questions (built-in pool, data.off_topic) where the"
            " question bank's unanswerable list was too short for the refusal share"
        )
    for name, s in stats["splits"].items():
        if r := s.get("retrieval"):
            lines.append(
                f"retriever on {name}: the gold passage first for {r['gold_first_pct']}% of the answerable questions,"
                f" among the {r['passages']} shown for {r['gold_shown_pct']}%"
            )
    for name, o in stats["overlap"].items():
        lines.append(
            f"{name} vs train: exact overlap {o['exact_overlap']}, near-duplicates (≥80% chars) "
            f"{o['near_duplicates']}/{o['rows']} ({o['near_duplicate_pct']}%)"
        )
    return "\n".join(lines)


def stats_warnings(stats: dict) -> list[str]:
    """Warnings (for stderr) about what build_data wrote: KB docs that no question asks about."""
    if not stats.get("docs_without_questions"):
        return []
    return [
        f"warning: no questions for {', '.join(stats['docs_without_questions'])} in the question bank: "
        "the model never learns these docs; add phrasings under docs:"
    ]
