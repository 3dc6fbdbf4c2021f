"""``inference-broker asyncapi``: commands that describe a stack or look at it.

The logic lives in :mod:`broker.asyncapi`; this module parses options.
It registers its commands on the main group when imported, which ``broker/cli.py`` does at
its end (so either module may be imported first).
"""

from __future__ import annotations

from pathlib import Path

import click

from broker.cli import EPILOG, friendly, main


@main.command("asyncapi", epilog=EPILOG)
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the document to this file instead of printing it.")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True,
              help="Output format.")
@friendly
def asyncapi_cmd(out: Path | None, fmt: str) -> None:
    """Print the AsyncAPI 3.0 document of every stream, consumer group and message.

    Schemas come from the wire Structs (broker/wire.py), addresses from broker/topology.py.
    docs/asyncapi.yaml in the repository is this command's output.
    """
    from broker.asyncapi import render

    text = render(fmt)
    if out is None:
        click.echo(text, nl=False)
        return
    out.write_text(text, encoding="utf-8")
    click.echo(f"wrote {out}", err=True)
