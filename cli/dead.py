"""``dead list|replay|purge``: the dead-letter stream, for operators."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, get_args

import click
import msgspec

from broker.wire import DeadReason
from cli.common import EPILOG, Commands, F, common, need_url, settings_from


@click.group(cls=Commands, epilog=EPILOG)
def dead() -> None:
    """Inspect, replay or purge dead letters (jobs that could not be processed)."""


def reason_option(help: str) -> Callable[[F], F]:
    """``--reason``: one of the dead-letter reasons, listed in the help (a choice list would not wrap)."""
    reasons = get_args(DeadReason)
    return click.option("--reason", type=click.Choice(reasons), metavar="REASON",
                        help=f"{help} Reasons: {', '.join(reasons)}.")


@dead.command("list", epilog=EPILOG)
@common
@reason_option("Only dead letters of this reason.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="Most dead letters to list.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON dead letter per line (payload base64), with the dead_entry_id that `dead replay` "
                   "takes.")
def dead_list(reason: str | None, limit: int, as_json: bool, **opts: Any) -> None:
    """List dead letters, oldest first: entry id, reason and job id, then where it came from and the error."""
    import shutil
    import textwrap

    from broker.connection import connect
    from broker.dead import read_dead
    from broker.logs import printable

    settings = need_url(settings_from(**opts))

    async def go() -> list[tuple[str, Any]]:
        client = connect(settings.redis_url or "")
        try:
            return await read_dead(client, settings.topology, reason=reason, limit=limit)
        finally:
            await client.aclose()

    letters = asyncio.run(go())
    if as_json:
        for entry_id, letter in letters:
            # The letter's own entry_id is its source entry's: the dead entry's id has its own key.
            click.echo(json.dumps({"dead_entry_id": entry_id, **msgspec.to_builtins(letter)}))
        return
    # One record per letter rather than a table: ids stay whole on their line (to copy into
    # `dead replay`), however narrow the terminal; only the error text wraps.
    width = max(40, shutil.get_terminal_size().columns)
    base = f"{settings.topology.base}:"
    click.echo(f"{len(letters)} dead letter(s)")
    for entry_id, letter in letters:
        click.echo(f"{click.style(entry_id, bold=True)}  {letter.reason}  job {printable(letter.job_id or '-')}")
        deliveries = f"{letter.delivery_count} {'delivery' if letter.delivery_count == 1 else 'deliveries'}"
        detail = f"{deliveries} from {letter.stream.removeprefix(base)}: {printable(letter.error[:500])}"
        click.echo(textwrap.fill(detail, width - 1, initial_indent="    ", subsequent_indent="    ",
                                 break_on_hyphens=False))


@dead.command("replay", epilog=EPILOG)
@common
@click.argument("entry_ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter (with --reason: of that reason).")
@reason_option("With --all: only this reason.")
def dead_replay(entry_ids: tuple[str, ...], replay_all: bool, reason: str | None, **opts: Any) -> None:
    """Put dead jobs back on the ingress stream under their ids, to run again.

    Fix the cause first (a backend, a model missing from the config): a replayed job that
    fails again becomes a dead letter again. Entries without a valid job are skipped.
    """
    from broker.connection import connect
    from broker.dead import read_dead, replay
    from broker.wire import InvalidJob

    if not entry_ids and not replay_all:
        raise click.UsageError("name dead-letter entry ids (see `inference-broker dead list`) or pass --all")
    settings = need_url(settings_from(**opts))

    async def go() -> tuple[int, int]:
        client = connect(settings.redis_url or "")
        done = skipped = 0
        try:
            letters = await read_dead(client, settings.topology, reason=reason)
            chosen = letters if replay_all else [(i, d) for i, d in letters if i in entry_ids]
            missing = set(entry_ids) - {i for i, _d in chosen}
            if missing:
                raise click.BadParameter(f"no dead letter {', '.join(sorted(missing))}", param_hint="ENTRY_IDS")
            for entry_id, letter in chosen:
                try:
                    done += await replay(client, settings.topology, entry_id, letter)
                except InvalidJob as exc:
                    skipped += 1
                    click.echo(f"skipped {entry_id} ({letter.reason}): no job to replay: {exc}", err=True)
        finally:
            await client.aclose()
        return done, skipped

    done, skipped = asyncio.run(go())
    click.echo(f"replayed {done} job(s)" + (f", skipped {skipped}" if skipped else ""))


@dead.command("purge", epilog=EPILOG)
@common
@reason_option("Only dead letters of this reason.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dead_purge(reason: str | None, yes: bool, **opts: Any) -> None:
    """Delete dead letters for good."""
    from broker.connection import connect
    from broker.dead import read_dead

    settings = need_url(settings_from(**opts))

    async def go(ids: list[str] | None) -> list[str]:
        client = connect(settings.redis_url or "")
        try:
            if ids is None:
                return [i for i, _d in await read_dead(client, settings.topology, reason=reason)]
            return ids[: await client.xdel(settings.topology.dead, *ids)] if ids else []
        finally:
            await client.aclose()

    ids = asyncio.run(go(None))
    if ids and not yes:
        click.confirm(f"delete {len(ids)} dead letter(s)?", abort=True)
    # Only the letters that were counted: ones arriving meanwhile are left alone.
    click.echo(f"deleted {len(asyncio.run(go(ids)))} dead letter(s)")
