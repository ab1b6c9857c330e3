"""`python -m mlx_lora`: the `mlx-lora` command, for an environment without the console script on PATH."""

from mlx_lora.cli import main

if __name__ == "__main__":
    main()
