"""``inference-broker cancel``: end jobs that have not started as ``cancelled``.

The SDK's :meth:`broker.client.Client.cancel` takes the job itself (its result names its
model and tenant). Here only ids are given, so each job is looked up where it waits: on its
pool stream (its routed marker names the entry) or on its shard's ingress (read through,
at most ``max_backlog`` entries).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click
import msgspec
from redis.exceptions import ResponseError

from broker.client import Client
from broker.streams import is_group_lost
from broker.topology import WORKER_GROUP, Topology
from broker.wire import DECODE_ERRORS, InvalidJob, Job, JobId, decode_job, decode_result, decode_routed
from cli.common import EPILOG, common, need_url, settings_from, tenant_option

PAGE = 1000
"""Ingress entries read per round trip while looking for a job."""


async def _on_ingress(client: Client, topo: Topology, job_id: str) -> Job | None:
    """The job ``job_id`` if it waits on ``topo``'s ingress (not routed yet)."""
    start = "-"
    quick = "/" not in job_id  # JSON may write '/' as '\/': then every entry is decoded
    while True:
        page = await client.redis.xrange(topo.jobs, start, "+", count=PAGE)
        for _entry, fields in page:
            raw = fields.get(b"job", b"")
            if quick and job_id.encode() not in raw:
                continue
            try:
                job = decode_job(raw)
            except InvalidJob:
                continue  # the policy dead-letters it
            if job.id == job_id:
                return job
        if len(page) < PAGE:
            return None
        start = "(" + page[-1][0].decode()


async def _taken(client: Client, stream: str, entry: str) -> bool:
    """Whether a pool worker has taken ``entry`` of ``stream`` (no group yet: no worker has)."""
    try:
        return bool(await client.redis.xpending_range(stream, WORKER_GROUP, entry, entry, 1))
    except ResponseError as exc:
        if not is_group_lost(exc):
            raise
        return False


async def _why_not(client: Client, job_id: str) -> tuple[Job | None, str]:
    """The waiting job ``job_id``, or why it cannot be cancelled."""
    topo = client.topo.of_job(job_id)
    done = await client.redis.get(topo.done(job_id))
    if done is not None:
        try:
            return None, f"it has ended already ({decode_result(done).status})"
        except DECODE_ERRORS:
            return None, "it has ended already"
    marker = await client.redis.get(topo.routed(job_id))
    if marker is None:
        job = await _on_ingress(client, topo, job_id)
        return job, "" if job else "no such job is waiting (never submitted, or its result has expired)"
    lane, _, entry = marker.decode(errors="replace").partition(" ")
    stream = f"{topo.base}:{lane}"
    if entry and not await _taken(client, stream, entry):
        for _entry, fields in await client.redis.xrange(stream, entry, entry):
            try:
                return decode_routed(fields.get(b"routed", b"")).job, ""
            except DECODE_ERRORS:
                break
    return None, "a worker has taken it: it ends as it would have"


@click.command(epilog=EPILOG)
@common
@click.argument("job_ids", metavar="JOB_ID...", nargs=-1, required=True)
@click.option("--reason", default="cancelled by an operator", show_default=True,
              help="Why: the `error` of each cancelled job's result.")
@tenant_option
def cancel(job_ids: tuple[str, ...], reason: str, tenant: str, **opts: Any) -> None:
    """Cancel jobs that have not started: each ends with a `cancelled` result.

    A job has started once a pool worker has taken it; such a job is not cancelled and
    ends as it would have. Exit status: 0 if every job was cancelled, 2 if some were not
    (each says why), 1 on other errors such as an unreachable Redis.
    """
    for job_id in job_ids:
        try:
            msgspec.convert(job_id, JobId)
        except msgspec.ValidationError:
            raise click.BadParameter(f"{job_id!r} is no job id (1-128 characters of A-Z a-z 0-9 _ . : @ / + = -)",
                                     param_hint="JOB_ID") from None
    settings = need_url(settings_from(**opts))

    async def go() -> list[tuple[str, str]]:
        async with Client(settings.redis_url or "", prefix=settings.prefix, shards=settings.shards,
                          result_ttl_s=settings.result_ttl_s, tenant=tenant) as client:
            outcomes = []
            for job_id in job_ids:
                job, why = await _why_not(client, job_id)
                if job is not None and not await client.cancel(job, reason=reason):
                    job, why = None, "it started or ended meanwhile"
                outcomes.append((job_id, why))
            return outcomes

    outcomes = asyncio.run(go())
    for job_id, why in outcomes:
        if why:
            click.echo(f"job {job_id}: " + click.style("not cancelled", fg="red", bold=True) + f": {why}")
        else:
            click.echo(f"job {job_id}: " + click.style("cancelled", fg="green", bold=True))
    sys.exit(2 if any(why for _, why in outcomes) else 0)
