"""`train` end to end: model → tokenizer → encoded rows → the shared loop on a backend's engine → run folder."""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict
from pathlib import Path

from mlx_lora import backends
from mlx_lora.backends.loading import answer_budget
from mlx_lora.core.config import Config
from mlx_lora.core.environment import main_process, versions
from mlx_lora.core.errors import UserError
from mlx_lora.core.files import locked, sha256_of_files, write_json
from mlx_lora.core.model_store import local_model_dir, model_sha256
from mlx_lora.data.batching import decision_weight
from mlx_lora.data.fitting import AUTO_MAX_LENGTH, fit_rows, prompt_length, with_lengths
from mlx_lora.data.formats import encode_rows, length_warnings, read_examples
from mlx_lora.data.render import ChatTokenizer
from mlx_lora.training import card, checkpoints, events, loop, refusal_bias, summary
from mlx_lora.training.listeners import standard_listeners
from mlx_lora.training.loop import TrainOutcome

# Above this many new tokens an answer budget is worth a note: ~5x the sample's (108); benchmarks/kb3's long texts
# give 575 and print it, a KB text of thousands of tokens lets every run-on answer run to thousands.
LONG_ANSWER_BUDGET = 512


def _data_files(data_dir: Path) -> tuple[Path, Path]:
    train, valid = data_dir / "train.jsonl", data_dir / "valid.jsonl"
    for path in (train, valid):
        if not path.is_file():
            raise UserError(
                f"{path}: missing; a data directory holds train.jsonl and valid.jsonl "
                "(build one with `mlx-lora data build`)"
            )
    return train, valid


def manifest(cfg: Config, backend_name: str, model_dir: Path, data_files: list[Path], stats: dict) -> dict:
    return {
        "config": cfg.to_dict(),
        "backend": backend_name,
        "base_model": {
            "spec": cfg.model.path,
            "path": str(model_dir),
            "sha256": model_sha256(model_dir, cfg.model.cache_dir),
        },
        "data": {"files": [str(p) for p in data_files], "sha256": sha256_of_files(data_files), **stats},
        "system_prompt": cfg.data.system_prompt,
        "adapter_format": "mlx" if backend_name == "mlx" else "peft",
        "platform": f"{sys.platform}-{platform.machine()}",
        "versions": versions(),
    }


def resume_fingerprint(run: dict) -> dict:
    """What must not change between a checkpoint and its resume: the data, the base model, the LoRA layout
    (the loop adds the batch settings). Same shapes are not enough: other data or another model of the same
    architecture would silently continue from weights trained on something else."""
    lora, train = run["config"]["lora"], run["config"]["train"]
    fingerprint = {
        "data_sha256": run["data"]["sha256"],
        "base_model_sha256": run["base_model"]["sha256"],
        "lora": {k: lora[k] for k in sorted(lora)},
        "max_length": train["max_length"],
        "first_token_weight": train.get("first_token_weight", 1.0),
    }
    if train.get("first_tokens", 1) != 1:  # only when set: checkpoints from before the key (1, implicitly) resume
        fingerprint["first_tokens"] = train["first_tokens"]
    return fingerprint


def train_run(
    cfg: Config, data_dir: str | Path, run_dir: str | Path, resume: Path | None = None, progress: bool = True
) -> TrainOutcome:
    """Train a LoRA adapter on data_dir/{train,valid}.jsonl into run_dir; returns how the run ended."""
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    train_file, valid_file = _data_files(data_dir)
    backend = backends.resolve(cfg.backend.name)
    model_dir = local_model_dir(cfg.model.path, cfg.model.cache_dir, progress)
    tokenizer = ChatTokenizer.from_dir(model_dir)
    rows, kept, labels, dropped, warnings = {}, {}, {}, 0, []
    read = {path: read_examples(path) for path in (train_file, valid_file)}
    # Kept with the run (manifest): inference fits its prompts to the same budget.
    automatic = cfg.train.max_length is None
    fitted = with_lengths(cfg, tokenizer, read[train_file] + read[valid_file])
    cfg.train, cfg.data = fitted.train, fitted.data
    if automatic and cfg.train.max_length > AUTO_MAX_LENGTH and main_process():
        print(
            f"note: train.max_length null → {cfg.train.max_length} tokens: room for the longest answer after the "
            "longest KB text shown whole (training time grows with it; set train.max_length to cap it)",
            file=sys.stderr,
        )
    for path in (train_file, valid_file):
        examples, notes = fit_rows(read[path], prompt_length(tokenizer), cfg.data, path, cfg.train.max_length)
        kept[path] = examples
        encoded = encode_rows(tokenizer, examples, cfg.train.max_length)
        warnings += notes
        warnings += length_warnings(path, encoded, cfg.train.max_length)
        rows[path] = [r for r in encoded if r.supervised > 0]
        labels[path] = [refusal_bias.label(e) for e, r in zip(examples, encoded) if r.supervised > 0]
        dropped += len(encoded) - len(rows[path])
    if main_process():  # before training starts: cut and dropped rows used to show only in manifest.json
        for warning in warnings:
            print(warning, file=sys.stderr)
    train, valid = rows[train_file], rows[valid_file]
    if not train:
        raise UserError(f"{train_file}: no row has an assistant token left within train.max_length")
    if cfg.train.first_token_weight is None:  # kept with the run (manifest) as the number it resolves to
        cfg.train.first_token_weight = decision_weight(train, cfg.train.first_tokens)
    stats = {
        "train_rows": len(train),
        "valid_rows": len(valid),
        "dropped_rows": dropped,
        "supervised_tokens": sum(r.supervised for r in train),
        # what generate.max_new_tokens: null reads (backends/loading.answer_budget)
        "longest_answer_tokens": max(r.supervised for r in train + valid),
        "tokens": sum(len(r.ids) for r in train),
    }
    budget = answer_budget(cfg.generate.max_new_tokens, {"data": stats})
    if budget > LONG_ANSWER_BUDGET and main_process():  # each run-on answer (eval's base model) decodes that far
        print(
            f"note: answers may take up to {budget} new tokens ({stats['longest_answer_tokens']} in the longest "
            "trained answer; generate.max_new_tokens caps them): a model that runs on instead of stopping — eval's "
            "base-model baseline often does — decodes that many per row",
            file=sys.stderr,
        )
    run = manifest(cfg, backend.name, model_dir, [train_file, valid_file], stats)
    # The refusal's first token: each valid pass also scores it, so the bias needs no second pass over valid.
    found = refusal_bias.refusal_token(tokenizer, [*kept[valid_file], *kept[train_file]])
    token = None if found is None or cfg.generate.refusal_bias is not None else found[1]
    if not main_process():  # torchrun: rank 0 locks the folder and writes every file
        return _train(backend, model_dir, train, valid, cfg, run_dir, run, resume, lambda event: None, token)
    with locked(run_dir, "training run"):
        if resume is None and ((run_dir / "adapter").exists() or checkpoints.list_checkpoints(run_dir / "checkpoints")):
            raise UserError(
                f"{run_dir}: already holds a run; pass --resume {run_dir} to continue it, or choose another --out"
            )
        listeners = standard_listeners(run_dir, progress, cfg.train.report_to)

        def on_event(event: events.Event) -> None:
            # The manifest describes the run only once the model, LoRA and any resume check have passed: written
            # earlier, a failed resume with other settings would leave the old adapter under a manifest that no
            # longer fits it.
            if isinstance(event, events.Start):
                write_json(run_dir / "manifest.json", run)
            listeners(event)

        outcome = _train(backend, model_dir, train, valid, cfg, run_dir, run, resume, on_event, token)
        if outcome.stopped in ("completed", "max_steps", "early_stopped"):
            (run_dir / refusal_bias.FILE).unlink(missing_ok=True)  # a resumed run's old one no longer fits
            scored = None
            if outcome.valid_margins is not None:
                scored = (outcome.valid_margins, labels[valid_file])
            calibration = refusal_bias.calibrate(
                backend, model_dir, run_dir, kept[valid_file], kept[train_file], tokenizer, cfg, scored
            )
            if calibration is not None:
                outcome.extra["refusal_bias"] = calibration
        summary.finish(run_dir, outcome)
        card.write_model_card(run_dir)  # what is known now; `run` rewrites it with the evaluation
    return outcome


def _train(backend, model_dir, train, valid, cfg, run_dir, run, resume, on_event, token) -> TrainOutcome:
    loaded = backend.load(model_dir, None, cfg)
    fingerprint = resume_fingerprint(run)
    return loop.train(backend, loaded, train, valid, cfg, run_dir, on_event, resume, fingerprint, token)


def describe_outcome(outcome: TrainOutcome) -> dict:
    described = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(outcome).items()}
    described.pop("valid_margins", None)  # one number per valid row: calibration.json keeps what they decided
    return described
