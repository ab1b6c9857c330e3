"""Evaluation orchestration: generate per model (base, tuned), decide, add the retrieval baseline, report."""

from __future__ import annotations

import dataclasses
import gc
import random
import sys
import time
from pathlib import Path

from mlx_lora.answer.audit import audit_records
from mlx_lora.answer.build import build_decider, doc_answers, refusal_text, retrieval_decisions
from mlx_lora.core.config import Config
from mlx_lora.core.errors import UserError
from mlx_lora.core.files import write_jsonl
from mlx_lora.data.formats import read_examples
from mlx_lora.data.kb import load_kb
from mlx_lora.data.similarity import answer_index, describe, make_scorer
from mlx_lora.evaluation.scoring import build_report, score_rows, write_report
from mlx_lora.evaluation.variants import DECIDED, MODEL_OF, NEED_ADAPTER, default_variants, models_for


def generate_answers(
    backend, loaded, tokenizer, examples, cfg: Config, system_prompt: str | None, progress: bool = False
) -> list[str]:
    """Greedy answers in input order; prompts are batched by length so padding stays small."""
    prompts = [tokenizer.prompt_ids(e.prompt_messages(), system_prompt) for e in examples]
    gen_cfg = dataclasses.replace(cfg.generate, temperature=0.0)  # evaluation is always greedy
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = max(1, cfg.generate.batch_size)
    answers: list[str] = [""] * len(prompts)
    batches = [order[k : k + size] for k in range(0, len(order), size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="generate", unit="batch", file=sys.stderr)
    for batch in batches:
        new_ids = backend.generate(loaded, [prompts[i] for i in batch], gen_cfg, tokenizer.stop_ids())
        for i, ids in zip(batch, new_ids):
            answers[i] = tokenizer.decode(list(ids)).strip()
    return answers


def _generate_variant(cfg: Config, model, adapter, examples, progress: bool) -> tuple[list[str], float]:
    from mlx_lora.backends.loading import load_for_generation

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


def evaluate_run(
    cfg: Config,
    model,
    adapter_run,
    test_path,
    valid_path,
    train_path,
    kb_path,
    out_dir,
    variants=None,
    rules_path="config",
    progress: bool = True,
    answers: dict | None = None,
) -> dict:
    """Evaluate variants on the test split and write out_dir/report.{json,md,html} and the audit log.

    rules_path "config" → cfg.rules.path (skipped with a note when that file is missing); None → no keyword rules.
    `answers` may supply already generated answers per variant ({"tuned": [...]}) to skip generation.
    """
    out_dir = Path(out_dir)
    variants = tuple(variants or default_variants(adapter_run))
    if any(v in NEED_ADAPTER for v in variants) and adapter_run is None and not (answers or {}).get("tuned"):
        raise UserError(f"variants {' / '.join(NEED_ADAPTER)} need --adapter (a run directory or adapter folder)")
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
    decider, decider_info = build_decider(cfg, scorer, kb, train, valid, canonical, refusal, index, rules_path)
    questions = [e.question for e in test]
    got: dict[str, list] = dict(answers or {})
    timings: dict[str, float] = {}
    if "retrieval" in variants:
        if decider.route is None:
            notes["retrieval"] = "no train split given: retrieval baseline skipped"
        else:
            got["retrieval"] = retrieval_decisions(decider.route, questions, canonical, refusal)
    adapters = {"tuned": adapter_run, "base": None}
    for name in models_for(variants):
        if name not in got:
            got[name], timings[f"{name}_generate_s"] = _generate_variant(cfg, model, adapters[name], test, progress)
    audit = []
    for name in DECIDED:
        if name in variants:
            got[name] = decider.decide(questions, got[MODEL_OF[name]])
            audit += audit_records(questions, got[MODEL_OF[name]], got[name], variant=name)
    rows = {name: score_rows(test, got[name], scorer, index) for name in variants if name in got}
    timings["scoring_s"] = round(time.perf_counter() - start - sum(timings.values()), 1)
    meta = {
        "test": str(test_path),
        "train": str(train_path),
        "valid": str(valid_path),
        "kb": str(kb_path),
        "model": str(model or cfg.model.path),
        "adapter": str(adapter_run) if adapter_run else None,
        "test_rows": len(test),
        "refusal": refusal,
        "timings": timings,
        "notes": notes,
        **decider_info,
    }
    report = build_report(rows, cfg.eval.threshold, describe(scorer), cfg.eval.worst_n, meta)
    write_report(report, out_dir)
    if audit and cfg.rules.audit_log:  # after the report: a failed evaluation never leaves a new log by an old report
        write_jsonl(out_dir / cfg.rules.audit_log, audit)
    return report
