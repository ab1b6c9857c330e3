"""TorchBackend: the Backend protocol on PyTorch + PEFT (CPU, CUDA, MPS; data-parallel under torchrun)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from mlx_lora.backends import OnEvent, TrainOutcome
from mlx_lora.core.config import Config, GenerateConfig
from mlx_lora.data.render import Encoded

from mlx_lora.backends.torch import ddp

from mlx_lora.backends.torch import generate as gen

from mlx_lora.backends.torch import model as loading

from mlx_lora.backends.torch import lora

from mlx_lora.backends.torch import fuse as merge
from mlx_lora.backends.torch.model import Loaded
from mlx_lora.backends.torch.engine import Trainer


class TorchBackend:
    name = "torch"

    def available(self) -> tuple[bool, str]:
        device = loading.pick_device("auto")
        return True, f"torch {torch.__version__} on {device.type}"

    def load(self, model_dir: Path, adapter: Path | None, cfg: Config) -> Loaded:
        return loading.load(model_dir, adapter, cfg)

    def train(self, loaded: Loaded, train: list[Encoded], valid: list[Encoded], cfg: Config, run_dir: Path,
              on_event: OnEvent, resume: Path | None = None) -> TrainOutcome:
        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        dist = ddp.from_env(loaded.device.type)
        loaded.device = ddp.device_for(dist, loaded.device)
        torch.manual_seed(cfg.train.seed)  # before attaching: lora_A's initialisation is random
        model = loaded.model.to(loaded.device)
        if isinstance(model, PeftModel):  # continue training a loaded adapter
            for name, param in model.named_parameters():
                param.requires_grad = "lora_" in name
        else:
            model = lora.attach(model, cfg.lora)
        loaded.model = model
        try:
            outcome = Trainer(model, train, valid, cfg, Path(run_dir), on_event, loaded.device, loaded.pad_id,
                              dist).run(resume)
        finally:
            ddp.shutdown(dist)
        best = Path(run_dir) / "adapter" / "adapter_model.safetensors"
        if best.is_file() and outcome.best_step is not None and outcome.best_step != outcome.steps:
            set_peft_model_state_dict(model, load_file(str(best)))  # later generation uses the kept adapter
        model.eval()
        return outcome

    def generate(self, loaded: Loaded, prompts: list[list[int]], cfg: GenerateConfig, stop_ids: list[int],
                 on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        return gen.generate(loaded.model, prompts, cfg, stop_ids, loaded.pad_id, loaded.device, on_token)

    def fuse(self, loaded: Loaded, out_dir: Path) -> Path:
        """Merge the loaded adapter into the base weights and save an HF folder (with tokenizer and template)."""
        return merge.fuse_loaded(loaded, out_dir)
