"""Import alias: the PyTorch + PEFT backend lives in mlx_lora.backends.torch, beside its MLX mirror."""

from mlx_lora.backends.torch import TorchBackend

__all__ = ["TorchBackend"]
