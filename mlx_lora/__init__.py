"""mlx-lora: offline LoRA fine-tuning of small chat models on a company knowledge base (MLX or PyTorch)."""

__version__ = "0.1.0"
