"""`mlx-lora data build|check`: ChatML splits from a KB and question bank; validation of any chat JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlx_lora.commands.options import build_config, config_option, set_option


@click.group()
def data():
    """Build and check chat datasets."""


@data.command()
@config_option
@set_option
@click.option("--kb", help="KB JSONL of {doc_id, text, text_hash}.")
@click.option("--questions", help="Question bank YAML.")
@click.option("--out", help="Output directory for train/valid/test.jsonl.")
@click.option("--seed", type=int, help="Seed for the split (same seed → same files).")
@click.option("--format", "fmt", type=click.Choice(["messages", "text"]), help="Row format (default messages).")
@click.option("--extra-questions", help="YAML {doc_id: [question]} of extra training questions (from diagnose).")
def build(config_path, overrides, kb, questions, out, seed, fmt, extra_questions):
    """Write train/valid/test.jsonl (no question shared between splits) and stats.json."""
    from mlx_lora.data.dataset import build_data, format_stats, stats_warnings

    cfg = build_config(
        config_path,
        overrides,
        samples=("kb", "questions"),  # no rules: the note names only what data build reads
        data__kb=kb,
        data__questions=questions,
        data__dir=out,
        data__seed=seed,
        data__format=fmt,
        data__extra_questions=extra_questions,
    )
    stats = build_data(cfg.data, cfg.eval.embedder)
    click.echo(format_stats(stats, cfg.data.dir))
    for warning in stats_warnings(stats):
        click.echo(warning, err=True)
    _length_warnings(cfg)


def _length_warnings(cfg) -> None:
    """Rows longer than train.max_length, said now when the model's tokenizer is at hand without preparing the
    model (`train` says it in any case)."""
    from mlx_lora.core.model_store import prepared_model_dir
    from mlx_lora.data.fitting import data_length_warnings
    from mlx_lora.data.render import ChatTokenizer

    model_dir = prepared_model_dir(cfg.model.path, cfg.model.cache_dir)
    if model_dir is not None:
        tokenizer = ChatTokenizer.from_dir(model_dir)
        for warning in data_length_warnings(cfg.data.dir, tokenizer, cfg):
            click.echo(warning, err=True)


@data.command()
@click.argument("path", type=click.Path())
@click.option("--model", help="Model folder whose tokenizer counts tokens and checks masks (optional).")
@click.option("--max-length", type=int, default=192, show_default=True)
def check(path, model, max_length):
    """Validate a JSONL dataset (text / messages / prompt-completion / OpenAI chat) and print stats."""
    from mlx_lora.data.formats import describe, encode_all, read_examples

    examples = read_examples(path)
    stats = describe(examples)
    if model:
        from mlx_lora.data.render import ChatTokenizer

        rows, dropped = encode_all(ChatTokenizer.from_dir(Path(model)), examples, max_length)
        lengths = sorted(len(r.ids) for r in rows)
        stats.update(
            tokens=sum(lengths),
            supervised_tokens=sum(r.supervised for r in rows),
            max_tokens=lengths[-1] if lengths else 0,
            median_tokens=lengths[len(lengths) // 2] if lengths else 0,
            dropped_after_truncation=dropped,
        )
    click.echo(json.dumps({"path": str(path), **stats}, ensure_ascii=False, indent=2))
