"""`mlx-lora rules check|test`: validate a rules YAML against the KB; try it on one question."""

from __future__ import annotations

import json

import click

from mlx_lora.commands.options import build_config, config_option, set_option


@click.group()
def rules():
    """Check and try the YAML rule layer."""


def _target(rule) -> str:
    """What a rule answers with: → doc (override), + doc (append), or refuse."""
    return "refuse" if rule.action == "refuse" else f"{'+' if rule.action == 'append' else '→'} {rule.doc_id}"


def _kb(config_path, overrides, kb):
    from mlx_lora.data.kb import load_kb

    cfg = build_config(config_path, overrides, samples=("kb",), data__kb=kb)  # the rules file is named: no fallback
    return cfg, load_kb(cfg.data.kb)


@rules.command()
@config_option
@set_option
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--kb", help="KB JSONL whose doc ids the rules must use (default data.kb).")
def check(config_path, overrides, file, kb):
    """Validate FILE: syntax, known doc ids, actions (override/refuse/append), safe (RE2) patterns.

    Every error names file:line."""
    from mlx_lora.answer.rules import load_rules

    _, docs = _kb(config_path, overrides, kb)
    loaded = load_rules(file, docs)
    covered = {r.doc_id for r in loaded if r.action == "override"}
    refusing = sum(r.action == "refuse" for r in loaded)
    click.echo(
        f"{file}: {len(loaded)} rules OK, overriding with {len(covered)} of {len(docs)} KB docs"
        + (f", {refusing} refusing" if refusing else "")
    )
    for rule in sorted(loaded, key=lambda r: -r.priority):
        click.echo(
            f"  {rule.id:<24} {_target(rule):<34} priority {rule.priority:>3}  "
            f"{len(rule.keywords)} keywords, {len(rule.regex)} regex, {len(rule.unless)} unless"
        )
    missing = [d for d in docs if d not in covered]
    if missing:
        click.echo(f"  no rule for: {', '.join(missing)}")


@rules.command()
@config_option
@set_option
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("question")
@click.argument("model_answer", required=False)
@click.option("--kb", help="KB JSONL (default data.kb).")
@click.option("--embedder", help="use (default) | char | a sentence-transformers model: for KB_MATCH.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON (as in the audit log).")
def test(config_path, overrides, file, question, model_answer, kb, embedder, as_json):
    """Which rules match QUESTION, and what the answer decider answers given MODEL_ANSWER (optional)."""
    from mlx_lora.answer.audit import audit_records
    from mlx_lora.answer.build import doc_answers, refusal_text
    from mlx_lora.answer.decide import Decider
    from mlx_lora.answer.rules import load_rules, match_rules
    from mlx_lora.data.similarity import answer_index, make_scorer

    cfg, docs = _kb(config_path, overrides, kb)
    if embedder:
        cfg.eval.embedder = embedder
    loaded = load_rules(file, docs)
    found = match_rules(loaded, question)
    answers = doc_answers(docs, [], cfg.data.answer_prefix)
    refusal = refusal_text([], cfg)
    scorer = make_scorer(cfg.eval.embedder) if model_answer is not None else make_scorer("char")
    decider = Decider(loaded, answers, answer_index(scorer, answers, refusal), refusal, cfg.rules.kb_match_threshold)
    decision = decider.decide([question], [model_answer])[0]
    if as_json:
        click.echo(json.dumps(audit_records([question], [model_answer], [decision])[0], ensure_ascii=False))
        return
    if found:
        for rule, why in found:
            click.echo(f"match: {rule.id} {_target(rule)} (priority {rule.priority}; {why})")
    else:
        click.echo("match: no rule")
    click.echo(f"source: {decision.source}")
    click.echo(f"detail: {json.dumps(decision.detail, ensure_ascii=False)}")
    click.echo(f"answer: {decision.answer if decision.answer is not None else '(the model would answer)'}")
