"""Helpers for the torch backend tests: tiny chat rows, a small LoRA config and one training run through the loop."""

from __future__ import annotations

from pathlib import Path

from mlx_lora.core.config import Config, LoraConfig
from mlx_lora.data.render import Encoded, encode_messages
from mlx_lora.training import loop
from mlx_lora.training.events import Event


def chat_rows(
    tok, n: int, answer: str = "依據公司規範:VPN 請以 SSO 登入。", question: str = "VPN 怎麼連"
) -> list[Encoded]:
    return [
        encode_messages(
            tok,
            [
                {"role": "system", "content": "你是助理"},
                {"role": "user", "content": f"{question} {i}?"},
                {"role": "assistant", "content": f"{answer}{'甲乙丙'[i % 3]}"},
            ],
            64,
        )
        for i in range(n)
    ]


def make_cfg(**train) -> Config:
    cfg = Config()
    cfg.lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum = 2, 4, 1
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.weight_decay = 2e-2, 1, 0.01
    cfg.train.precision = "fp32"  # exact comparisons with plain PEFT; bf16 has its own test (test_precision.py)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def train(model_dir, rows, valid, cfg, run_dir, on_event=None, resume=None):
    from mlx_lora.backends.torch import TorchBackend

    events: list[dict] = []

    def record(event):
        assert isinstance(event, Event), event  # the loop emits typed events only
        events.append(event.to_dict())
        if on_event:
            on_event(events[-1])

    backend = TorchBackend()
    loaded = backend.load(model_dir, None, cfg)
    outcome = loop.train(backend, loaded, rows, valid, cfg, run_dir, record, resume=resume)
    return outcome, events, backend, loaded


def adapter_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))
