"""The baselines, measured in the same run: a seed-style Hugging Face Trainer and mlx-lm's own LoRA trainer."""

from __future__ import annotations

import functools
import gc
import tempfile
import time
import types
from pathlib import Path

from benchmarks import measure
from benchmarks.training import NativeMemory
from mlx_lora.core.config import Config
from mlx_lora.data.render import Encoded

SEED_PAD_TO = 192  # the seed tokenized with padding="max_length", max_length=192
HF_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def seed_collator(pad_id: int, log: list[dict], pad_to: int = SEED_PAD_TO):
    """What the seed's DataCollatorForLanguageModeling(mlm=False) did with pad = eos: every row padded to
    192, labels = input_ids with every pad-id position set to -100 (so the real <|im_end|> tokens lose their
    loss too) and the loss on every other token, prompt included. Logs each micro-batch's token counts."""
    import torch

    def collate(rows: list[dict]) -> dict:
        ids = torch.full((len(rows), pad_to), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), pad_to), dtype=torch.long)
        for k, row in enumerate(rows):
            n = min(len(row["ids"]), pad_to)
            ids[k, :n] = torch.tensor(row["ids"][:n])
            attention[k, :n] = 1
        labels = ids.clone()
        labels[labels == pad_id] = -100
        log.append(
            {
                "tokens": int(attention.sum()),
                "computed": len(rows) * pad_to,
                "head": len(rows) * pad_to,  # logits for every position, padding included
                "supervised": sum(sum(r["mask"][1:pad_to]) for r in rows),
            }
        )
        return {"input_ids": ids, "attention_mask": attention, "labels": labels}

    return collate


def tuned_collator(pad_id: int, log: list[dict]):
    """What a user who configures the Trainer well feeds it (DataCollatorForSeq2Seq / TRL's completion-only
    collator): each batch padded to its own longest row, labels only on the answer tokens (our mask), the pad
    positions masked by the attention mask. Logs each micro-batch's token counts."""
    import torch

    def collate(rows: list[dict]) -> dict:
        width = max(len(row["input_ids"]) for row in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for k, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[k, :n] = torch.tensor(row["input_ids"])
            attention[k, :n] = 1
            answer = torch.tensor(row["mask"], dtype=torch.bool)
            labels[k, :n] = torch.where(answer, ids[k, :n], torch.tensor(-100))
        log.append(
            {
                "tokens": int(attention.sum()),
                "computed": len(rows) * width,
                "head": len(rows) * width,  # the Trainer's model computes logits for every position
                "supervised": sum(sum(r["mask"][1:]) for r in rows),
            }
        )
        return {"input_ids": ids, "attention_mask": attention, "labels": labels}

    return collate


def _length_grouped(arguments) -> dict:
    """Length-grouped batches, in the spelling of the installed transformers (renamed in 5.x)."""
    import inspect

    names = inspect.signature(arguments).parameters
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def hf_trainer(
    model_dir: Path,
    rows: list[Encoded],
    cfg: Config,
    steps: int,
    warmup: int,
    device: str,
    eos_id: int,
    style: str = "seed",
    precision: str = "fp32",
    valid: list[Encoded] | None = None,
) -> dict:
    """`warmup + steps` optimizer steps of transformers' Trainer + PEFT LoRA with the same hyper-parameters.

    style "seed": the seed's setup (pad to 192, loss on every token). style "tuned": dynamic padding,
    length-grouped batches, loss on the answer tokens only. precision "bf16": the base weights loaded in bf16 and
    the Trainer's bf16 autocast (PEFT keeps the LoRA weights fp32), what a user does on a CPU with bf16 units.
    With `valid`, the answer-only valid loss after training (training.answer_loss, as for our loop)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from benchmarks.training import answer_loss
    from mlx_lora.backends.torch.lora import peft_config  # the same PEFT LoRA settings our torch backend uses

    t = cfg.train
    native = NativeMemory("torch", device)
    measure.reset_peak_rss()
    native.reset()
    tic = time.perf_counter()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, trust_remote_code=False)
    torch.manual_seed(t.seed)
    model = get_peft_model(model, peft_config(cfg.lora, model))
    load_s = time.perf_counter() - tic
    batches: list[dict] = []
    marks: list[tuple[float, float | None]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append((time.perf_counter(), None))

        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), None))

    with tempfile.TemporaryDirectory(prefix="mlx-lora-bench-hf-") as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=t.batch_size,
            gradient_accumulation_steps=t.grad_accum,
            learning_rate=t.lr,
            warmup_steps=t.warmup_steps,
            lr_scheduler_type=HF_SCHEDULES[t.schedule],
            max_grad_norm=t.max_grad_norm,
            weight_decay=t.weight_decay,
            max_steps=warmup + steps,
            seed=t.seed,
            logging_steps=10**6,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            use_cpu=device == "cpu",
            bf16=precision == "bf16",
            **(_length_grouped(TrainingArguments) if style == "tuned" else {}),
        )
        if style == "tuned":
            data = [{"input_ids": r.ids, "mask": r.mask} for r in rows]
            collator = tuned_collator(eos_id, batches)
        else:
            data = [{"ids": r.ids, "mask": r.mask} for r in rows]
            collator = seed_collator(eos_id, batches)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[Clock()])
        result = trainer.train()
    per_step = []
    for k in range(1, len(marks)):
        group = batches[(k - 1) * t.grad_accum : k * t.grad_accum]
        counts = {key: sum(b[key] for b in group) for key in ("tokens", "supervised", "computed", "head")}
        per_step.append({"s": marks[k][0] - marks[k - 1][0], **counts})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = {
        "load_s": load_s,
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "train_loss_mean": result.training_loss,
        "peak_rss_mb": measure.peak_rss_mb(),
        **native.read(),
        "steps_raw": per_step,
        "precision": precision,
    }
    if valid:
        row["valid_answer_loss"] = answer_loss(model, valid, eos_id, precision == "bf16")
    del trainer, model
    gc.collect()
    return row


def mlx_lm_lora(model_dir: Path, data_dir: Path, cfg: Config, steps: int, warmup: int) -> dict:
    """mlx-lm's own `lora` training path (mlx_lm.lora.train_model: its LoRA layers, compiled step, batching),
    configured like ours; iterations are micro-batches, grad_accum of them make one optimizer step."""
    import mlx.core as mx
    from mlx_lm import lora as mlx_lora_cli
    from mlx_lm.tuner import trainer as mlx_trainer
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.utils import load

    from mlx_lora.backends.mlx.lora import lora_settings  # our MLX backend's translation of the LoRA config

    t = cfg.train
    native = NativeMemory("mlx", "cpu")
    measure.reset_peak_rss()
    native.reset()
    tic = time.perf_counter()
    model, tokenizer = load(str(model_dir))
    load_s = time.perf_counter() - tic
    lora = lora_settings(model, cfg.lora)  # rank, scale = alpha/rank, dropout, mlx-lm keys, num_layers
    shapes: list[dict] = []
    original_iterate = mlx_trainer.iterate_batches

    def recording_iterate(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        # Only the training iterator loops; evaluation batches are not recorded.
        for batch, lengths in original_iterate(dataset, batch_size, max_seq_length, loop, seed, comm_group):
            if loop:
                spans = lengths.tolist()  # (prompt offset, length): targets after the prompt carry the loss
                shapes.append(
                    {
                        "tokens": sum(n for _, n in spans),
                        "supervised": sum(n - o for o, n in spans),
                        "computed": batch.shape[0] * (batch.shape[1] - 1),
                        "head": batch.shape[0] * (batch.shape[1] - 1),
                    }
                )  # mlx-lm takes all logits
            yield batch, lengths

    reports: list[dict] = []

    class Reports(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(info)

    with tempfile.TemporaryDirectory(prefix="mlx-lora-bench-mlxlm-") as out:
        args = types.SimpleNamespace(
            **{
                **mlx_lora_cli.CONFIG_DEFAULTS,
                "model": str(model_dir),
                "data": str(data_dir),
                "train": True,
                "fine_tune_type": "dora" if lora["dora"] else "lora",
                "mask_prompt": True,
                "num_layers": lora["num_layers"],
                "batch_size": t.batch_size,
                "grad_accumulation_steps": t.grad_accum,
                "iters": (warmup + steps) * t.grad_accum,
                "learning_rate": t.lr,
                "max_seq_length": t.max_length,
                "steps_per_report": 1,
                "steps_per_eval": 10**9,
                "val_batches": 1,
                "save_every": 10**9,
                "adapter_path": out,
                "optimizer": "adamw",
                "seed": t.seed,
                "optimizer_config": {"adamw": {"weight_decay": t.weight_decay}},
                "lora_parameters": {k: lora[k] for k in ("rank", "scale", "dropout", "keys")},
            }
        )
        train_set, valid_set, _ = load_dataset(args, tokenizer)
        # train_model calls the module-level `train`; hand it mlx-lm's own iterator, wrapped to record shapes.
        original_train = mlx_lora_cli.train
        mlx_lora_cli.train = functools.partial(mlx_trainer.train, iterate_batches=recording_iterate)
        try:
            mlx_lora_cli.train_model(args, model, train_set, valid_set, Reports())
        finally:
            mlx_lora_cli.train = original_train
    per_step = []
    ga = t.grad_accum
    for k in range(len(reports) // ga):
        its, group = reports[k * ga : (k + 1) * ga], shapes[k * ga : (k + 1) * ga]
        step = {"s": sum(1.0 / r["iterations_per_second"] for r in its), "loss": its[-1]["train_loss"]}
        step.update({key: sum(g[key] for g in group) for key in ("tokens", "supervised", "computed", "head")})
        per_step.append(step)
    from mlx.utils import tree_flatten

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    row = {
        "load_s": load_s,
        "trainable_params": int(trainable),
        "peak_rss_mb": measure.peak_rss_mb(),
        **native.read(),
        "mlx_lm_peak_memory_gb": reports[-1]["peak_memory"] if reports else None,
        "steps_raw": per_step,
    }
    del model
    gc.collect()
    mx.clear_cache()
    return row
