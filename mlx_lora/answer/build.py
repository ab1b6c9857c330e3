"""Assemble the answer decider from a config, the KB and the data splits; the no-LLM retrieval baseline."""

from __future__ import annotations

from pathlib import Path

from mlx_lora.answer.calibration import calibrate_route
from mlx_lora.answer.decide import Decider, Decision
from mlx_lora.answer.route import SemanticRoute, neighbours_from
from mlx_lora.answer.rules import load_rules
from mlx_lora.core.config import Config
from mlx_lora.data.formats import taught_refusal
from mlx_lora.data.grounded import own_citation_removed
from mlx_lora.data.similarity import REFUSAL

DEFAULT_REFUSAL = "抱歉,公司知識庫中沒有這個問題的相關規範,請洽詢 HR 或 IT Helpdesk。"


def doc_answers(kb: dict, examples, prefix: str) -> dict[str, str]:
    """Each doc's canonical answer: as the data rows wrote it (prefix + KB text), else prefix + text."""
    answers = {doc_id: prefix + doc.text for doc_id, doc in kb.items()}
    for example in examples:
        doc_id = (example.meta or {}).get("doc_id")
        text = own_citation_removed(example)  # a grounded row's answer starts with its citation
        if doc_id in kb and text.endswith(kb[doc_id].text):
            answers[doc_id] = text
    return answers


def refusal_text(examples, cfg: Config) -> str:
    """The refusal the data taught: most common expected answer of unanswerable rows; else the question bank's."""
    taught = taught_refusal(examples)
    if taught is not None:
        return taught
    if cfg.data.questions and Path(cfg.data.questions).is_file():
        from mlx_lora.data.questions import load_questions

        return load_questions(cfg.data.questions).refusal
    return DEFAULT_REFUSAL


def retrieval_decisions(route: SemanticRoute, questions, answers: dict[str, str], refusal: str) -> list[Decision]:
    """The no-LLM baseline: the answer of the nearest training question, whatever its score."""
    out = []
    for neighbour, score in route.nearest(questions, kinds=("question",)):
        text = refusal if neighbour.label == REFUSAL else answers[neighbour.label]
        out.append(
            Decision(
                text,
                "KB_RETRIEVAL",
                {"neighbour": neighbour.text, "neighbour_doc": neighbour.label, "score": round(score, 4)},
            )
        )
    return out


def on_known_docs(examples, kb: dict) -> tuple[list, list[str]]:
    """(the rows about docs the KB still has, and every refusal row; the doc ids of the others, deleted from the KB
    since the data was built): a question about a deleted doc has no answer to route it to."""
    kept, deleted = [], set()
    for example in examples:
        meta = example.meta or {}
        doc_id = meta.get("doc_id") if meta.get("answerable", True) else None
        if doc_id is None or doc_id in kb:
            kept.append(example)
        else:
            deleted.add(doc_id)
    return kept, sorted(deleted)


def deleted_note(info: dict, kb_path) -> str | None:
    """What to tell the user when build_decider left out questions about docs no longer in the KB."""
    gone = info.get("deleted_docs")
    if not gone:
        return None
    named = ", ".join(gone[:5]) + (", …" if len(gone) > 5 else "")
    return (
        f"{len(gone)} doc(s) the run's questions ask about are no longer in {kb_path} ({named}): the route leaves "
        "their questions out; put them back in the KB to answer them again"
    )


def build_decider(
    cfg: Config, scorer, kb, train, valid, answers, refusal, index, rules_path, model_first: bool = False
) -> tuple[Decider, dict]:
    """Keyword rules, then the semantic route (a topic classifier trained on the train split only).

    Route thresholds not set in cfg.rules are calibrated out-of-fold on the train and valid questions
    (calibration.calibrate_route); the test split is never used. Train and valid questions about docs deleted from
    the KB since are left out (info["deleted_docs"] names those docs).
    """
    info: dict = {}
    route = None
    train, deleted = on_known_docs(train, kb)
    valid, deleted_valid = on_known_docs(valid, kb)
    if deleted or deleted_valid:
        info["deleted_docs"] = sorted(set(deleted) | set(deleted_valid))
    rules = load_rules(rules_path, kb) if rules_path else []
    if train:
        route = SemanticRoute(
            scorer,
            neighbours_from(train, {d: doc.text for d, doc in kb.items()}, index),
            cfg.rules.route_high,
            cfg.rules.route_low,
        )
        info["calibration"] = calibrate_route(route, train + valid, index)
        route.high = cfg.rules.route_high if cfg.rules.route_high is not None else route.high
        route.low = cfg.rules.route_low if cfg.rules.route_low is not None else route.low
        if cfg.rules.answer_floor is not None:
            route.answer_floor = cfg.rules.answer_floor
        if not cfg.rules.answerability:
            route.answer_floor = None
        info["route"] = route.describe()
    info["rules"] = {
        "path": str(rules_path) if rules_path else None,
        "count": len(rules),
        "kb_match_threshold": cfg.rules.kb_match_threshold,
    }
    info["model_first"] = model_first
    return Decider(rules, answers, index, refusal, cfg.rules.kb_match_threshold, route, model_first), info
