"""`mlx-lora init DIR`: copy the sample KB, question bank, rules and configs into DIR as a starting point."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_lora.core.errors import UserError


@click.command()
@click.argument("directory", type=click.Path(file_okay=False))
def init(directory):
    """Copy the sample KB, question bank, rules and configs into DIRECTORY (new or empty).

    Then, inside it: edit data/kb.jsonl and data/questions.yaml, and run `mlx-lora run`.
    """
    from mlx_lora.core.files import atomic_write_text
    from mlx_lora.core.samples import INIT_FILES, sample_path

    target = Path(directory)
    if target.exists() and any(target.iterdir()):  # never mix the samples into someone's files
        raise UserError(f"{target}: not empty; give a new or empty folder")
    for relative in INIT_FILES:
        atomic_write_text(target / relative, sample_path(relative).read_text(encoding="utf-8"))
    click.echo(f"wrote {', '.join(INIT_FILES)} into {target}; next: cd {target} && mlx-lora run")
