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
    cfg = build_config(config_path, overrides, data__kb=kb, data__questions=questions, data__dir=out,
                       data__seed=seed, data__format=fmt, data__extra_questions=extra_questions)
    stats = build_data(cfg.data)
    print_stats(stats, cfg.data.dir)


def build_data(data_cfg) -> dict:
    """Load and validate the KB and bank, split, write; returns the statistics."""
    from mlx_lora.data.dataset import build_splits, load_extra_questions, write_splits
    from mlx_lora.data.kb import load_kb
    from mlx_lora.data.questions import load_questions

    kb = load_kb(data_cfg.kb)
    bank = load_questions(data_cfg.questions, kb)
    extra = load_extra_questions(data_cfg.extra_questions, kb) if data_cfg.extra_questions else None
    stats = write_splits(build_splits(kb, bank, data_cfg, extra), data_cfg.dir, data_cfg)
    stats["docs_without_questions"] = [d for d in kb if not bank.phrasings(d) and not (extra or {}).get(d)]
    return stats


def print_stats(stats: dict, out_dir) -> None:
    click.echo(f"wrote {out_dir}/train.jsonl, valid.jsonl, test.jsonl, stats.json")
    click.echo(f"{'split':<6} {'rows':>5} {'answerable':>10} {'unanswerable':>12} {'docs':>5}")
    for name, s in stats["splits"].items():
        click.echo(f"{name:<6} {s['rows']:>5} {s['answerable']:>10} {s['unanswerable']:>12} {len(s['per_doc']):>5}")
    for name, o in stats["overlap"].items():
        click.echo(f"{name} vs train: exact overlap {o['exact_overlap']}, near-duplicates (≥80% chars) "
                   f"{o['near_duplicates']}/{o['rows']} ({o['near_duplicate_pct']}%)")
    if stats.get("docs_without_questions"):
        click.echo(f"warning: no questions for {', '.join(stats['docs_without_questions'])} in the question bank: "
                   "the model never learns these docs; add phrasings under docs:", err=True)


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
        stats.update(tokens=sum(lengths), supervised_tokens=sum(r.supervised for r in rows),
                     max_tokens=lengths[-1] if lengths else 0, median_tokens=lengths[len(lengths) // 2] if lengths else 0,
                     dropped_after_truncation=dropped)
    click.echo(json.dumps({"path": str(path), **stats}, ensure_ascii=False, indent=2))
