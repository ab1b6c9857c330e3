"""The `mlx-lora` command: a click group whose subcommands are imported only when used."""

from __future__ import annotations

import errno
import importlib
import os
import sys

import click

from mlx_lora.core.errors import UserError

# name → (module under mlx_lora.commands, attribute, one-line help shown before the module is imported)
COMMANDS = {
    "init": ("init", "init", "Copy the sample KB, question bank, rules and configs into a new folder."),
    "run": ("run", "run", "The main job: data → train → eval (base, tuned, tuned+rules, retrieval) → report."),
    "data": ("data", "data", "Build ChatML train/valid/test splits from a KB; check any chat JSONL."),
    "train": ("train", "train", "LoRA-train a model on a data directory (torch or mlx backend)."),
    "generate": ("generate", "generate", "Answer a question with a model, optionally with an adapter and rules."),
    "eval": ("evaluate", "eval_cmd", "Score base vs tuned vs tuned+rules vs retrieval on a test set."),
    "rules": ("rules", "rules", "Check and try the YAML rule layer."),
    "diagnose": ("evaluate", "diagnose", "Find weak questions and confused topics; propose training questions."),
    "adapter": ("adapter", "adapter", "Inspect and convert adapters between MLX and PEFT formats."),
    "fuse": ("fuse", "fuse", "Merge an adapter into its base model and save an HF folder."),
    "export": ("export", "export", "Export an adapter as GGUF for llama.cpp and Ollama, with a Modelfile."),
    "model": ("model", "model", "Prepare the embedded default model or convert a GGUF file."),
    "bench": ("bench", "bench", "Benchmark training and generation across backends."),
    "serve": ("serve", "serve", "Serve a run over an OpenAI-compatible chat API, every answer decided and audited."),
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


def _check_arguments(args: list[str]) -> None:
    """Refuse an argument that is not UTF-8 now, naming it: Python keeps its bytes as surrogate escapes, and the
    first encode of the text (a regex, the tokenizer, an output file) would fail with a traceback much later."""

    def spelled(char: str) -> str:  # a byte the shell passed (kept as U+DC80..U+DCFF) as \xNN, else \uNNNN
        code = ord(char)
        if 0xD800 <= code <= 0xDFFF:
            return f"\\x{code - 0xDC00:02x}" if code >= 0xDC80 else f"\\u{code:04x}"
        return char

    for number, arg in enumerate(args, start=1):
        try:
            if isinstance(arg, str):
                arg.encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(arg[exc.start])
            what = f"byte 0x{code - 0xDC00:02x}" if code >= 0xDC80 else f"half of a UTF-16 pair, U+{code:04X}"
            raise UserError(
                f"command-line argument {number} ({''.join(map(spelled, arg))}) is not UTF-8 ({what}); type it "
                "again as UTF-8 text, or rename the file to a UTF-8 name"
            ) from None


def _out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or an allocator's failure (torch on CPU: "can't allocate memory"; CUDA: "out of memory")."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def _disk_full(exc: BaseException) -> bool:
    """A full disk, however the writer says it: OSError ENOSPC (its errno, or its only argument), or an
    exception of a native writer that carries only the OS message (safetensors' SafetensorError, mlx's
    RuntimeError), on exc or on what it was raised from."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and (exc.errno == errno.ENOSPC or exc.args[:1] == (errno.ENOSPC,)):
            return True
        if os.strerror(errno.ENOSPC) in str(exc) or "StorageFull" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def main(argv=None):
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    # Offline by design: every model, adapter and embedder is read from local files. Should a library still reach
    # for the Hugging Face hub (PEFT did, for an adapter folder without its config), it fails at once instead of
    # sending a local folder's name out and retrying for half a minute. Set before any command imports the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        _check_arguments(sys.argv[1:] if argv is None else list(argv))
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
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except UnicodeEncodeError as exc:  # a non-UTF-8 name that did not come from argv: a listed file, an env var
        bad = exc.object[exc.start : exc.end] if isinstance(exc.object, str) else ""
        click.echo(
            f"error: text that is not UTF-8 ({bad!a}) in a file name or an environment variable; rename it or set "
            "it to UTF-8 text",
            err=True,
        )
        sys.exit(2)
    except Exception as exc:
        if _disk_full(exc):
            where = f" writing {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
            # No half file is left to mention: outputs are staged (temp file or folder, renamed into place) and
            # the stage is removed when a write fails.
            click.echo(
                f"error: disk full{where} (no space left on device); free some space, then run it again", err=True
            )
            sys.exit(1)
        if _out_of_memory(exc):  # torch's CPU and CUDA allocators say so in a RuntimeError; Python in MemoryError
            click.echo(
                "error: out of memory; lower train.batch_size, train.max_length or lora.rank (generate.batch_size "
                "when answering), or free memory, then run it again",
                err=True,
            )
            sys.exit(1)
        if isinstance(exc, OSError):  # e.g. --out names an existing file, no permission
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc}", err=True)
            sys.exit(1)
        raise
