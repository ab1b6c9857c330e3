"""The PyTorch + PEFT backend (CPU, CUDA, MPS; data-parallel under torchrun): the only package importing torch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlx_lora.core.config import Config, GenerateConfig


def devices() -> str:
    """The devices torch sees here, for `mlx-lora doctor`."""
    import torch

    found = [f"cpu ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        found.append(f"cuda ({torch.cuda.get_device_name(0)})")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        found.append("mps")
    return ", ".join(found)


def precision_note() -> str:
    """The bf16 probe of this CPU and what train.precision=auto picks, for `mlx-lora doctor`."""
    import torch

    from mlx_lora.backends.torch.precision import probe, resolve
    from mlx_lora.core.model_store import default_cache_dir

    found = probe(default_cache_dir())
    auto = resolve("auto", torch.device("cpu"), default_cache_dir())
    return (
        f"matmul {found['shape']}: fp32 {found['fp32_gflops']} GFLOP/s, bf16 {found['bf16_gflops']} GFLOP/s "
        f"→ train.precision=auto and generate.precision=auto pick {auto} on the CPU"
    )


class TorchBackend:
    """Backend protocol on transformers + PEFT; the engine plugs into the shared training loop."""

    name = "torch"

    def available(self) -> tuple[bool, str]:
        import torch

        from mlx_lora.backends.torch.model import pick_device

        return True, f"torch {torch.__version__} on {pick_device('auto').type}"

    def load(self, model_dir: Path, adapter: Path | None, cfg: Config):
        from mlx_lora.backends.torch.model import load

        return load(model_dir, adapter, cfg)

    def engine(self, loaded, cfg: Config):
        from mlx_lora.backends.torch.engine import TorchEngine

        return TorchEngine(loaded, cfg)

    def generate(
        self,
        loaded,
        prompts: list[list[int]],
        cfg: GenerateConfig,
        stop_ids: list[int],
        on_token: Callable[[int, int], None] | None = None,
        biased: list[bool] | None = None,
    ) -> list[list[int]]:
        from mlx_lora.backends.torch import lookup
        from mlx_lora.backends.torch.generate import generate
        from mlx_lora.backends.torch.precision import for_generation
        from mlx_lora.core.model_store import default_cache_dir

        for_generation(loaded, cfg.precision, default_cache_dir())
        # Answers this model wrote before: prompt lookup drafts repeated text (a refusal) from them.
        memory = loaded.extra.setdefault("lookup_memory", lookup.AnswerMemory())
        return generate(
            loaded.model,
            prompts,
            cfg,
            stop_ids,
            loaded.pad_id,
            loaded.device,
            on_token,
            memory=memory,
            first_bias=loaded.first_token_bias,
            biased=biased,
        )

    def token_margins(self, loaded, prompts: list[list[int]], cfg: GenerateConfig, token: int) -> list[float]:
        from mlx_lora.backends.torch.generate import token_margins
        from mlx_lora.backends.torch.precision import for_generation
        from mlx_lora.core.model_store import default_cache_dir

        for_generation(loaded, cfg.precision, default_cache_dir())  # the precision generate() will answer in
        return token_margins(loaded.model, prompts, token, loaded.pad_id, loaded.device, cfg.batch_size)

    def fuse(self, loaded, out_dir: Path) -> Path:
        """Merge the loaded adapter into the base weights and save an HF folder (with tokenizer and template)."""
        from mlx_lora.backends.torch.fuse import fuse_loaded

        return fuse_loaded(loaded, out_dir)
