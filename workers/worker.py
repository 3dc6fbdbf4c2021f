"""The pool worker: consume a pool stream, run each job on the backend, publish, ack.

Reads only as many entries as it has free slots (its concurrency), so nothing waits in
this process that a peer could run. Each job's result goes out with the ack in one
COMPLETE script (result key SET NX + XADD to the reply stream + XACK): the ack never
precedes the result, and a job whose result already exists is not published twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis

from broker.settings import Settings
from broker.streams import RETRYABLE, Backoff, Entry, Scripts, consumer_name, ensure_group, is_group_lost
from broker.topology import WORKER_GROUP
from broker.wire import DeadLetter, Metrics, Result, RoutedJob, Timing, Usage, decode_routed, json_encode
from workers.backend import Backend, BackendError

log = logging.getLogger("inference_broker.worker")


def slo_met(route_ttft: float, route_tpot: float | None, route_e2e: float | None, m: Metrics) -> bool:
    """Whether every target that is set was met."""
    if m.time_to_first_token_ms > route_ttft:
        return False
    if route_tpot is not None and m.time_per_output_token_ms is not None and m.time_per_output_token_ms > route_tpot:
        return False
    return route_e2e is None or m.e2e_latency_ms <= route_e2e


class PoolWorker:
    """One worker of pool ``pool``, running up to ``concurrency`` jobs at once."""

    def __init__(self, client: aioredis.Redis, settings: Settings, pool: str, backend: Backend, *,
                 concurrency: int, name: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.settings = settings
        self.topo = settings.topology
        self.pool = pool
        self.stream = self.topo.pool(pool)
        self.backend = backend
        self.concurrency = concurrency
        self.name = name or consumer_name(f"worker-{pool}")
        self.clock = clock
        self.scripts = Scripts(client)
        self.tasks: set[asyncio.Task[None]] = set()
        self.completed = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then let running jobs finish within the grace period."""
        await ensure_group(self.client, self.stream, WORKER_GROUP)
        beat = asyncio.create_task(self._heartbeat_loop(stop))
        try:
            last_id = "0-0"  # our own pending entries first (a restart under the same name)
            backoff = Backoff()
            while not stop.is_set():
                free = self.concurrency - len(self.tasks)
                if free <= 0:
                    await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    reply = await self.client.xreadgroup(
                        WORKER_GROUP, self.name, {self.stream: last_id}, count=free,
                        block=None if last_id != ">" else self.settings.block_ms)
                    backoff.reset()
                except aioredis.ResponseError as exc:
                    if not is_group_lost(exc):
                        raise
                    log.error("pool stream %s or its group is gone (Redis restarted empty, or the key was "
                              "deleted): jobs queued there may be lost; recreating the group at 0", self.stream)
                    await ensure_group(self.client, self.stream, WORKER_GROUP)
                    continue
                except RETRYABLE as exc:
                    log.warning("Redis unreachable (%s); retrying", exc)
                    await backoff.wait()
                    continue
                entries: list[Entry] = reply[0][1] if reply else []
                if last_id != ">":
                    # Walk our own pending list past what we have taken, then switch to new entries.
                    last_id = entries[-1][0].decode() if len(entries) == free else ">"
                dequeued = self.clock()
                for entry in entries:
                    if not entry[1]:
                        continue  # an entry deleted while pending: nothing to run
                    task = asyncio.create_task(self._handle(entry, dequeued))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
        finally:
            await self._drain()
            beat.cancel()
            try:
                await self.client.hdel(self.topo.heartbeats(self.pool), self.name)  # type: ignore[misc]
            except aioredis.RedisError:
                pass  # the entry ages out of the policy's view on its own

    async def _drain(self) -> None:
        if not self.tasks:
            return
        log.info("stopping: waiting up to %.0f s for %d running jobs", self.settings.grace_s, len(self.tasks))
        _done, pending = await asyncio.wait(self.tasks, timeout=self.settings.grace_s)
        for task in pending:
            # Its entry stays pending: a restart under the same --name runs it again.
            task.cancel()

    async def _handle(self, entry: Entry, dequeued: float) -> None:
        entry_id, fields = entry
        try:
            routed = decode_routed(fields[b"routed"])
        except (KeyError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._dead(entry_id, fields.get(b"routed", b""), "decode_error", str(exc), None)
            return
        job, route = routed.job, routed.route
        if job.deadline is not None and self.clock() > job.deadline:
            await self._publish(entry_id, routed, Result(
                id=job.id, status="expired", model=job.model, kind=job.kind, tenant=job.tenant,
                slo=route.slo, pool=self.pool, worker=self.name, error="deadline passed before start"))
            return
        started = self.clock()
        try:
            out = await self.backend.run(job)
        except BackendError as exc:
            await self._dead(entry_id, fields[b"routed"], "backend_error", str(exc), routed)
            return
        timing = Timing(created_at=routed.created_at, routed_at=route.routed_at, dequeued_at=dequeued,
                        started_at=started, first_token_at=out.first_token_at, finished_at=out.finished_at)
        metrics = Metrics.of(timing, out.completion_tokens)
        result = Result(
            id=job.id, status="ok", model=job.model, kind=job.kind, tenant=job.tenant, slo=route.slo,
            pool=self.pool, worker=self.name, output=out.output, embeddings=out.embeddings,
            usage=Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens),
            timing=timing, metrics=metrics, route_reason=route.reason,
            slo_met=slo_met(route.ttft_target_ms, route.tpot_target_ms, route.e2e_target_ms, metrics))
        await self._publish(entry_id, routed, result)

    async def _publish(self, entry_id: bytes, routed: RoutedJob, result: Result) -> None:
        await self.scripts.call(
            "complete", [self.stream, self.topo.done(result.id), self.topo.reply(routed.job.reply_to)],
            [WORKER_GROUP, entry_id, json_encode(result), self.settings.result_ttl_s * 1000])
        self.completed += 1

    async def _dead(self, entry_id: bytes, payload: bytes, reason: str, error: str,
                    routed: RoutedJob | None) -> None:
        letter = DeadLetter(reason=reason, error=error, stream=self.stream,  # type: ignore[arg-type]
                            entry_id=entry_id.decode(), payload=payload,
                            job_id=routed.job.id if routed else None, consumer=self.name,
                            failed_at=self.clock())
        keys = [self.stream, self.topo.dead]
        args: list[object] = [WORKER_GROUP, entry_id, json_encode(letter)]
        if routed is not None:
            job = routed.job
            failed = Result(id=job.id, status="failed", model=job.model, kind=job.kind, tenant=job.tenant,
                            slo=routed.route.slo, pool=self.pool, worker=self.name, error=f"{reason}: {error}")
            keys += [self.topo.done(job.id), self.topo.reply(job.reply_to)]
            args += [json_encode(failed), self.settings.result_ttl_s * 1000]
        await self.scripts.call("dead", keys, args)
        log.warning("dead letter %s (%s): %s", entry_id.decode(), reason, error)

    async def heartbeat(self) -> None:
        """Tell the policy this worker's load: jobs in flight out of its capacity."""
        beat = {"ts": self.clock(), "in_flight": len(self.tasks), "capacity": self.concurrency}
        await self.client.hset(self.topo.heartbeats(self.pool), self.name, json_encode(beat))  # type: ignore[arg-type, misc]

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.heartbeat()
            except Exception:  # noqa: BLE001 - a missed beat only ages our entry
                log.exception("heartbeat failed")
            await asyncio.sleep(self.settings.heartbeat_s)
