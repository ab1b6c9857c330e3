"""The PyTorch + PEFT backend: the only package that imports torch, transformers and peft."""
