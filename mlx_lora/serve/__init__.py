"""`mlx-lora serve`: an OpenAI-compatible chat API over a tuned run, every answer decided and audited."""
