"""Evaluation orchestration: generate per variant (base, tuned), apply rules + route, retrieval baseline, report."""

from __future__ import annotations

import dataclasses
import gc
import random
import sys
import time
from collections import Counter
from pathlib import Path

from mlx_lora.core.config import Config
from mlx_lora.core.errors import UserError
from mlx_lora.evaluation.scoring import build_report, score_rows, write_report
from mlx_lora.data.formats import read_examples
from mlx_lora.core.files import write_jsonl
from mlx_lora.data.kb import load_kb
from mlx_lora.answer.route import SemanticRoute, calibrate_route, neighbours_from
from mlx_lora.answer.rules import Decision, RuleLayer, audit_records, load_rules
from mlx_lora.data.similarity import REFUSAL, answer_index, describe, make_scorer

DEFAULT_REFUSAL = "抱歉,公司知識庫中沒有這個問題的相關規範,請洽詢 HR 或 IT Helpdesk。"
MODEL_VARIANTS = ("base", "tuned", "tuned_rules", "base_rules")


def doc_answers(kb: dict, examples, prefix: str) -> dict[str, str]:
    """Each doc's canonical answer: as the data rows wrote it (prefix + KB text), else prefix + text."""
    answers = {doc_id: prefix + doc.text for doc_id, doc in kb.items()}
    for example in examples:
        doc_id = (example.meta or {}).get("doc_id")
        if doc_id in kb and example.answer.endswith(kb[doc_id].text):
            answers[doc_id] = example.answer
    return answers


def refusal_text(examples, cfg: Config) -> str:
    """The refusal the data taught: most common expected answer of unanswerable rows; else the question bank's."""
    seen = Counter(e.answer for e in examples if (e.meta or {}).get("answerable") is False)
    if seen:
        return seen.most_common(1)[0][0]
    if cfg.data.questions and Path(cfg.data.questions).is_file():
        from mlx_lora.data.questions import load_questions

        return load_questions(cfg.data.questions).refusal
    return DEFAULT_REFUSAL


def retrieval_decisions(route: SemanticRoute, questions, answers: dict[str, str], refusal: str) -> list[Decision]:
    """The no-LLM baseline: the answer of the nearest training question, whatever its score."""
    out = []
    for neighbour, score in route.nearest(questions, kinds=("question",)):
        text = refusal if neighbour.label == REFUSAL else answers[neighbour.label]
        out.append(Decision(text, "KB_RETRIEVAL", {"neighbour": neighbour.text, "neighbour_doc": neighbour.label,
                                                   "score": round(score, 4)}))
    return out


def generate_answers(backend, loaded, tokenizer, examples, cfg: Config, system_prompt: str | None,
                     progress: bool = False) -> list[str]:
    """Greedy answers in input order; prompts are batched by length so padding stays small."""
    prompts = [tokenizer.prompt_ids(e.prompt_messages(), system_prompt) for e in examples]
    gen_cfg = dataclasses.replace(cfg.generate, temperature=0.0)  # evaluation is always greedy
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = max(1, cfg.generate.batch_size)
    answers: list[str] = [""] * len(prompts)
    batches = [order[k:k + size] for k in range(0, len(order), size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="generate", unit="batch", file=sys.stderr)
    for batch in batches:
        new_ids = backend.generate(loaded, [prompts[i] for i in batch], gen_cfg, tokenizer.stop_ids())
        for i, ids in zip(batch, new_ids):
            answers[i] = tokenizer.decode(list(ids)).strip()
    return answers


def _generate_variant(cfg: Config, model, adapter, examples, progress: bool) -> tuple[list[str], float]:
    from mlx_lora.training.run import load_for_generation

    backend, loaded, tokenizer, system_prompt = load_for_generation(model, adapter, cfg, progress=progress)
    start = time.perf_counter()
    answers = generate_answers(backend, loaded, tokenizer, examples, cfg, system_prompt, progress)
    elapsed = time.perf_counter() - start
    del loaded
    gc.collect()
    return answers, elapsed


def _read(path, what: str, required: bool = False):
    if path is None or not Path(path).is_file():
        if required:
            raise UserError(f"{path}: {what} file not found")
        return []
    return read_examples(path)


def build_layer(cfg: Config, scorer, kb, train, valid, answers, refusal, index, rules_path) -> tuple[RuleLayer, dict]:
    """Keyword rules, then the semantic route (a topic classifier trained on the train split only).

    Route thresholds not set in cfg.rules are calibrated out-of-fold on the train and valid questions
    (route.calibrate_route); the test split is never used.
    """
    info: dict = {}
    route = None
    rules = load_rules(rules_path, kb) if rules_path else []
    if train:
        route = SemanticRoute(scorer, neighbours_from(train, {d: doc.text for d, doc in kb.items()}, index),
                              cfg.rules.route_high, cfg.rules.route_low)
        info["calibration"] = calibrate_route(route, train + valid, index)
        route.high = cfg.rules.route_high if cfg.rules.route_high is not None else route.high
        route.low = cfg.rules.route_low if cfg.rules.route_low is not None else route.low
        if cfg.rules.answer_floor is not None:
            route.answer_floor = cfg.rules.answer_floor
        if not cfg.rules.answerability:
            route.answer_floor = None
        info["route"] = route.describe()
    info["rules"] = {"path": str(rules_path) if rules_path else None, "count": len(rules),
                     "kb_match_threshold": cfg.rules.kb_match_threshold}
    return RuleLayer(rules, answers, index, refusal, cfg.rules.kb_match_threshold, route), info


def default_variants(adapter) -> tuple[str, ...]:
    return ("base", "tuned", "tuned_rules", "retrieval") if adapter else ("base", "base_rules", "retrieval")


def evaluate_run(cfg: Config, model, adapter_run, test_path, valid_path, train_path, kb_path, out_dir,
                 variants=None, rules_path="config", progress: bool = True, answers: dict | None = None) -> dict:
    """Evaluate variants on the test split and write out_dir/report.{json,md,html} and the audit log.

    rules_path "config" → cfg.rules.path (skipped with a note when that file is missing); None → no keyword rules.
    `answers` may supply already generated answers per variant ({"tuned": [...]}) to skip generation.
    """
    out_dir = Path(out_dir)
    variants = tuple(variants or default_variants(adapter_run))
    if any(v in ("tuned", "tuned_rules") for v in variants) and adapter_run is None and not (answers or {}).get(
            "tuned"):
        raise UserError("variants tuned / tuned_rules need --adapter (a run directory or adapter folder)")
    kb = load_kb(kb_path)
    test = _read(test_path, "test data", required=True)
    if cfg.eval.max_rows and cfg.eval.max_rows < len(test):
        keep = sorted(random.Random(cfg.data.seed).sample(range(len(test)), cfg.eval.max_rows))
        test = [test[i] for i in keep]
    train, valid = _read(train_path, "train data"), _read(valid_path, "valid data")
    notes: dict[str, str] = {}
    if rules_path == "config":
        rules_path = cfg.rules.path
        if rules_path and not Path(rules_path).is_file():
            notes["rules"] = f"{rules_path} not found: no keyword rules, semantic route only"
            rules_path = None
    start = time.perf_counter()
    scorer = make_scorer(cfg.eval.embedder)
    canonical = doc_answers(kb, train + valid + test, cfg.data.answer_prefix)
    refusal = refusal_text(train + valid + test, cfg)
    index = answer_index(scorer, canonical, refusal)
    layer, layer_info = build_layer(cfg, scorer, kb, train, valid, canonical, refusal, index, rules_path)
    questions = [e.question for e in test]
    got: dict[str, list] = dict(answers or {})
    timings: dict[str, float] = {}
    if "retrieval" in variants:
        if layer.route is None:
            notes["retrieval"] = "no train split given: retrieval baseline skipped"
        else:
            got["retrieval"] = retrieval_decisions(layer.route, questions, canonical, refusal)
    for name, adapter in (("tuned", adapter_run), ("base", None)):
        wanted = name in variants or f"{name}_rules" in variants
        if wanted and name not in got:
            got[name], timings[f"{name}_generate_s"] = _generate_variant(cfg, model, adapter, test, progress)
    audit = []
    for name in ("tuned", "base"):
        if f"{name}_rules" in variants:
            got[f"{name}_rules"] = layer.decide(questions, got[name])
            audit += audit_records(questions, got[name], got[f"{name}_rules"], variant=f"{name}_rules")
    rows = {name: score_rows(test, got[name], scorer, index) for name in variants if name in got}
    timings["scoring_s"] = round(time.perf_counter() - start - sum(timings.values()), 1)
    meta = {"test": str(test_path), "train": str(train_path), "valid": str(valid_path), "kb": str(kb_path),
            "model": str(model or cfg.model.path), "adapter": str(adapter_run) if adapter_run else None,
            "test_rows": len(test), "refusal": refusal, "timings": timings, "notes": notes, **layer_info}
    report = build_report(rows, cfg.eval.threshold, describe(scorer), cfg.eval.worst_n, meta)
    write_report(report, out_dir)
    if audit and cfg.rules.audit_log:  # after the report: a failed evaluation never leaves a new log by an old report
        write_jsonl(out_dir / cfg.rules.audit_log, audit)
    return report
