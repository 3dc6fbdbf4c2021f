"""``inference-broker top``, ``report`` and ``asyncapi``: commands that look at a stack or describe it.

The logic lives in :mod:`cli.top`, :mod:`cli.report` and :mod:`cli.asyncapi`; this
module parses options. It registers its commands on the main group when imported, which
``cli/main.py`` does at its end (so either module may be imported first).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import click

from cli.common import EPILOG, common, need_url, settings_from


@click.command("asyncapi", epilog=EPILOG)
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the document to this file instead of printing it.")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True,
              help="Output format.")
def asyncapi_cmd(out: Path | None, fmt: str) -> None:
    """Print the AsyncAPI 3.0 document of every stream, consumer group and message.

    Schemas come from the wire Structs (broker/wire.py), addresses from broker/topology.py.
    docs/asyncapi.yaml in the repository is this command's output.
    """
    from cli.asyncapi import render

    text = render(fmt)
    if out is None:
        click.echo(text, nl=False)
        return
    out.write_text(text, encoding="utf-8")
    click.echo(f"wrote {out}", err=True)


@click.command("report", epilog=EPILOG)
@common
@click.option("--input", "-i", "input_file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="Read results from this file (JSON lines, from `results --export` or `demo --json`; "
                   "`-` for stdin) instead of the result stream.")
@click.option("--reply-to", default="results", show_default=True, help="Result stream name (without --input).")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("report"),
              show_default=True, help="Folder for the PNGs and index.html (created if missing).")
@click.option("--title", help="Title of the page [default: the source of the results].")
def report_cmd(input_file: Path | None, reply_to: str, out_dir: Path, title: str | None, **opts: Any) -> None:
    """Write PNG plots and one self-contained HTML page about a run's results.

    \b
    Plots: latency CDF per class and pool, SLO attainment over time per class,
    routing share over time per pool, cost. The page (index.html) embeds them with
    the summary table per class and per pool. Needs matplotlib:
    pip install 'inference-broker[report]'.
    """
    from broker.config import load_config
    from broker.connection import connect
    from cli import report
    from cli.plots import FIGURES

    settings = settings_from(**opts)
    config = load_config(settings.config)
    if input_file is not None:
        if str(input_file) == "-":
            results = report.load_file(Path("<stdin>"), sys.stdin.buffer.read())
        else:
            results = report.load_file(input_file)
        source = str(input_file)
    else:
        settings = need_url(settings)
        try:
            streams = [topo.reply(reply_to) for topo in settings.topology.every_shard]
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--reply-to") from None

        async def read() -> list[Any]:
            client = connect(settings.redis_url or "")
            try:
                return await report.read_streams(client, streams)
            finally:
                await client.aclose()

        results = asyncio.run(read())
        source = streams[0] + (f" and {len(streams) - 1} more shard(s)" if len(streams) > 1 else "")
    index = report.write(results, out_dir, config, title or f"inference-broker run: {source}")
    click.echo(f"{len(results)} results from {source}: wrote {index} and {len(FIGURES)} PNGs in {out_dir}")


@click.command("top", epilog=EPILOG)
@common
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--window", type=click.FloatRange(min=1.0), default=60.0, show_default=True,
              help="Seconds of recent results that throughput, latency and attainment cover.")
@click.option("--reply-to", default="results", show_default=True, help="Result stream to watch.")
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts and tests).")
def top_cmd(interval: float, window: float, reply_to: str, once: bool, **opts: Any) -> None:
    """Live dashboard of a running stack: pools, backlogs, throughput, latency, SLO attainment.

    Reads Redis only (heartbeats, stream and group info, recent results), so it works
    against any stack, local or deployed. Refreshes in place until Ctrl-C.
    """
    from rich.console import Console
    from rich.live import Live

    from broker.config import load_config
    from broker.connection import connect
    from cli.top import Collector, render

    settings = need_url(settings_from(**opts))
    try:
        settings.topology.reply(reply_to)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--reply-to") from None
    config = load_config(settings.config)
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # piped: room for the tables

    async def go() -> None:
        client = connect(settings.redis_url or "")
        collector = Collector(client, settings, config, reply_to=reply_to, window_s=window)
        try:
            if once:  # nothing to retry: Redis being away is an error, not a frame
                console.print(render(await collector.frame()))
                return
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            with Live(render(await collector.collect()), console=console, auto_refresh=False,
                      vertical_overflow="crop") as live:
                while not stop.is_set():
                    try:
                        await asyncio.wait_for(stop.wait(), interval)
                    except TimeoutError:
                        live.update(render(await collector.collect()), refresh=True)
        finally:
            await client.aclose()

    try:
        asyncio.run(go())
    except KeyboardInterrupt:  # Ctrl-C before the handler was in place
        pass
