"""Dead-letter inspection and replay (``inference-broker dead``).

A dead letter keeps the original bytes of what failed. Replaying puts the job back on the
ingress stream under its own id, after forgetting its earlier outcome (the ``failed``
result in its done key and its routed marker), in one script: a replayed job runs again
and its new result follows the old ``failed`` one on its reply stream.

Each shard of a deployment has its own dead-letter stream. The tools read them all, merged
in time order, and name a letter by ``<shard>/<entry id>`` when there are several shards (the
plain entry id with one). A letter is replayed onto the ingress of its job's shard
(:meth:`Topology.of_job`), which is the shard it died on unless a producer put the job on
another shard's ingress; no script touches two shards.
"""

from __future__ import annotations

import asyncio
import re
from typing import NamedTuple

import redis.asyncio as aioredis

from broker import calls
from broker.ingress import entry_payload
from broker.scripts import Scripts
from broker.topology import Topology
from broker.wire import DECODE_ERRORS, DeadLetter, InvalidJob, decode_dead, decode_job, decode_routed, json_encode


async def read_dead(client: aioredis.Redis, topo: Topology, *, reason: str | None = None,
                    limit: int | None = None) -> list[tuple[str, DeadLetter]]:
    """Dead letters, oldest first, as (entry id, letter); optionally only one reason."""
    out: list[tuple[str, DeadLetter]] = []
    start = "-"
    while limit is None or len(out) < limit:
        entries = await client.xrange(topo.dead, min=start, count=500)
        if not entries:
            break
        for entry_id, fields in entries:
            letter = decode_dead(fields[b"dead"])
            if reason is None or letter.reason == reason:
                out.append((entry_id.decode(), letter))
        start = "(" + entries[-1][0].decode()
    return out[:limit] if limit is not None else out


class Letter(NamedTuple):
    """A dead letter where it lies: its shard and its entry id on that shard's dead-letter stream."""

    shard: int
    entry_id: str
    letter: DeadLetter


_DEAD_ID = re.compile(r"(?:(\d+)/)?(\d+-\d+)")


def dead_id(topo: Topology, shard: int, entry_id: str) -> str:
    """How the tools name a dead letter: ``<shard>/<entry id>``, or the entry id with one shard."""
    return f"{shard}/{entry_id}" if topo.shards > 1 else entry_id


def parse_dead_id(text: str, topo: Topology) -> tuple[int, str]:
    """(shard, entry id) of a name :func:`dead_id` gave; ``ValueError`` (one line) for a bad one."""
    found = _DEAD_ID.fullmatch(text)
    if found is None:
        form = "<shard>/<entry id>" if topo.shards > 1 else "an entry id"
        raise ValueError(f"{text!r} is not a dead-letter id: give {form}, as `dead list` shows")
    shard, entry_id = found.groups()
    if shard is None:
        if topo.shards > 1:
            raise ValueError(f"{text!r} names no shard: give <shard>/<entry id>, as `dead list` shows")
        return 0, entry_id
    if int(shard) >= topo.shards:
        raise ValueError(f"{text!r}: there is no shard {int(shard)} (shards 0-{topo.shards - 1})")
    return int(shard), entry_id


def _age(letter: Letter) -> tuple[int, int, int]:
    ms, seq = letter.entry_id.split("-")
    return int(ms), int(seq), letter.shard


async def read_letters(client: aioredis.Redis, topo: Topology, *, reason: str | None = None,
                       limit: int | None = None) -> list[Letter]:
    """Dead letters of every shard of ``topo``'s deployment, oldest first; optionally only one reason.

    Entry ids come from each shard's Redis clock, so on a cluster the order across shards is
    as good as the nodes' clocks agree.
    """
    shards = topo.every_shard
    read = await asyncio.gather(*(read_dead(client, shard, reason=reason, limit=limit) for shard in shards))
    letters = sorted((Letter(shard.shard, entry_id, letter) for shard, found in zip(shards, read, strict=True)
                      for entry_id, letter in found), key=_age)
    return letters[:limit] if limit is not None else letters


def replayable_job(letter: DeadLetter, topo: Topology) -> tuple[bytes, str]:
    """The job bytes to submit again and the tenant whose ingress takes them (``""``: the default
    space's); raises ``InvalidJob`` when there is no job to replay."""
    if letter.truncated:
        raise InvalidJob("decode_error", f"its payload was cut to {len(letter.payload)} bytes "
                                         f"(dead_payload_bytes; {letter.truncated} more were not kept)")
    path = letter.stream.removeprefix(f"{topo.base}:")
    if path == "jobs" or path.startswith("~") and path.endswith(":jobs"):  # an ingress: `jobs` or `~<tenant>:jobs`
        # `__data__` unwraps a FastStream envelope and passes anything else through.
        tenant = "" if path == "jobs" else path.removeprefix("~").removesuffix(":jobs")
        return json_encode(decode_job(entry_payload({b"__data__": letter.payload}))), tenant
    try:
        routed = decode_routed(letter.payload)
    except DECODE_ERRORS as exc:
        raise InvalidJob("decode_error", f"not a routed job: {exc}") from None
    return json_encode(routed.job), routed.space


async def replay(client: aioredis.Redis, topo: Topology, entry_id: str, letter: DeadLetter) -> bool:
    """Put the job of one dead letter of ``topo``'s shard back on the ingress of its job's shard.

    False if the letter was already gone (replayed or purged meanwhile).
    """
    data, tenant = replayable_job(letter, topo)
    job_id = decode_job(data).id
    home = topo.of_job(job_id).of_tenant(tenant)
    if home.shard != topo.shard:
        # A job put on the wrong shard's ingress died there. REPLAY keeps to one shard, so the
        # letter moves to its job's shard first: copied, then deleted here; a crash in between
        # leaves it in one dead-letter stream or both, never in none.
        copy = (await client.xadd(home.dead, {"dead": json_encode(letter)})).decode()
        if not await client.xdel(topo.dead, entry_id):
            await client.xdel(home.dead, copy)
            return False
        entry_id = copy
    done = await Scripts(client).call(calls.replay(home, entry_id, job_id, data))
    return bool(done)
