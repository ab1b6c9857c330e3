"""`mlx-lora train`, `generate` and `fuse`: LoRA-train on a data folder, answer questions, merge an adapter."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from mlx_lora.core.errors import UserError
from mlx_lora.commands.options import build_config, config_option, set_option

_backend_choice = click.Choice(["auto", "torch", "mlx"])


def _main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports


@click.command()
@config_option
@set_option
@click.option("--backend", type=_backend_choice, help="Training backend (default: auto).")
@click.option("--model", help="Model: embedded (default), an HF folder, a .gguf file or a hub id.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False),
              help="Folder with train.jsonl and valid.jsonl (default: data.dir from the config).")
@click.option("--out", help="Run directory (default: train.out from the config).")
@click.option("--epochs", type=int)
@click.option("--max-steps", type=int)
@click.option("--resume", type=click.Path(exists=True, file_okay=False),
              help="Continue from a checkpoint folder (run/checkpoints/step-N) or a run folder's newest one.")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
def train(config_path, overrides, backend, model, data_dir, out, epochs, max_steps, resume, no_progress):
    """LoRA-train a model on DATA (any supported chat JSONL) into a run directory."""
    from mlx_lora.training.run import train_run

    cfg = build_config(config_path, overrides, backend__name=backend, model__path=model, train__out=out,
                       train__epochs=epochs, train__max_steps=max_steps)
    run_dir = Path(cfg.train.out)
    outcome = train_run(cfg, data_dir or cfg.data.dir, run_dir, resume=Path(resume) if resume else None,
                        progress=not no_progress)
    if not _main_process():
        return
    best = f"{outcome.best_eval_loss:.4f} at step {outcome.best_step}" if outcome.best_eval_loss is not None else "-"
    click.echo(f"run: {run_dir}  stopped: {outcome.stopped}  steps: {outcome.steps}  best eval loss: {best}")
    if outcome.stopped == "interrupted":
        click.echo(f"resume with: mlx-lora train --out {run_dir} --resume {run_dir}  (same config and data)")
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        health = json.loads(summary_path.read_text(encoding="utf-8")).get("health", {})
        click.echo(f"health: {health.get('verdict', '?')}")
        for flag in health.get("flags", []):
            click.echo(f"  - {flag['code']}: {flag['message']}")
    if outcome.stopped == "interrupted":  # checkpointed, but not finished: scripts must not read it as success
        raise SystemExit(130)


class _Streamer:
    """Prints each new piece of text as tokens arrive; holds back a half-decoded multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, index: int, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text


@click.command()
@config_option
@set_option
@click.argument("questions", nargs=-1, required=True)
@click.option("--model", help="Base model (default: the adapter run's, else the config's).")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), help="Run directory or adapter folder.")
@click.option("--rules", "rules_path", type=click.Path(exists=True, dir_okay=False),
              help="YAML rule file: rules may override an off-topic answer with the KB's (source is shown).")
@click.option("--backend", type=_backend_choice, help="Generation backend (default: auto).")
@click.option("--max-new-tokens", type=int)
@click.option("--temperature", type=float, help="0 = greedy (default).")
@click.option("--top-p", type=float)
@click.option("--repetition-penalty", type=float)
@click.option("--no-progress", is_flag=True)
def generate(config_path, overrides, questions, model, adapter, rules_path, backend, max_new_tokens, temperature,
             top_p, repetition_penalty, no_progress):
    """Answer QUESTIONS with the model (plus adapter), streaming tokens to stdout."""
    from mlx_lora.training.run import load_for_generation

    cfg = build_config(config_path, overrides, backend__name=backend, generate__max_new_tokens=max_new_tokens,
                       generate__temperature=temperature, generate__top_p=top_p,
                       generate__repetition_penalty=repetition_penalty)
    if rules_path:  # a broken rules file fails now, not after the model has loaded and answered
        from mlx_lora.data.kb import load_kb
        from mlx_lora.answer.rules import load_rules

        load_rules(rules_path, load_kb(cfg.data.kb))
    backend_, loaded, tokenizer, system_prompt = load_for_generation(model, adapter, cfg, progress=not no_progress)
    stops = tokenizer.stop_ids()
    answers = []
    for question in questions:
        prompt = tokenizer.prompt_ids([{"role": "user", "content": question}], system_prompt)
        streamer = None if rules_path else _Streamer(tokenizer)  # with rules, the final answer may differ
        (ids,) = backend_.generate(loaded, [prompt], cfg.generate, stops, on_token=streamer)
        answers.append(tokenizer.decode(ids).strip())
        if streamer is not None:
            click.echo("")
    if rules_path:
        _apply_rules(cfg, rules_path, list(questions), answers, adapter)


def _apply_rules(cfg, rules_path, questions: list[str], answers: list[str], adapter) -> None:
    """The rule layer decides the final answer and its source; the audit log records each decision."""
    try:
        from mlx_lora.evaluation.run import build_layer, doc_answers, refusal_text
        from mlx_lora.data.formats import read_examples
        from mlx_lora.data.kb import load_kb
        from mlx_lora.answer.rules import append_audit, audit_records
        from mlx_lora.data.similarity import answer_index, make_scorer
    except ImportError as exc:
        raise UserError(f"--rules needs the rule layer, which this install lacks ({exc})") from None
    kb = load_kb(cfg.data.kb)
    data = Path(cfg.data.dir)
    train = read_examples(data / "train.jsonl") if (data / "train.jsonl").is_file() else []
    valid = read_examples(data / "valid.jsonl") if (data / "valid.jsonl").is_file() else []
    answers_by_doc = doc_answers(kb, train, cfg.data.answer_prefix)
    refusal = refusal_text(train, cfg)
    scorer = make_scorer(cfg.eval.embedder)
    index = answer_index(scorer, answers_by_doc, refusal)
    layer, _ = build_layer(cfg, scorer, kb, train, valid, answers_by_doc, refusal, index, rules_path)
    decisions = layer.decide(questions, answers)
    for decision in decisions:
        click.echo(decision.answer or "")
        click.echo(f"[{decision.source}] {json.dumps(decision.detail, ensure_ascii=False)}", err=True)
    log = Path(adapter) / cfg.rules.audit_log if adapter and Path(adapter, "manifest.json").is_file() \
        else Path(cfg.rules.audit_log)
    append_audit(log, audit_records(questions, answers, decisions, command="generate"))


@click.command()
@config_option
@set_option
@click.option("--model", help="Base model (default: the adapter run's).")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), required=True,
              help="Run directory or adapter folder (PEFT or MLX format).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder for the merged model.")
@click.option("--backend", type=_backend_choice, help="Backend that merges (default: auto).")
def fuse(config_path, overrides, model, adapter, out, backend):
    """Merge an adapter into its base model; the output folder loads in transformers and mlx-lm."""
    from mlx_lora.training.run import load_for_generation

    cfg = build_config(config_path, overrides, backend__name=backend)
    if cfg.model.dtype == "auto":
        cfg.model.dtype = "float32"  # merge at full precision: a bf16 sum would round the adapter away
    if Path(out).exists() and any(Path(out).iterdir()):
        raise UserError(f"{out}: output folder is not empty; choose a new --out")
    backend_, loaded, _, _ = load_for_generation(model, adapter, cfg, progress=True)
    if not hasattr(backend_, "fuse"):
        raise UserError(f"backend {backend_.name} cannot fuse; use --backend torch")
    click.echo(f"fused model: {backend_.fuse(loaded, Path(out))}")
