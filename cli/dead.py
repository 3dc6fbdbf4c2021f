"""``dead list|replay|purge``: the dead-letter stream, for operators."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, get_args

import click
import msgspec

from broker.topology import Topology
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
    """List dead letters of every shard, oldest first: id, reason and job id, then where it came from and the error.

    With several shards (--shards), a dead letter's id is <shard>/<entry id>.
    """
    import shutil
    import textwrap

    from broker.connection import connect
    from broker.dead import Letter, dead_id, read_letters
    from broker.logs import printable

    settings = need_url(settings_from(**opts))
    topo = settings.topology

    async def go() -> list[Letter]:
        client = connect(settings.redis_url or "")
        try:
            return await read_letters(client, topo, reason=reason, limit=limit)
        finally:
            await client.aclose()

    letters = asyncio.run(go())
    if as_json:
        for shard, entry_id, letter in letters:
            # The letter's own entry_id is its source entry's: the dead entry's id has its own key.
            click.echo(json.dumps({"dead_entry_id": dead_id(topo, shard, entry_id), "shard": shard,
                                   **msgspec.to_builtins(letter)}))
        return
    # One record per letter rather than a table: ids stay whole on their line (to copy into
    # `dead replay`), however narrow the terminal; only the error text wraps.
    width = max(40, shutil.get_terminal_size().columns)
    click.echo(f"{len(letters)} dead letter(s)")
    for shard, entry_id, letter in letters:
        name = dead_id(topo, shard, entry_id)
        click.echo(f"{click.style(name, bold=True)}  {letter.reason}  job {printable(letter.job_id or '-')}")
        deliveries = f"{letter.delivery_count} {'delivery' if letter.delivery_count == 1 else 'deliveries'}"
        source = letter.stream.removeprefix(f"{topo.at(shard).base}:")
        detail = f"{deliveries} from {source}: {printable(letter.error[:500])}"
        click.echo(textwrap.fill(detail, width - 1, initial_indent="    ", subsequent_indent="    ",
                                 break_on_hyphens=False))


def dead_ids(entry_ids: tuple[str, ...], topo: Topology) -> set[tuple[int, str]]:
    """(shard, entry id) of each id given on the command line; a bad one is a usage error."""
    from broker.dead import parse_dead_id

    try:
        return {parse_dead_id(text, topo) for text in entry_ids}
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="ENTRY_IDS") from None


@dead.command("replay", epilog=EPILOG)
@common
@click.argument("entry_ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter (with --reason: of that reason).")
@reason_option("With --all: only this reason.")
def dead_replay(entry_ids: tuple[str, ...], replay_all: bool, reason: str | None, **opts: Any) -> None:
    """Put dead jobs back on the ingress stream under their ids, to run again.

    ENTRY_IDS are the ids `dead list` shows (<shard>/<entry id> with several shards). A job
    goes back to the ingress of its own shard. Fix the cause first (a backend, a model
    missing from the config): a replayed job that fails again becomes a dead letter again.
    Entries without a valid job are skipped.
    """
    from broker.connection import connect
    from broker.dead import dead_id, read_letters, replay
    from broker.wire import InvalidJob

    if not entry_ids and not replay_all:
        raise click.UsageError("name dead-letter entry ids (see `inference-broker dead list`) or pass --all")
    settings = need_url(settings_from(**opts))
    topo = settings.topology
    wanted = dead_ids(entry_ids, topo)

    async def go() -> tuple[int, int]:
        client = connect(settings.redis_url or "")
        done = skipped = 0
        try:
            letters = await read_letters(client, topo, reason=reason)
            chosen = letters if replay_all else [d for d in letters if (d.shard, d.entry_id) in wanted]
            missing = wanted - {(d.shard, d.entry_id) for d in chosen}
            if missing:
                names = sorted(dead_id(topo, shard, entry_id) for shard, entry_id in missing)
                raise click.BadParameter(f"no dead letter {', '.join(names)}", param_hint="ENTRY_IDS")
            for shard, entry_id, letter in chosen:
                try:
                    done += await replay(client, topo.at(shard), entry_id, letter)
                except InvalidJob as exc:
                    skipped += 1
                    click.echo(f"skipped {dead_id(topo, shard, entry_id)} ({letter.reason}): no job to replay: "
                               f"{exc}", err=True)
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
    """Delete dead letters, of every shard, for good."""
    from broker.connection import connect
    from broker.dead import read_letters

    settings = need_url(settings_from(**opts))
    topo = settings.topology

    async def go(ids: dict[int, list[str]] | None) -> dict[int, list[str]]:
        client = connect(settings.redis_url or "")
        try:
            if ids is None:
                found: dict[int, list[str]] = {}
                for shard, entry_id, _letter in await read_letters(client, topo, reason=reason):
                    found.setdefault(shard, []).append(entry_id)
                return found
            deleted = await asyncio.gather(*(client.xdel(topo.at(shard).dead, *entries)
                                             for shard, entries in ids.items()))
            return {shard: entries[:n] for (shard, entries), n in zip(ids.items(), deleted, strict=True)}
        finally:
            await client.aclose()

    ids = asyncio.run(go(None))
    count = sum(map(len, ids.values()))
    if count and not yes:
        click.confirm(f"delete {count} dead letter(s)?", abort=True)
    # Only the letters that were counted: ones arriving meanwhile are left alone.
    deleted = asyncio.run(go(ids)) if count else {}
    click.echo(f"deleted {sum(map(len, deleted.values()))} dead letter(s)")
