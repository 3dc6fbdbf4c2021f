"""The pool worker: consume a pool's lanes, run each job on the backend, publish, ack.

Reads only as many entries as it has free slots (its concurrency), so nothing waits in
this process that a peer could run (:mod:`workers.lanes`). Each job's result goes out with
the ack in one fenced COMPLETE script, batched with the other jobs that end at the same
time (:mod:`workers.outcomes`): the ack never precedes the result, and a job whose result
already exists is not published twice. A job keeps its slot until Redis has answered for
its result.

Reliability, in the order a job meets it:

* **Takeover.** Besides new entries, the worker claims entries other consumers abandoned
  (:mod:`broker.reclaim`), with Redis' delivery count; past ``max_deliveries`` a job is
  dead-lettered instead of run (:mod:`workers.outcomes`).
* **Quarantine.** A job delivered before whose earlier run left no error (its worker died
  or stalled) may be what killed it, or may have been an innocent bystander. It runs in a
  sandbox (:mod:`workers.sandbox`), a process of its own, beside the worker's other jobs: if
  it kills that process, it takes no innocent neighbour's delivery with it, and the death
  is recorded against it alone (it stays a suspect until ``max_deliveries``). The worker
  takes only as many suspects as it has sandboxes free, so a burst of innocent suspects
  after a crash wave never stops the pool taking new work.
* **Leases.** While jobs run, their entries are renewed every third of ``claim_idle_ms``
  without raising the delivery count, so a long job is not taken over while its worker
  lives. A lease found lost (this process was paused and a peer took the job) cancels
  the local run: the peer owns the job now.
* **Retries.** A failed run goes back to the pool with a backoff, or is dead-lettered
  (:mod:`workers.outcomes`). A failure of the worker's own (a bug, or Redis refusing a
  script) is logged and retried the same way, so its dead letter carries that error.
* **Shutdown.** On stop, running jobs get ``grace_s`` to finish and have their results
  written; the rest are given back at once so peers take them without waiting out the idle
  time. No step of it waits on Redis for long: if Redis is down or frozen, what could not be
  given back stays pending and peers take it over after the idle time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from typing import Any

import redis.asyncio as aioredis

from broker import calls
from broker.connection import RETRYABLE, unavailable
from broker.logs import job_context
from broker.metrics import CAPACITY, IN_FLIGHT, RECLAIMED, PoolMetrics
from broker.scripts import Scripts, not_a_stream, unanswerable
from broker.settings import Settings
from broker.streams import (
    STOP_TIMEOUT_S,
    Backoff,
    Entry,
    briefly,
    consumer_name,
    ensure_group,
    every,
    is_group_lost,
    until_stopped,
)
from broker.topology import WORKER_GROUP
from broker.wire import DECODE_ERRORS, Metrics, Result, RoutedJob, Timing, decode_routed, json_encode
from workers.backend import Backend, BackendError
from workers.lanes import Lane, LaneReader, pool_lanes
from workers.outcomes import Outcomes
from workers.sandbox import Sandboxes
from workers.telemetry import Telemetry
from workers.tokens import TokenStream

log = logging.getLogger("inference_broker.worker")


class PoolWorker:
    """One worker of pool ``pool``, running up to ``concurrency`` jobs at once.

    The pool has ``lanes`` streams, one per class priority; each lane below the first keeps
    its share of the slots (``shares``, a class's ``min_share``): see :mod:`workers.lanes`.
    """

    def __init__(self, client: aioredis.Redis, settings: Settings, pool: str, backend: Backend, *,
                 concurrency: int, lanes: int = 1, shares: Sequence[float] = (), name: str | None = None,
                 sandboxes: Sandboxes | None = None, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.settings = settings
        self.topo = settings.topology
        self.pool = pool
        self.backend = backend
        self.sandboxes = sandboxes
        """Where suspects run; without them there are no suspects (every job runs in-process)."""
        self.concurrency = concurrency
        self.name = name or consumer_name(f"worker-{pool}")
        self.clock = clock
        self.scripts = Scripts(client)
        self.lanes = pool_lanes(self.scripts, settings, pool, self.name, lanes, suspects=sandboxes is not None)
        self._wake = asyncio.Event()
        """Set when a job ends or leaves the backend, when a shard's blocking read ends, and at the
        stop: the consume loop (and a job over the concurrency) waits on it."""
        self.reader = LaneReader(client, self.lanes, self.name, concurrency=concurrency, shares=shares,
                                 block_ms=settings.block_ms, on_ready=self._wake.set)
        self.metrics = PoolMetrics(pool)
        """Prometheus instruments (broker/metrics.py), cached per class."""
        self.outcomes = Outcomes(self.scripts, settings, pool, self.name, clock=clock, metrics=self.metrics)
        self.telemetry = Telemetry(client, self.topo.heartbeats(pool), self.name, capacity=concurrency,
                                   in_flight=lambda: len(self.running), clock=clock,
                                   # backends with endpoints that can refuse work say until when
                                   cooling_until=getattr(backend, "cooldown_until", None))
        self.running: dict[tuple[int, bytes], asyncio.Task[None]] = {}
        """Jobs taken, by (lane index, entry id), until their outcome is in Redis. Rarely one more
        than ``concurrency`` per lane: a blocking read over a shard's lanes can wake with one entry
        from each (and with several shards, those of each shard's read that ends)."""
        self._sandboxed: set[tuple[int, bytes]] = set()
        """Suspects taken, until their outcome is in Redis: each holds one of the sandboxes."""
        self._publishing: set[tuple[int, bytes]] = set()
        """Those whose run is over and whose result is on its way to Redis (see _publish)."""
        self.busy = 0
        """Jobs on the backend now: at most ``concurrency``."""
        self._leases: asyncio.Task[None] | None = None
        self._stopped_at: float | None = None
        """When ``stop`` was set (event loop time): the grace period counts from there."""
        # Labelled by the stream's name within its shard, as before shards: the shards' lanes of
        # one priority share a child, and dashboards keep their series.
        self._reclaimed = [RECLAIMED.labels(lane.stream.removeprefix(lane.topo.base + ":")) for lane in self.lanes]
        IN_FLIGHT.labels(pool).set_function(lambda: len(self.running))
        CAPACITY.labels(pool).set(concurrency)

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then let running jobs finish within the grace period.

        Returns within max(``grace_s``, ``block_ms`` + :data:`STOP_TIMEOUT_S`) of the stop, plus
        ``STOP_TIMEOUT_S`` for the last words, whatever Redis does. With several shards, the
        blocking reads in flight are cancelled at the stop, so an idle worker does not wait one out.
        """
        await self.scripts.teach()  # for producers, whose users may run scripts but not load them
        for lane in self.lanes:
            await ensure_group(self.client, lane.stream, WORKER_GROUP)
        beat = asyncio.create_task(every(self.settings.heartbeat_s, self.telemetry.beat, "heartbeat", stop))
        stopping = asyncio.create_task(stop.wait())
        stopping.add_done_callback(self._stopping)
        # Renew three times per idle period (a missed renewal still leaves two chances), and
        # keep renewing after `stop` while running jobs drain: cancelled in _drain.
        self._leases = asyncio.create_task(
            every(self.settings.claim_idle_ms / 3000, self.renew_leases, "lease renewal"))
        try:
            await until_stopped(self._consume(stop), stop, self.settings.block_ms / 1000 + STOP_TIMEOUT_S)
        finally:
            await self.reader.close()  # the shards' blocking reads still in flight
            loop = asyncio.get_running_loop()
            unfinished = await self._drain((self._stopped_at or loop.time()) + self.settings.grace_s)
            beat.cancel()
            stopping.cancel()
            await self._leave(unfinished)

    def _stopping(self, _stop: asyncio.Task[object]) -> None:
        self._stopped_at = asyncio.get_running_loop().time()
        self.reader.cancel()  # the shards' blocking reads: the consume loop returns without waiting them out
        self._wake.set()

    async def _consume(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            free = self.concurrency - len(self.running)
            try:
                if free <= 0:
                    # Full: start what a shard's read brought meanwhile (taken, it must run and
                    # have its lease renewed), then wait for a job to end, a shard's read to end,
                    # or the stop. An event rather than asyncio.wait over every running task,
                    # which cost O(concurrency) per finished job.
                    for lane, entry, deliveries in self.reader.ready():
                        self._start(lane, entry, deliveries)
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                free -= await self._claim(free)
                if free <= 0:
                    continue
                held = collections.Counter(self.lanes[index].priority for index, _ in self.running)
                for lane, entry, deliveries in await self.reader.read(free, held):
                    self._start(lane, entry, deliveries)
                backoff.reset()
            except RETRYABLE as exc:  # first: out of memory and failovers are ResponseErrors too
                log.warning("%s; retrying", unavailable(exc))
                await backoff.wait()
            except aioredis.ResponseError as exc:
                if not is_group_lost(exc):
                    raise
                log.error("a stream of pool %s or its group is gone (Redis restarted empty, or the key was "
                          "deleted): jobs queued there may be lost; recreating the groups at 0", self.pool)
                for lane in self.lanes:
                    await ensure_group(self.client, lane.stream, WORKER_GROUP)

    async def _claim(self, free: int) -> int:
        """Take over abandoned entries, most urgent lane first; returns how many were taken."""
        taken = 0
        for lane in self.lanes:
            if taken >= free:
                break
            if lane.cursor != ">":
                # Not before our own pending entries are read (Lane.cursor): that read of history
                # would take again what we had claimed, and Redis counts it as a delivery that
                # never ran (and runs in-process a suspect we left under our name).
                continue
            sandboxes = min(self.sandboxes.slots - len(self._sandboxed) if self.sandboxes else 0, free - taken)
            if not (lane.claimer.due() or (lane.suspects_waiting and sandboxes > 0)):
                continue
            claimed = await lane.claimer.claim(free - taken, suspects=sandboxes)
            lane.suspects_waiting = claimed.waiting > 0
            if claimed.entries or claimed.suspects:
                self._reclaimed[lane.index].inc(len(claimed.entries) + len(claimed.suspects))
            for entry_id in claimed.deleted:
                # Redis already dropped it from the pending list: nobody owns it to fence.
                await self.outcomes.dead_letter(lane, entry_id, b"", "trimmed", "the entry was deleted while pending",
                                                None, fenced=False)
            for entry, deliveries in claimed.suspects:
                log.warning("entry %s of %s is on delivery %d and its last run died with its process: "
                            "running it in a sandbox", entry[0].decode(), lane.stream, deliveries)
                self._start(lane, entry, deliveries, sandboxed=True)
            for entry, deliveries in claimed.entries:
                self._start(lane, entry, deliveries)
            taken += len(claimed.entries) + len(claimed.suspects)
        return taken

    def _start(self, lane: Lane, entry: Entry, deliveries: int, *, sandboxed: bool = False) -> None:
        key = (lane.index, entry[0])
        if key in self.running or not entry[1]:
            return  # already running here, or deleted while pending
        if sandboxed:
            self._sandboxed.add(key)
        self._track(lane, entry, deliveries, self._handle(lane, entry, deliveries, self.clock(), sandboxed))

    def _track(self, lane: Lane, entry: Entry, deliveries: int, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` for a job in the job's slot (see ``running``), in place of what ran there."""
        key = (lane.index, entry[0])
        task = asyncio.create_task(self._guarded(lane, entry, deliveries, work))
        self.running[key] = task
        task.add_done_callback(lambda done: self._ended(key, done))

    async def _guarded(self, lane: Lane, entry: Entry, deliveries: int, work: Coroutine[Any, Any, None]) -> None:
        """``work``; should it fail (a bug here, or Redis refusing a script), the job is given back
        with the error, so it is retried and dead-lettered with that error after ``max_deliveries``."""
        try:
            await work
        except Exception as exc:  # noqa: BLE001 - one job's failure must not be lost, nor stop the worker
            routed = _routed_of(entry)
            log.exception("job %s (entry %s of %s) failed in the worker; giving it back",
                          routed.job.id if routed else "?", entry[0].decode(), lane.stream,
                          extra=job_context(routed.job if routed else None))
            try:
                await self.outcomes.nack(lane, entry[0], routed, f"{type(exc).__name__} in the worker: {exc}",
                                         delay_ms=self.outcomes.backoff_ms(deliveries), delivery=deliveries)
            except Exception:  # noqa: BLE001 - its lease lapses and a worker takes it over
                log.exception("could not give back entry %s of %s", entry[0].decode(), lane.stream)

    def _ended(self, key: tuple[int, bytes], task: asyncio.Task[None]) -> None:
        if self.running.get(key) is not task:
            return  # another task took the slot over (see _published)
        if key not in self._publishing:  # else the answer to its result frees the slot
            self._finished(key)

    def _finished(self, key: tuple[int, bytes]) -> None:
        """The job's run is over and its outcome in Redis (or it was given up): free its slot."""
        self.running.pop(key, None)
        self._sandboxed.discard(key)
        self._wake.set()

    async def _drain(self, deadline: float) -> list[tuple[int, bytes]]:
        """Let running jobs finish until ``deadline`` (event loop time); cancel the rest and
        return their keys."""
        loop = asyncio.get_running_loop()
        if self.running:
            log.info("stopping: waiting up to %.0f s for %d running jobs", max(0.0, deadline - loop.time()),
                     len(self.running))
        while self.running and loop.time() < deadline:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
        # Stop renewing first: a renewal landing after a give-back would undo it.
        if self._leases is not None:
            self._leases.cancel()
            await asyncio.wait({self._leases}, timeout=STOP_TIMEOUT_S)
        # Runs still going are given back; a finished job whose result is still on its way
        # (Redis unreachable) stays pending for a peer to take over.
        pending = {key: task for key, task in self.running.items() if not task.done()}
        for task in pending.values():
            task.cancel()
        if pending:  # a run stuck on Redis ends at once; a backend that ignores the cancel is not waited for
            await asyncio.wait(pending.values(), timeout=STOP_TIMEOUT_S)
        return list(pending)

    async def _leave(self, unfinished: list[tuple[int, bytes]]) -> None:
        """Give the unfinished jobs back and remove our heartbeat, within :data:`STOP_TIMEOUT_S`.

        Given back, a job is claimed by a peer on its next pass rather than after the idle
        time. If Redis does not answer in time, the jobs stay pending under our name and are
        taken over after ``claim_idle_ms``, and the heartbeat expires (the janitor).
        """
        given: list[object] = []

        async def last_words() -> None:
            # Each give-back is retried by itself while Redis is away; one failing ends no other.
            given.extend(await asyncio.gather(*(self.outcomes.nack(self.lanes[index], entry_id, None, "", delay_ms=0)
                                                for index, entry_id in unfinished), return_exceptions=True))
            await self.telemetry.remove()

        await briefly(last_words(), "give back unfinished jobs and remove the heartbeat")
        back = sum(not isinstance(outcome, BaseException) for outcome in given)
        if back:
            log.warning("gave back %d unfinished jobs to the pool", back)
        if len(unfinished) > back:
            log.warning("%d unfinished jobs stay pending: a peer takes them over after %d ms",
                        len(unfinished) - back, self.settings.claim_idle_ms)

    async def _handle(self, lane: Lane, entry: Entry, deliveries: int, dequeued: float, sandboxed: bool) -> None:
        entry_id, fields = entry
        raw = fields.get(b"routed", b"")
        routed = await self.outcomes.admitted(lane, entry_id, raw, deliveries, sandboxed=sandboxed)
        if routed is None:
            return
        job, route = routed.job, routed.route
        if job.deadline is not None and self.clock() > job.deadline:
            self._publish(lane, entry_id, routed, deliveries,
                          self.outcomes.result(routed, "expired", error="deadline passed before start"),
                          self.metrics.of(route.slo).expired.inc)
            return
        tokens = None
        if job.stream and job.kind != "embedding":
            tokens = TokenStream(self.client, lane.keys(routed).tokens(job.id), deliveries,
                                 self.settings.result_ttl_s * 1000)
        try:
            while self.busy >= self.concurrency:
                self._wake.clear()
                await self._wake.wait()
            self.busy += 1
            try:
                started = self.clock()
                concurrency = min(len(self.running), self.concurrency)
                backend: Backend = self.sandboxes if sandboxed and self.sandboxes is not None else self.backend
                out = await backend.run(job, on_token=tokens.put if tokens else None)
            finally:
                self.busy -= 1
                self._wake.set()
            if tokens is not None:
                await tokens.close("ok")
        except asyncio.CancelledError:
            if tokens is not None:
                tokens.abort()
            raise
        except Exception as exc:  # noqa: BLE001 - a backend bug must not stop the worker
            if tokens is not None:
                await tokens.close("expired" if isinstance(exc, BackendError) and exc.expired else "failed")
            if not isinstance(exc, BackendError):
                log.exception("backend %s raised unexpectedly on job %s", self.backend.name, job.id,
                              extra=job_context(job))
                exc = BackendError(f"{type(exc).__name__}: {exc}", retryable=True)
            if exc.expired:
                self._publish(lane, entry_id, routed, deliveries,
                              self.outcomes.result(routed, "expired", error=f"{type(exc).__name__}: {exc}"),
                              self.metrics.of(route.slo).expired.inc)
            else:
                await self.outcomes.failed(lane, entry_id, raw, routed, deliveries, exc)
            return
        timing = Timing(created_at=routed.created_at, routed_at=route.routed_at, dequeued_at=dequeued,
                        started_at=started, first_token_at=out.first_token_at, finished_at=out.finished_at,
                        attempt=deliveries)
        metrics = Metrics.of(timing, out.completion_tokens)
        if not sandboxed:  # a run alone in another process says nothing of this device's load
            self.telemetry.observe(job.model, out.prompt_tokens, out.completion_tokens, concurrency, timing, metrics)
        result = self.outcomes.served(routed, out, timing, metrics)
        self._publish(lane, entry_id, routed, deliveries, result, lambda: self.metrics.of(route.slo).complete(
            metrics.queue_time_ms, metrics.time_to_first_token_ms, metrics.time_per_output_token_ms,
            metrics.e2e_latency_ms, result.slo_met))

    def _publish(self, lane: Lane, entry_id: bytes, routed: RoutedJob, deliveries: int, result: Result,
                 counted: Callable[[], object]) -> None:
        """Queue ``result`` and the ack for the next COMPLETE; ``counted()`` runs if it becomes the
        job's outcome (not a duplicate, not fenced).

        The job's run ends now, and its slot frees when Redis has answered (see _published).
        """
        self._publishing.add((lane.index, entry_id))
        self.outcomes.publish(lane, entry_id, routed, result,
                              partial(self._published, lane, entry_id, routed, deliveries, counted))

    def _published(self, lane: Lane, entry_id: bytes, routed: RoutedJob, deliveries: int,
                   counted: Callable[[], object], code: object) -> None:
        """Redis' answer to a job's COMPLETE: free the job's slot, count and log its outcome."""
        key = (lane.index, entry_id)
        self._publishing.discard(key)
        kind = unanswerable(code)
        if kind is not None:
            # COMPLETE wrote nothing and left the entry ours: the job's outcome is a dead letter,
            # written in the job's slot.
            raw = json_encode(routed)
            stream = lane.keys(routed).reply(routed.job.reply_to)
            self._track(lane, (entry_id, {b"routed": raw}), deliveries, self.outcomes.dead_letter(
                lane, entry_id, raw, "invalid_job", not_a_stream(stream, kind), routed, deliveries=deliveries))
            return
        task = self.running.get(key)
        if task is None or task.done():
            self._finished(key)
        self.outcomes.tally(routed.job, code, counted)

    async def renew_leases(self) -> None:
        """Renew the entries of running jobs; cancel the runs whose entries a peer took over."""
        for lane in self.lanes:
            ids = [entry_id for index, entry_id in self.running if index == lane.index]
            if ids:
                lost = await self.scripts.call(calls.renew(lane.stream, WORKER_GROUP, self.name, ids))
                self._lost(lane, lost or [])

    def _lost(self, lane: Lane, lost: list[bytes]) -> None:
        for entry_id in lost:
            task = self.running.get((lane.index, entry_id))
            if task is not None:
                log.warning("lost the lease on %s (this worker stalled past %d ms and a peer took it over); "
                            "dropping the local run", entry_id.decode(), self.settings.claim_idle_ms)
                self.outcomes.fenced += 1
                task.cancel()


def _routed_of(entry: Entry) -> RoutedJob | None:
    """The routed job of a pool entry, if it decodes."""
    try:
        return decode_routed(entry[1].get(b"routed", b""))
    except DECODE_ERRORS:
        return None
