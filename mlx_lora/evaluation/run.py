"""Evaluation orchestration: generate per model (base, tuned), decide, add the retrieval baseline, report."""

from __future__ import annotations

import dataclasses
import gc
import random
import sys
import time
from pathlib import Path

from mlx_lora.answer.audit import audit_records
from mlx_lora.answer.build import build_decider, deleted_note, doc_answers, refusal_text, retrieval_decisions
from mlx_lora.answer.decide import Decision
from mlx_lora.backends.loading import read_manifest, saved_prompt_settings
from mlx_lora.core.config import Config
from mlx_lora.core.errors import UserError
from mlx_lora.core.model_store import local_model_dir
from mlx_lora.data.fitting import fit_prompts, prompt_length
from mlx_lora.data.formats import read_examples
from mlx_lora.data.grounded import familiar, reground, with_doc_id
from mlx_lora.data.kb import load_kb
from mlx_lora.data.render import ChatTokenizer
from mlx_lora.data.retrieval import PassageIndex
from mlx_lora.data.similarity import answer_index, describe, make_scorer
from mlx_lora.evaluation.scoring import build_report, score_rows, write_report
from mlx_lora.evaluation.variants import DECIDED, MODEL_OF, NEED_ADAPTER, default_variants, models_for


def generate_answers(
    backend,
    loaded,
    tokenizer,
    examples,
    cfg: Config,
    system_prompt: str | None,
    progress: bool = False,
    index: PassageIndex | None = None,
) -> list[str]:
    """Greedy answers in input order; prompts are batched by length so padding stays small. `index`: the
    retriever the grounded prompts were built from (which docs training asked about: grounded.familiar)."""
    biased = [familiar((e.meta or {}).get("passages") or [], index) for e in examples]
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
        new_ids = backend.generate(
            loaded, [prompts[i] for i in batch], gen_cfg, tokenizer.stop_ids(), biased=[biased[i] for i in batch]
        )
        for i, ids in zip(batch, new_ids):
            answers[i] = tokenizer.decode(list(ids)).strip()
    return answers


def _generate_variant(
    cfg: Config, model, adapter, examples, progress: bool, strict: bool = False, index: PassageIndex | None = None
) -> tuple[list[str], float, float]:
    """(answers, seconds generating, the refusal bias the model answered with: 0 without one)."""
    from mlx_lora.backends.loading import load_for_generation

    backend, loaded, tokenizer, system_prompt = load_for_generation(
        model, adapter, cfg, progress=progress, strict=strict
    )
    start = time.perf_counter()
    answers = generate_answers(backend, loaded, tokenizer, examples, cfg, system_prompt, progress, index)
    elapsed = time.perf_counter() - start
    bias = max(loaded.first_token_bias.values(), default=0.0)
    del loaded
    gc.collect()
    return answers, elapsed, bias


def _check_kb(test, kb: dict, kb_path, test_path, adapter_run) -> None:
    """Test rows about docs the KB does not have are scored against nothing: when none of them is in it, the KB is
    not the one the data was built from (`eval` reads data.kb, not the run's). A few missing docs (deleted since)
    are scored as they are."""
    asked = sorted({d for e in test if (d := (e.meta or {}).get("doc_id"))})
    if not asked or any(d in kb for d in asked):
        return
    trained = ""
    if adapter_run is not None and (Path(adapter_run) / "manifest.json").is_file():
        trained = f"; the run was trained with {read_manifest(Path(adapter_run))['config']['data'].get('kb')}"
    raise UserError(
        f"{test_path}: none of the docs its rows ask about ({', '.join(asked[:3])}, …) is in {kb_path}: evaluate "
        f"with the KB the data was built from (--set data.kb=PATH{trained})"
    )


def _tokenizer(cfg: Config, model, adapter_run) -> ChatTokenizer:
    """The base model's tokenizer, without loading the model: grounded prompts are fitted in its tokens."""
    spec = model or cfg.model.path
    if model is None and adapter_run is not None and (Path(adapter_run) / "manifest.json").is_file():
        spec = read_manifest(Path(adapter_run))["base_model"]["path"]
    return ChatTokenizer.from_dir(local_model_dir(spec, cfg.model.cache_dir, progress=False))


def _prompt_settings(cfg: Config, adapter_run):
    """The grounded-prompt settings the adapter was trained with (its run's manifest), else the config's."""
    data = cfg.data
    if adapter_run is not None and (Path(adapter_run) / "manifest.json").is_file():
        saved = saved_prompt_settings(read_manifest(Path(adapter_run))["config"].get("data", {}))
        data = dataclasses.replace(data, **{k: v for k, v in saved.items() if k not in ("system_prompt", "mode")})
    return data


def passage_index(scorer, kb, train) -> PassageIndex:
    """The retriever over today's KB and the train questions (as data build and inference use it)."""
    return PassageIndex.from_examples(scorer, {d: doc.text for d, doc in kb.items()}, train)


def top_passage_decisions(index: PassageIndex, questions, answers: dict[str, str]) -> list[Decision]:
    """The no-LLM baseline of grounded answering: the retriever's best passage, always (it never refuses)."""
    out = []
    for hits in index.search(questions, 1):
        doc_id, score = hits[0]
        out.append(Decision(answers[doc_id], "KB_RETRIEVAL", {"doc_id": doc_id, "score": round(score, 4)}))
    return out


def guard_report(decided: list[dict], model: list[dict] | None) -> dict:
    """Who overruled the model, and whether that helped: per guard (rule, route, answerability), how many final
    answers it decided against the model's own, and in how many of those the guard's answer was the right one
    (its doc or refusal matches the expected one) while the model's was not, and the reverse."""
    if model is None:
        return {}
    out: dict[str, dict] = {}
    for final, own in zip(decided, model):
        by = (final.get("detail") or {}).get("by")
        if by == "model" or final["source"] == "MODEL_GENERATED":
            continue
        guard = by or {"RULE_OVERRIDE": "rule", "KB_RETRIEVAL": "route"}.get(final["source"], final["source"])
        right = final["predicted_doc"] == final["expected_doc"]
        model_right = own["predicted_doc"] == own["expected_doc"]
        if right == model_right and final["predicted_doc"] == own["predicted_doc"]:
            continue  # agreed with the model
        entry = out.setdefault(guard, {"overruled": 0, "guard_right_model_wrong": 0, "model_right_guard_wrong": 0})
        entry["overruled"] += 1
        entry["guard_right_model_wrong"] += right and not model_right
        entry["model_right_guard_wrong"] += model_right and not right
    return out


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
    strict: bool = False,
) -> dict:
    """Evaluate variants on the test split and write out_dir/report.{json,md,html} and the audit log.

    rules_path "config" → cfg.rules.path (skipped with a note when that file is missing); None → no keyword rules.
    `answers` may supply already generated answers per variant ({"tuned": [...]}) to skip generation.
    strict refuses a base model whose sha256 differs from the adapter run's manifest (else a warning).
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
    _check_kb(test, kb, kb_path, test_path, adapter_run)
    train, valid = _read(train_path, "train data"), _read(valid_path, "valid data")
    grounded = bool(test) and all(e.grounded for e in test)
    data_cfg = _prompt_settings(cfg, adapter_run)
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
    decider, decider_info = build_decider(
        cfg, scorer, kb, train, valid, canonical, refusal, index, rules_path, model_first=grounded
    )
    if note := deleted_note(decider_info, kb_path):
        notes["kb"] = note
    passages = passage_index(scorer, kb, train)
    if passages.missing:
        notes["passages"] = passages.missing
    if grounded:  # the prompts show what the retriever finds in today's KB (docs may have been added since)
        test = reground(test, passages, data_cfg)
        if data_cfg.prompt_tokens is not None:  # as the run's training fitted its rows
            test = fit_prompts(test, passages.kb_texts, data_cfg, prompt_length(_tokenizer(cfg, model, adapter_run)))
    questions = [e.question for e in test]
    got: dict[str, list] = dict(answers or {})
    timings: dict[str, float] = {}
    biases: dict[str, float] = {}
    if "retrieval" in variants:
        if decider.route is None:
            notes["retrieval"] = "no train split given: retrieval baseline skipped"
        else:
            got["retrieval"] = retrieval_decisions(decider.route, questions, canonical, refusal)
    if "top_passage" in variants:
        got["top_passage"] = top_passage_decisions(passages, questions, canonical)
    adapters = {"tuned": adapter_run, "base": None}
    for name in models_for(variants):
        if name not in got:
            got[name], timings[f"{name}_generate_s"], biases[name] = _generate_variant(
                cfg, model, adapters[name], test, progress, strict, passages if grounded else None
            )
        # A numbered citation names a passage of that row's prompt: from here on answers cite doc ids.
        got[name] = [with_doc_id(a, (e.meta or {}).get("passages") or [], data_cfg) for a, e in zip(got[name], test)]
    audit = []
    for name in DECIDED:
        if name in variants:
            got[name] = decider.decide(questions, got[MODEL_OF[name]])
            audit += audit_records(questions, got[MODEL_OF[name]], got[name], variant=name)
    # A model alone is scored on its answer without the citation (the citation is how it says where from).
    for name in models_for(variants):
        got[name] = [decider.cited(a)[1] for a in got[name]]
    rows = {name: score_rows(test, got[name], scorer, index) for name in variants if name in got}
    for name in (m for m in models_for(variants) if m in rows):
        for row in rows[name]:
            row["detail"] = {"by": "model"}  # the model alone carries every answer, refusals included
    for name in DECIDED:
        if name in rows:
            decider_info.setdefault("guards", {})[name] = guard_report(rows[name], rows.get(MODEL_OF[name]))
    timings["scoring_s"] = round(time.perf_counter() - start - sum(timings.values()), 1)
    meta = {
        "prompt": "grounded" if grounded else "closed_book",
        "test": str(test_path),
        "train": str(train_path),
        "valid": str(valid_path),
        "kb": str(kb_path),
        "model": str(model or cfg.model.path),
        "adapter": str(adapter_run) if adapter_run else None,
        "test_rows": len(test),
        "refusal": refusal,
        "refusal_bias": biases,  # per generated model: the logit its refusal's first token was given
        "timings": timings,
        "notes": notes,
        **decider_info,
    }
    report = build_report(rows, cfg.eval.threshold, describe(scorer), cfg.eval.worst_n, meta)
    # One generation holds the report and its audit log: they change together, and a failed evaluation changes
    # neither.
    write_report(report, out_dir, audit, cfg.rules.audit_log)
    return report
