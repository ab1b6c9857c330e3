"""Benchmarks across backends: training, generation and roofline, run by `mlx-lora bench` (see benchmarks/run.py)."""
