"""`mlx-lora serve`: an OpenAI-compatible chat API over a run folder, answers decided and audited like `eval`'s."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_lora.commands.options import backend_choice, build_config, config_option, set_option
from mlx_lora.core.errors import UserError


@click.command()
@config_option
@set_option
@click.option("--adapter", required=True, type=click.Path(exists=True, file_okay=False), help="Run directory to serve.")
@click.option("--model", help="Base model (default: the run's).")
@click.option("--kb", help="KB JSONL (default data.kb); reloaded by POST /admin/reload and SIGHUP.")
@click.option("--rules", "rules_path", help="Rules YAML (default rules.path; 'none' for the route only); reloadable.")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (not loopback: needs a key)."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--backend", type=backend_choice, help="Generation backend (default: auto).")
@click.option("--api-key", envvar="MLX_LORA_API_KEY", help="Required as 'Authorization: Bearer KEY' on /v1 and /admin.")
@click.option("--name", help="The model id clients send (default: the run folder's name).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 256), help="Prompts per batch.")
@click.option(
    "--batch-window-ms",
    default=15.0,
    show_default=True,
    type=click.FloatRange(0, 1000),
    help="How long the first waiting prompt waits for others to join its batch.",
)
@click.option(
    "--max-tokens-cap", default=1024, show_default=True, type=click.IntRange(1), help="Largest max_tokens accepted."
)
@click.option("--audit", "audit_path", help="Audit JSONL (default RUN/serve-audit.jsonl; rotated at 50 MB, 3 kept).")
@click.option("--log-level", default="warning", show_default=True, type=click.Choice(["warning", "info", "debug"]))
@click.option("--strict", is_flag=True, help="Refuse a base model that differs from the run's manifest.")
@click.option("--no-progress", is_flag=True)
def serve(
    config_path,
    overrides,
    adapter,
    model,
    kb,
    rules_path,
    host,
    port,
    backend,
    api_key,
    name,
    max_batch,
    batch_window_ms,
    max_tokens_cap,
    audit_path,
    log_level,
    strict,
    no_progress,
):
    """Serve ADAPTER's model at /v1/chat/completions (OpenAI format); every answer is decided as in `eval`."""
    try:
        from mlx_lora.serve.server import bind, check_exposure, serve_forever
        from mlx_lora.serve.service import ServeSettings, Service
    except ImportError as exc:
        raise UserError(f"serve needs the serve extra: pip install 'mlx-lora[serve]' ({exc})") from None
    check_exposure(host, api_key)
    cfg = build_config(config_path, overrides, backend__name=backend, data__kb=kb)
    rules = cfg.rules.path if rules_path is None else None if rules_path.lower() == "none" else rules_path
    if rules is not None and not Path(rules).is_file():
        if rules_path is not None:
            raise UserError(f"{rules}: rules file not found")
        click.echo(f"note: {rules} not found: no keyword rules, semantic route only", err=True)
        rules = None
    if rules is not None:  # a broken rules file fails now, not after the model has loaded
        from mlx_lora.answer.rules import load_rules
        from mlx_lora.data.kb import load_kb

        load_rules(rules, load_kb(cfg.data.kb))
    settings = ServeSettings(
        host=host,
        port=port,
        api_key=api_key or None,
        name=name,
        max_batch=max_batch,
        window_ms=batch_window_ms,
        max_tokens_cap=max_tokens_cap,
        audit_path=audit_path,
    )
    sock = bind(host, port)
    service = Service(cfg, adapter, model, rules, settings, progress=not no_progress, strict=strict)
    try:
        service.start()
    except BaseException:
        sock.close()
        raise
    serve_forever(service, sock, log_level)
