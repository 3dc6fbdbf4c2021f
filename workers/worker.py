"""The pool worker: consume a pool stream, run each job on the backend, publish, ack.

Reads only as many entries as it has free slots (its concurrency), so nothing waits in
this process that a peer could run. Each job's result goes out with the ack in one fenced
COMPLETE script (result key SET NX + XADD to the reply stream + XACK + deletion), batched
with the other jobs that end at the same time: the ack never precedes the result, and a
job whose result already exists is not published twice. A job keeps its slot until Redis
has answered for its result.

Reliability, in the order a job meets it:

* **Takeover.** Besides new entries, the worker claims entries other consumers abandoned
  (:mod:`broker.reclaim`), with Redis' delivery count. Past ``max_deliveries`` the job is
  dead-lettered with its last error instead of being run again, unless its last run only
  died with its worker: that is no evidence against it, and it runs again in a sandbox,
  up to ``delivery_cap``.
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
* **Retries.** A retryable backend error gives the entry back with a backoff (NACK); any
  worker claims it again after the backoff, which counts a delivery. Other errors
  dead-letter at once. A failure of the worker's own (a bug, or Redis refusing a script)
  is logged and retried the same way, so its dead letter carries that error.
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
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from functools import partial
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis

from broker import calls
from broker.calls import CompleteTarget, Completion, FailedJob
from broker.connection import RETRYABLE, unavailable
from broker.logs import job_context
from broker.metrics import CAPACITY, IN_FLIGHT, RECLAIMED, PoolMetrics
from broker.reclaim import CRASHED, Claimer
from broker.script_batcher import ScriptBatcher
from broker.scripts import ScriptCall, Scripts, not_a_stream, unanswerable
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
from broker.topology import RESERVED, WORKER_GROUP
from broker.wire import (
    DECODE_ERRORS,
    DeadLetter,
    Heartbeat,
    Metrics,
    ObservedJob,
    Result,
    RoutedJob,
    Status,
    Timing,
    Usage,
    decode_routed,
    json_encode,
)
from policies.config import reserved_slots
from workers.backend import Backend, BackendError
from workers.sandbox import SandboxCrashed, Sandboxes
from workers.tokens import TokenStream

log = logging.getLogger("inference_broker.worker")
T = TypeVar("T")
MAX_OBSERVATIONS = 256
"""Most job timings one heartbeat carries."""


def slo_met(route_ttft: float, route_tpot: float | None, route_e2e: float | None, m: Metrics) -> bool:
    """Whether every target that is set was met."""
    if m.time_to_first_token_ms > route_ttft:
        return False
    if route_tpot is not None and m.time_per_output_token_ms is not None and m.time_per_output_token_ms > route_tpot:
        return False
    return route_e2e is None or m.e2e_latency_ms <= route_e2e


class Lane(msgspec.Struct):
    """One priority lane of the pool: its stream, where its errors are kept, its claimer."""

    index: int
    stream: str
    errors: str
    claimer: Claimer
    completes: CompleteTarget
    """Where this worker's COMPLETE calls for the lane go (fenced on its name)."""
    cursor: str = "0-0"
    """Our own pending entries first (a restart under the same name), then ``>``: new ones."""
    suspects_waiting: bool = False
    """Its last claim pass saw suspects it left for when a sandbox is free."""


class PoolWorker:
    """One worker of pool ``pool``, running up to ``concurrency`` jobs at once.

    The pool has ``lanes`` streams, one per class priority. Each lane below the first keeps
    its share of the slots (``shares``, a class's ``min_share``) whenever it has work queued;
    the worker fills the other free slots from lane 0 (the most urgent) first and reads a
    lane only while every lane above it is empty: interactive work goes ahead of batch work,
    batch work fills idle capacity, and no sustained interactive load starves it.
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
        self.batcher = ScriptBatcher(self.scripts)
        """Completion scripts of jobs finishing together go in one pipeline."""
        self.lanes = [Lane(i, self.topo.pool(pool, i), self.topo.errors(pool, i), Claimer(
            self.scripts, self.topo.pool(pool, i), WORKER_GROUP, self.name, idle_ms=settings.claim_idle_ms,
            interval_s=settings.claim_interval_s, error_prefix=self.topo.errors(pool, i) if sandboxes else ""),
            CompleteTarget(self.topo.pool(pool, i), WORKER_GROUP, self.name, self.topo, settings.result_ttl_s * 1000))
            for i in range(lanes)]
        self.reserved = reserved_slots((*shares, *[0.0] * lanes)[:lanes], concurrency)
        """Slots each lane keeps for its own work (``PolicyConfig.lane_shares``, ``reserved_slots``)."""
        self._lane_of = {lane.stream.encode(): lane for lane in self.lanes}
        """Lanes by stream key, as XREADGROUP names them."""
        self.running: dict[tuple[int, bytes], asyncio.Task[None]] = {}
        """Jobs taken, by (lane, entry id), until their outcome is in Redis. Rarely one more than
        ``concurrency`` per lane below the first: a blocking read over every lane can wake with
        one entry from each."""
        self._sandboxed: set[tuple[int, bytes]] = set()
        """Suspects taken, until their outcome is in Redis: each holds one of the sandboxes."""
        self._publishing: set[tuple[int, bytes]] = set()
        """Those whose run is over and whose result is on its way to Redis (see _publish)."""
        self._backoffs: dict[tuple[int, bytes], Backoff] = {}
        """Backoff of each result being sent again while Redis is unreachable."""
        self.busy = 0
        """Jobs on the backend now: at most ``concurrency``."""
        self._wake = asyncio.Event()
        """Set when a job ends or leaves the backend, and at the stop: the consume loop (and a job
        over the concurrency) waits on it."""
        self.observations: collections.deque[ObservedJob] = collections.deque(maxlen=MAX_OBSERVATIONS)
        """Timings of jobs finished since the last heartbeat, what the policy learns from, the freshest if more."""
        self.beat_seq = 0
        self._leases: asyncio.Task[None] | None = None
        self._stopped_at: float | None = None
        """When ``stop`` was set (event loop time): the grace period counts from there."""
        self.completed = 0
        self.retried = 0
        self.dead = 0
        self.fenced = 0
        self.metrics = PoolMetrics(pool)
        """Prometheus instruments (broker/metrics.py), cached per class."""
        self._reclaimed = [RECLAIMED.labels(lane.stream.removeprefix(self.topo.base + ":")) for lane in self.lanes]
        IN_FLIGHT.labels(pool).set_function(lambda: len(self.running))
        CAPACITY.labels(pool).set(concurrency)

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then let running jobs finish within the grace period.

        Returns within max(``grace_s``, ``block_ms`` + :data:`STOP_TIMEOUT_S`) of the stop, plus
        ``STOP_TIMEOUT_S`` for the last words, whatever Redis does.
        """
        for lane in self.lanes:
            await ensure_group(self.client, lane.stream, WORKER_GROUP)
        beat = asyncio.create_task(every(self.settings.heartbeat_s, self.heartbeat, "heartbeat", stop))
        stopping = asyncio.create_task(stop.wait())
        stopping.add_done_callback(self._stopping)
        # Renew three times per idle period (a missed renewal still leaves two chances), and
        # keep renewing after `stop` while running jobs drain: cancelled in _drain.
        self._leases = asyncio.create_task(
            every(self.settings.claim_idle_ms / 3000, self.renew_leases, "lease renewal"))
        try:
            await until_stopped(self._consume(stop), stop, self.settings.block_ms / 1000 + STOP_TIMEOUT_S)
        finally:
            loop = asyncio.get_running_loop()
            unfinished = await self._drain((self._stopped_at or loop.time()) + self.settings.grace_s)
            beat.cancel()
            stopping.cancel()
            await self._leave(unfinished)

    def _stopping(self, _stop: asyncio.Task[object]) -> None:
        self._stopped_at = asyncio.get_running_loop().time()
        self._wake.set()

    async def _consume(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            free = self.concurrency - len(self.running)
            if free <= 0:
                # Full: wait for a job to end (or for the stop). An event rather than
                # asyncio.wait over every running task, which cost O(concurrency) per finished job.
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                free -= await self._claim(free)
                if free <= 0:
                    continue
                for lane, entry, deliveries in await self._read(free):
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
            sandboxes = min(self.sandboxes.slots - len(self._sandboxed) if self.sandboxes else 0, free - taken)
            if not (lane.claimer.due() or (lane.suspects_waiting and sandboxes > 0)):
                continue
            claimed = await lane.claimer.claim(free - taken, suspects=sandboxes)
            lane.suspects_waiting = claimed.waiting > 0
            if claimed.entries or claimed.suspects:
                self._reclaimed[lane.index].inc(len(claimed.entries) + len(claimed.suspects))
            for entry_id in claimed.deleted:
                # Redis already dropped it from the pending list: nobody owns it to fence.
                await self._dead(lane, entry_id, b"", "trimmed", "the entry was deleted while pending", None,
                                 fenced=False)
            for entry, deliveries in claimed.suspects:
                log.warning("entry %s of %s is on delivery %d and its last run died with its process: "
                            "running it in a sandbox", entry[0].decode(), lane.stream, deliveries)
                self._start(lane, entry, deliveries, sandboxed=True)
            for entry, deliveries in claimed.entries:
                self._start(lane, entry, deliveries)
            taken += len(claimed.entries) + len(claimed.suspects)
        return taken

    async def _read(self, free: int) -> list[tuple[Lane, Entry, int]]:
        """Up to ``free`` entries; blocks while every lane is empty.

        First each lane below the first up to its reserved slots (``reserved``, counting its
        jobs here), then most urgent lane first: more urgent work cannot starve a lane, and
        reserved slots that a lane leaves unused go to the others.
        """
        got: list[tuple[Lane, Entry, int]] = []
        held = collections.Counter(index for index, _ in self.running)
        drained: set[int] = set()
        for lane in self.lanes[1:]:
            want = min(self.reserved[lane.index] - held[lane.index], free - len(got))
            if want > 0:
                taken = await self._take(lane, want)
                if len(taken) < want:
                    drained.add(lane.index)
                got += taken
        for lane in self.lanes:
            if len(got) >= free:
                return got
            if lane.index not in drained:
                got += await self._take(lane, free - len(got))
        if got or len(self.lanes) == 1 or any(lane.cursor != ">" for lane in self.lanes):
            return got
        # Every lane is empty: wait for the first entry on any of them. One entry per lane at
        # most, so a wake-up takes no more than a lane's share of a peer's work.
        reply = await self.client.xreadgroup(WORKER_GROUP, self.name, {lane.stream: ">" for lane in self.lanes},
                                             count=1, block=self.settings.block_ms)
        return [(self._lane_of[stream], entry, 1) for stream, entries in reply or [] for entry in entries]

    async def _take(self, lane: Lane, want: int) -> list[tuple[Lane, Entry, int]]:
        """Up to ``want`` entries of ``lane``: our own pending ones first (see ``Lane.cursor``), then new ones."""
        own = lane.cursor != ">"
        reply = await self.client.xreadgroup(WORKER_GROUP, self.name, {lane.stream: lane.cursor}, count=want,
                                             block=None if own or len(self.lanes) > 1 else self.settings.block_ms)
        entries: list[Entry] = reply[0][1] if reply else []
        if own:
            # Walk our own pending list past what we have taken, then switch to new entries.
            lane.cursor = entries[-1][0].decode() if len(entries) == want else ">"
        return [(lane, entry, 2 if own else 1) for entry in entries]

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
                await self._nack(lane, entry[0], routed, f"{type(exc).__name__} in the worker: {exc}",
                                 delay_ms=self._backoff_ms(deliveries), delivery=deliveries)
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
            given.extend(await asyncio.gather(*(self._nack(self.lanes[index], entry_id, None, "", delay_ms=0)
                                                for index, entry_id in unfinished), return_exceptions=True))
            await self.client.hdel(self.topo.heartbeats(self.pool), self.name)  # type: ignore[misc]

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
        if len(raw) > self.settings.max_job_bytes + 65536:
            await self._dead(lane, entry_id, raw[: self.settings.max_job_bytes], "too_large",
                             f"entry is {len(raw)} bytes", None)
            return
        try:
            routed = decode_routed(raw)
        except DECODE_ERRORS as exc:
            await self._dead(lane, entry_id, raw, "decode_error", f"not a routed job: {exc}", None)
            return
        job, route = routed.job, routed.route
        if job.reply_to in RESERVED:  # not from our policy worker: there is nowhere to answer
            await self._dead(lane, entry_id, raw, "invalid_job", f"reply_to {job.reply_to!r} is reserved", None)
            return
        if deliveries > self.settings.max_deliveries:
            last, at = await self.client.hmget(lane.errors + entry_id.decode(), ["error", "delivery"])  # type: ignore[misc]
            # Past the limit, a run that only died with its worker (no evidence against the
            # job, which runs in a sandbox now) earns another try, up to delivery_cap.
            evidence = at == str(deliveries - 1).encode()  # the last run failed, or crashed its sandbox
            if not sandboxed or evidence or deliveries > self.settings.delivery_cap:
                error = last.decode(errors="replace") if evidence and last else \
                    "its worker died or stalled while running it"
                await self._dead(lane, entry_id, raw, "max_deliveries",
                                 f"delivered {deliveries - 1} times without success; last error: {error}", routed,
                                 deliveries=deliveries - 1)
                return
        if job.deadline is not None and self.clock() > job.deadline:
            self._publish(lane, entry_id, routed, deliveries,
                          self._result(routed, "expired", error="deadline passed before start"),
                          self.metrics.of(route.slo).expired.inc)
            return
        tokens = None
        if job.stream and job.kind != "embedding":
            tokens = TokenStream(self.client, self.topo.tokens(job.id), deliveries, self.settings.result_ttl_s * 1000)
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
                              self._result(routed, "expired", error=f"{type(exc).__name__}: {exc}"),
                              self.metrics.of(route.slo).expired.inc)
                return
            self.metrics.of(route.slo).failed.inc()
            # A sandbox's death is marked as such: the job stays a suspect (broker.reclaim).
            error = CRASHED + str(exc) if isinstance(exc, SandboxCrashed) else f"{type(exc).__name__}: {exc}"
            if exc.retryable and deliveries < self.settings.max_deliveries:
                # A backend that says when it can take work again (all endpoints cooling
                # down) gets the job back then, not sooner: an earlier retry only burns a delivery.
                delay = max(self._backoff_ms(deliveries), int((exc.retry_at - self.clock()) * 1000))
                delay = min(delay, self.settings.claim_idle_ms)
                await self._nack(lane, entry_id, routed, error, delay_ms=delay, delivery=deliveries)
            elif exc.retryable:
                await self._dead(lane, entry_id, raw, "max_deliveries", f"delivered {deliveries} times without "
                                 f"success; last error: {error}", routed, deliveries=deliveries)
            else:
                await self._dead(lane, entry_id, raw, "backend_error", error, routed, deliveries=deliveries)
            return
        timing = Timing(created_at=routed.created_at, routed_at=route.routed_at, dequeued_at=dequeued,
                        started_at=started, first_token_at=out.first_token_at, finished_at=out.finished_at,
                        attempt=deliveries)
        metrics = Metrics.of(timing, out.completion_tokens)
        if not sandboxed:  # a run alone in another process says nothing of this device's load
            self._observe(job.model, out.prompt_tokens, out.completion_tokens, concurrency, timing, metrics)
        result = self._result(
            routed, "ok", output=out.output, embeddings=out.embeddings,
            usage=Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens),
            timing=timing, metrics=metrics, route_reason=route.reason,
            slo_met=slo_met(route.ttft_target_ms, route.tpot_target_ms, route.e2e_target_ms, metrics))
        self._publish(lane, entry_id, routed, deliveries, result, lambda: self.metrics.of(route.slo).complete(
            metrics.queue_time_ms, metrics.time_to_first_token_ms, metrics.time_per_output_token_ms,
            metrics.e2e_latency_ms, result.slo_met))

    def _result(self, routed: RoutedJob, status: Status, **fields: Any) -> Result:
        """A result of this worker's: the job's, in its class, from this pool and worker."""
        return Result.for_job(routed.job, status, slo=routed.route.slo, pool=self.pool, worker=self.name, **fields)

    def _backoff_ms(self, deliveries: int) -> int:
        base = self.settings.retry_backoff_ms * 2 ** (deliveries - 1)
        return int(min(base, self.settings.claim_idle_ms) * random.uniform(0.5, 1.0))

    async def _script(self, call: ScriptCall[T]) -> T:
        """Run a completion script (batched), retrying while Redis is unreachable (each is idempotent)."""
        return await _retrying(lambda: self.batcher.call(call))

    def _publish(self, lane: Lane, entry_id: bytes, routed: RoutedJob, deliveries: int, result: Result,
                 counted: Callable[[], object]) -> None:
        """Queue ``result`` and the ack for the next COMPLETE; ``counted()`` runs if it becomes the
        job's outcome (not a duplicate, not fenced).

        Nothing waits for Redis here: the job's run ends now, and its slot frees when Redis has
        answered (see _finished). Waiting cost a future and a task switch per job.
        """
        key = (lane.index, entry_id)
        item = Completion(entry_id, result.id, routed.job.reply_to, json_encode(result))
        self._publishing.add(key)
        self.batcher.complete_then(lane.completes, item,
                                   partial(self._published, lane, item, routed, deliveries, counted))

    def _published(self, lane: Lane, item: Completion, routed: RoutedJob, deliveries: int,
                   counted: Callable[[], object], code: object) -> None:
        """Redis' answer to a job's COMPLETE: free the job's slot, count and log its outcome."""
        key = (lane.index, item.entry_id)
        job = routed.job
        if isinstance(code, RETRYABLE):  # the script is idempotent: send it again, later
            backoff = self._backoffs.setdefault(key, Backoff())
            log.warning("Redis unreachable while finishing job %s (%s); retrying", job.id, code)
            asyncio.get_running_loop().call_later(
                backoff.delay(), self.batcher.complete_then, lane.completes, item,
                partial(self._published, lane, item, routed, deliveries, counted))
            return
        self._backoffs.pop(key, None)
        self._publishing.discard(key)
        kind = unanswerable(code)
        if kind is not None:
            # COMPLETE wrote nothing and left the entry ours: the job's outcome is a dead letter,
            # written in the job's slot.
            raw = json_encode(routed)
            self._track(lane, (item.entry_id, {b"routed": raw}), deliveries, self._dead(
                lane, item.entry_id, raw, "invalid_job", not_a_stream(self.topo.reply(job.reply_to), kind), routed,
                deliveries=deliveries))
            return
        task = self.running.get(key)
        if task is None or task.done():
            self._finished(key)
        if isinstance(code, Exception):
            log.error("could not finish job %s: %s; it stays pending and a worker takes it over",
                      job.id, code, extra=job_context(job))
        elif code == -1:
            self.fenced += 1
            log.warning("job %s finished here after a peer took it over; result dropped", job.id,
                        extra=job_context(job))
        else:
            self.completed += 1
            if code == 1:
                counted()

    async def _nack(self, lane: Lane, entry_id: bytes, routed: RoutedJob | None, error: str, *,
                    delay_ms: int, delivery: int = 0) -> None:
        job_id = routed.job.id if routed else ""
        idle = max(0, self.settings.claim_idle_ms - delay_ms)
        code = await self._script(calls.nack(lane.stream, WORKER_GROUP, entry_id, self.name,
                                             lane.errors + entry_id.decode(), idle_ms=idle, error=error,
                                             ttl_ms=self.settings.result_ttl_s * 1000, delivery=delivery))
        if error:
            self.retried += 1
            if code == 1 and routed is not None:
                self.metrics.of(routed.route.slo).retried.inc()
            log.info("job %s failed (%s); retrying in ~%d ms", job_id, error, delay_ms,
                     extra=job_context(routed.job if routed else None))

    async def _dead(self, lane: Lane, entry_id: bytes, payload: bytes, reason: str, error: str,
                    routed: RoutedJob | None, *, deliveries: int = 1, fenced: bool = True) -> None:
        letter = DeadLetter(reason=reason, error=error, stream=lane.stream,  # type: ignore[arg-type]
                            entry_id=entry_id.decode(), payload=payload, delivery_count=deliveries,
                            job_id=routed.job.id if routed else None, consumer=self.name,
                            failed_at=self.clock()).clipped(self.settings.dead_payload_bytes)
        failed = None
        if routed is not None:
            job = routed.job
            result = self._result(routed, "failed", error=f"{reason}: {error}")
            failed = FailedJob(job.id, job.reply_to, json_encode(result), self.settings.result_ttl_s * 1000)
        consumer = self.name if fenced else ""
        if await self._script(calls.dead(lane.stream, WORKER_GROUP, entry_id, consumer, json_encode(letter),
                                         self.topo, failed)) == 1:
            self.dead += 1
            self.metrics.dead(routed.route.slo if routed else None, reason).inc()
            log.warning("dead letter %s (%s): %s", entry_id.decode(), reason, error,
                        extra=job_context(routed.job if routed else None))

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
                self.fenced += 1
                task.cancel()

    def _observe(self, model: str, prompt: int, output: int, concurrency: int, t: Timing, m: Metrics) -> None:
        self.observations.append(ObservedJob(
            model=model, prompt_tokens=prompt, output_tokens=output, concurrency=concurrency,
            ttft_ms=(t.first_token_at - t.started_at) * 1000, tpot_ms=m.time_per_output_token_ms, at=t.finished_at))

    async def heartbeat(self) -> None:
        """Tell the policy this worker's load, and the timings of the jobs it finished since."""
        cooldown = getattr(self.backend, "cooldown_until", None)  # backends with endpoints that can refuse
        sent = list(self.observations)
        self.observations.clear()
        beat = Heartbeat(ts=self.clock(), in_flight=len(self.running), capacity=self.concurrency,
                         seq=self.beat_seq + 1, obs=sent, cooling_until=cooldown() if cooldown is not None else None)
        try:
            await self.client.hset(self.topo.heartbeats(self.pool), self.name, json_encode(beat))  # type: ignore[arg-type,misc]
        except BaseException:
            # A failed write keeps the timings for the next beat (the freshest, if too many).
            self.observations = collections.deque([*sent, *self.observations], maxlen=MAX_OBSERVATIONS)
            raise
        self.beat_seq += 1


def _routed_of(entry: Entry) -> RoutedJob | None:
    """The routed job of a pool entry, if it decodes."""
    try:
        return decode_routed(entry[1].get(b"routed", b""))
    except DECODE_ERRORS:
        return None


async def _retrying(call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, retried with backoff while Redis is unreachable (the scripts are idempotent)."""
    backoff = Backoff()
    while True:
        try:
            return await call()
        except RETRYABLE as exc:
            log.warning("Redis unreachable while finishing a job (%s); retrying", exc)
            await backoff.wait()
