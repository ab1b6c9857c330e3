"""`mlx-lora doctor`: what this machine can run, and how to make it faster."""

import click


@click.command()
def doctor():
    """Show platform, usable backends, versions, threads and BLAS."""
    from mlx_lora.doctor import report

    rows = report()
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        click.echo(f"{key:<{width}}  {value}")
