"""`mlx-lora generate`: answer questions with a model (plus adapter), streamed, or decided with --rules."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mlx_lora.commands.options import backend_choice, build_config, config_option, set_option, use_samples
from mlx_lora.core.errors import UserError
from mlx_lora.data.fitting import prompt_length
from mlx_lora.data.grounded import familiar, parse_citation, with_doc_id


class _Streamer:
    """Prints each new piece of text as tokens arrive; holds back a half-decoded multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, index: int, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[len(self.shown) :])
        sys.stdout.flush()
        self.shown = text


@click.command()
@config_option
@set_option
@click.argument("questions", nargs=-1, required=True)
@click.option("--model", help="Base model (default: the adapter run's, else the config's).")
@click.option(
    "--adapter",
    "--adapter-path",
    "adapter",
    type=click.Path(exists=True, file_okay=False),
    help="Run directory or adapter folder (--adapter-path is mlx-lm's name).",
)
@click.option(
    "--rules",
    "rules_path",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML rule file: rules may override an off-topic answer with the KB's (source is shown).",
)
@click.option("--backend", type=backend_choice, help="Generation backend (default: auto).")
@click.option(
    "--max-new-tokens",
    "--max-tokens",
    "max_new_tokens",
    type=int,
    help="The longest answer, in tokens (default: generate.max_new_tokens). --max-tokens is mlx-lm's name.",
)
@click.option(
    "--temperature", "--temp", "temperature", type=float, help="0 = greedy (default). --temp is mlx-lm's name."
)
@click.option(
    "--top-p",
    type=float,
    help="Nucleus sampling: draw from the most likely tokens whose probabilities add up to P (with --temperature > 0).",
)
@click.option("--repetition-penalty", type=float, help="Above 1 makes repeating a token less likely (1 = off).")
@click.option("--no-progress", is_flag=True)
@click.option(
    "--strict", is_flag=True, help="Refuse, instead of warning, a base model that differs from the run's manifest."
)
def generate(
    config_path,
    overrides,
    questions,
    model,
    adapter,
    rules_path,
    backend,
    max_new_tokens,
    temperature,
    top_p,
    repetition_penalty,
    no_progress,
    strict,
):
    """Answer QUESTIONS with the model (plus adapter), streaming tokens to stdout."""
    from mlx_lora.answer.service import grounded_prompt, grounding
    from mlx_lora.backends.loading import load_for_generation

    cfg = build_config(
        config_path,
        overrides,
        samples=False,  # the KB is read only with --rules or in grounded mode
        backend__name=backend,
        generate__max_new_tokens=max_new_tokens,
        generate__temperature=temperature,
        generate__top_p=top_p,
        generate__repetition_penalty=repetition_penalty,
    )
    if rules_path or cfg.data.mode == "grounded":
        use_samples(cfg, reads=("kb", "questions"))  # --rules names its file: no fallback for it
    if rules_path:  # a broken rules file fails now, not after the model has loaded and answered
        from mlx_lora.answer.rules import load_rules
        from mlx_lora.data.kb import load_kb

        load_rules(rules_path, load_kb(cfg.data.kb))
    backend_, loaded, tokenizer, system_prompt = load_for_generation(
        model, adapter, cfg, progress=not no_progress, strict=strict
    )
    stops = tokenizer.stop_ids()
    answers = []
    index = grounding(cfg, adapter) if cfg.data.mode == "grounded" else None
    for question in questions:
        if index is not None:
            content, shown = grounded_prompt(index, question, cfg.data, prompt_length(tokenizer), system_prompt)
        else:
            content, shown = question, []
        prompt = tokenizer.prompt_ids([{"role": "user", "content": content}], system_prompt)
        streamer = None if rules_path else _Streamer(tokenizer)  # with rules, the final answer may differ
        biased = [familiar(shown, index)]
        (ids,) = backend_.generate(loaded, [prompt], cfg.generate, stops, on_token=streamer, biased=biased)
        raw = tokenizer.decode(ids).strip()
        answers.append(with_doc_id(raw, shown, cfg.data))  # "[2] …" names the prompt's second passage
        if streamer is not None:
            click.echo("")
            if answers[-1] != raw:
                click.echo(f"(cites {parse_citation(raw)[0]}: {parse_citation(answers[-1])[0]})", err=True)
    if rules_path:
        _apply_rules(cfg, rules_path, list(questions), answers, adapter)


def _apply_rules(cfg, rules_path, questions: list[str], answers: list[str], adapter) -> None:
    """The answer decider gives the final answer and its source; the audit log records each decision."""
    try:
        from mlx_lora.answer.audit import append_audit, audit_records
        from mlx_lora.answer.service import build_answering
    except ImportError as exc:
        raise UserError(f"--rules needs the rule layer, which this install lacks ({exc})") from None
    answering = build_answering(cfg, adapter, rules_path)
    for note in answering.notes:
        click.echo(f"note: {note}", err=True)
    decisions = answering.decide(questions, answers)
    for decision in decisions:
        click.echo(decision.answer or "")
        click.echo(f"[{decision.source}] {json.dumps(decision.detail, ensure_ascii=False)}", err=True)
    log = (
        Path(adapter) / cfg.rules.audit_log
        if adapter and Path(adapter, "manifest.json").is_file()
        else Path(cfg.rules.audit_log)
    )
    append_audit(log, audit_records(questions, answers, decisions, command="generate"))
