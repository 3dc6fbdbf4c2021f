"""Dead-letter inspection and replay (``inference-broker dead``).

A dead letter keeps the original bytes of what failed. Replaying puts the job back on the
ingress stream under its own id, after forgetting its earlier outcome (the ``failed``
result in its done key and its routed marker), in one script: a replayed job runs again
and its new result follows the old ``failed`` one on its reply stream.
"""

from __future__ import annotations

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


def replayable_job(letter: DeadLetter, topo: Topology) -> bytes:
    """The job bytes to submit again; raises ``InvalidJob`` when there is no job to replay."""
    if letter.truncated:
        raise InvalidJob("decode_error", f"its payload was cut to {len(letter.payload)} bytes "
                                         f"(dead_payload_bytes; {letter.truncated} more were not kept)")
    if letter.stream == topo.jobs:
        # `__data__` unwraps a FastStream envelope and passes anything else through.
        job = decode_job(entry_payload({b"__data__": letter.payload}))
    else:
        try:
            job = decode_routed(letter.payload).job
        except DECODE_ERRORS as exc:
            raise InvalidJob("decode_error", f"not a routed job: {exc}") from None
    return json_encode(job)


async def replay(client: aioredis.Redis, topo: Topology, entry_id: str, letter: DeadLetter) -> bool:
    """Put the job of one dead letter back on the ingress; False if it was already gone."""
    data = replayable_job(letter, topo)
    job_id = decode_job(data).id
    done = await Scripts(client).call(calls.replay(topo, entry_id, job_id, data))
    return bool(done)
