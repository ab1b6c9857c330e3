"""The MLX backend (mlx + mlx-lm): the only package that imports mlx; its modules load only when used."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlx_lora.core.config import Config, GenerateConfig


class MLXBackend:
    """Backend protocol on mlx-lm: its loader, LoRA layers and BatchGenerator; our own training loop."""

    name = "mlx"

    def available(self) -> tuple[bool, str]:
        try:
            import mlx.core as mx
            import mlx_lm  # noqa: F401
        except ImportError as exc:
            return False, f"mlx/mlx-lm not importable ({exc}); pip install -e '.[mlx]'"
        from mlx_lora.backends.mlx.model import blas_note

        where = f"mlx {mx.__version__} on {mx.default_device()}"
        note = blas_note()
        return True, f"{where}; {note}" if note else where

    def load(self, model_dir: Path, adapter: Path | None, cfg: Config):
        from mlx_lora.backends.mlx.model import load

        return load(model_dir, adapter, cfg)

    def engine(self, loaded, cfg: Config):
        from mlx_lora.backends.mlx.engine import MLXEngine

        return MLXEngine(loaded, cfg)

    def generate(
        self,
        loaded,
        prompts: list[list[int]],
        cfg: GenerateConfig,
        stop_ids: list[int],
        on_token: Callable[[int, int], None] | None = None,
        biased: list[bool] | None = None,
    ) -> list[list[int]]:
        from mlx_lora.backends.mlx.generate import generate

        return generate(loaded, prompts, cfg, stop_ids, on_token, biased)

    def token_margins(self, loaded, prompts: list[list[int]], cfg: GenerateConfig, token: int) -> list[float]:
        from mlx_lora.backends.mlx.generate import token_margins

        return token_margins(loaded, prompts, token)

    def fuse(self, loaded, out_dir: Path) -> Path:
        """Merge the loaded adapter into the base weights and save an HF-style folder."""
        from mlx_lora.backends.mlx.fuse import fuse

        return fuse(loaded, Path(out_dir))
