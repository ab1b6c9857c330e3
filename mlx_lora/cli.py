"""The `mlx-lora` command: a click group whose subcommands are imported only when used."""

from __future__ import annotations

import importlib
import sys

import click

from mlx_lora.core.errors import UserError

# name → (module under mlx_lora.commands, attribute, one-line help shown before the module is imported)
COMMANDS = {
    "run": ("run", "run", "The main job: data → train → eval (base, tuned, tuned+rules, retrieval) → report."),
    "data": ("data", "data", "Build ChatML train/valid/test splits from a KB; check any chat JSONL."),
    "train": ("train", "train", "LoRA-train a model on a data directory (torch or mlx backend)."),
    "generate": ("generate", "generate", "Answer a question with a model, optionally with an adapter and rules."),
    "eval": ("evaluate", "eval_cmd", "Score base vs tuned vs tuned+rules vs retrieval on a test set."),
    "rules": ("rules", "rules", "Check and try the YAML rule layer."),
    "diagnose": ("evaluate", "diagnose", "Find weak questions and confused topics; propose training questions."),
    "adapter": ("adapter", "adapter", "Inspect and convert adapters between MLX and PEFT formats."),
    "fuse": ("fuse", "fuse", "Merge an adapter into its base model and save an HF folder."),
    "model": ("model", "model", "Prepare the embedded default model or convert a GGUF file."),
    "bench": ("bench", "bench", "Benchmark training and generation across backends."),
    "doctor": ("doctor", "doctor", "Show platform, usable backends, versions, threads and BLAS."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(f"mlx_lora.commands.{module}"), attr)

    def format_commands(self, ctx, formatter):
        # Help lists every command without importing any of them.
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-lora")
def cli():
    """mlx-lora: fine-tune a small chat model on your knowledge base, offline, and evaluate it honestly."""


def _one_line(message: str) -> str:
    return " ".join(message.split())


def main(argv=None):
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        cli.main(args=argv, prog_name="mlx-lora", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # click prints a 4-line usage block; one line says the same
        where = exc.ctx.command_path if exc.ctx is not None else "mlx-lora"
        click.echo(f"error: {_one_line(exc.format_message())} (see {where} --help)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # e.g. --out names an existing file, a full disk, no permission
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"error: {where}{exc.strerror or exc}", err=True)
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
