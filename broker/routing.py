"""One shard's routing: read its ingress stream, classify, route, move jobs to its pool lanes.

Per batch of entries it decodes and validates each job, classifies it, asks the shared
:class:`~broker.decider.Decider` for a pool and then moves all of them in one pipeline of
ROUTE scripts (each atomic: XADD to the pool + XACK and XDEL on ingress + a routed marker
that makes a second routing of the same job id a no-op). Bad entries become dead letters in
the same pipeline; nothing stops the loop. Entries a dead policy worker left pending are
taken over by live ones (:mod:`broker.reclaim`); one that keeps killing policy workers is
dead-lettered after ``max_deliveries``.

Every key a :class:`ShardRouter` touches is its shard's (one hash tag): a job never leaves
the shard it was submitted to. A router reads one space's ingress (the default space's, or a
tenant's: docs/security.md), and the tenant of its jobs is the space's, never the payload's:
a job that names another tenant is dead-lettered as ``forged_tenant``. A policy worker runs
one per shard and space (:class:`broker.policy_worker.PolicyWorker`), all deciding with the
same view of the fleet.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from prometheus_client import Counter

from broker import calls
from broker.calls import CompleteTarget, Completion, FailedJob, RouteMove
from broker.connection import RETRYABLE, unavailable
from broker.decider import Decider
from broker.ingress import entry_payload, salvage
from broker.logs import job_context, printable
from broker.metrics import RECLAIMED, PolicyMetrics
from broker.reclaim import Claimer
from broker.scripts import ScriptCall, Scripts, not_a_stream, unanswerable
from broker.settings import Settings
from broker.streams import Backoff, Entry, ensure_group, is_group_lost, pipeline
from broker.topology import DEFAULT_TENANT, POLICY_GROUP, WORKER_GROUP, Topology, shard_of
from broker.wire import (
    DeadLetter,
    InvalidJob,
    Job,
    Result,
    Route,
    RoutedJob,
    Status,
    decode_job,
    json_encode,
)
from policies import JobFeatures, PolicyConfig

log = logging.getLogger("inference_broker.policy")


def entry_time(entry_id: bytes) -> float:
    """Seconds since the epoch at which Redis added the entry (from its id)."""
    return int(entry_id.split(b"-", 1)[0]) / 1000


class Counts(msgspec.Struct):
    """What a policy worker did since it started, over all its shards (its heartbeat says)."""

    routed: int = 0
    dead: int = 0


class ShardRouter:
    """Routes the jobs of shard ``topo``'s ingress (of ``topo``'s space) for policy worker ``name``."""

    def __init__(self, client: aioredis.Redis, scripts: Scripts, settings: Settings, config: PolicyConfig,
                 topo: Topology, *, name: str, decider: Decider, metrics: PolicyMetrics, counts: Counts,
                 clock: Callable[[], float]) -> None:
        self.client = client
        self.scripts = scripts
        self.settings = settings
        self.config = config
        self.topo = topo
        self.name = name
        self.decider = decider
        self.metrics = metrics
        self.counts = counts
        self.clock = clock
        # No policy worker records errors, so every entry delivered twice is a suspect:
        # claimed one at a time and routed alone (see broker.reclaim).
        self.claimer = Claimer(scripts, topo.jobs, POLICY_GROUP, name, idle_ms=settings.claim_idle_ms,
                               interval_s=settings.claim_interval_s,
                               error_prefix=f"{topo.base}:err:policy:{topo.rel}")  # entry ids are per stream
        self.lanes = {p: [topo.pool(p, lane) for lane in range(config.lanes)] for p in config.pools}
        """Each pool's streams on this shard, one per priority lane, most urgent first."""
        self.lane = {slo: config.lane(slo) for slo in config.classes}
        """The lane of each class in the pool's streams."""
        self.replies = frozenset() if topo.tenant else settings.replies
        """The reply streams this space's jobs may name (empty: any; a tenant's are all its own)."""
        self._outcomes: list[Counter | None] = []
        """The counter each script queued on the batch's pipeline adds to if it did its move."""
        self._routes: list[RouteMove] = []
        """The batch's routed entries, for one ROUTE."""
        self._routed_to: list[Counter] = []
        """The routed counter of each of those entries."""
        self._finished: list[Completion] = []
        """Results of the batch's jobs that end here (expired, shed), for one COMPLETE."""
        self._finished_in: list[Counter] = []
        self._finish_target = CompleteTarget(topo.jobs, POLICY_GROUP, "", topo, settings.result_ttl_s * 1000,
                                             mark=True)
        self._reclaimed = RECLAIMED.labels("jobs")

    async def setup(self) -> None:
        """Create the shard's ingress group and every pool lane's group (at id 0) before reading."""
        await ensure_group(self.client, self.topo.jobs, POLICY_GROUP)
        for lanes in self.lanes.values():
            for stream in lanes:
                await ensure_group(self.client, stream, WORKER_GROUP)

    async def run(self, stop: asyncio.Event) -> None:
        """Route this shard's jobs until ``stop`` is set."""
        # First our own pending entries (a restart under the same name), then new ones.
        last_id = "0"
        backoff = Backoff()
        reply: Any = None  # the next read, when it came back with the last batch's moves
        while not stop.is_set():
            try:
                if self.claimer.due():
                    claimed = await self.claimer.claim(self.settings.batch, suspects=1)
                    if claimed.entries or claimed.suspects:
                        self._reclaimed.inc(len(claimed.entries) + len(claimed.suspects))
                    await self._handle_surely(claimed.entries, trimmed=claimed.deleted)
                    for suspect in claimed.suspects:
                        await self._handle_surely([suspect])
                if reply is None:
                    reply = await self.client.xreadgroup(
                        POLICY_GROUP, self.name, {self.topo.jobs: last_id},
                        count=self.settings.batch, block=None if last_id == "0" else self.settings.block_ms,
                    )
                entries: list[Entry] = reply[0][1] if reply else []
                reply = None
                if last_id == "0" and not entries:
                    last_id = ">"
                    continue
                if entries:
                    reply = await self._handle_surely([(e, 1) for e in entries], read_next=last_id == ">")
                backoff.reset()
            except RETRYABLE as exc:
                log.warning("Redis unavailable: %s; retrying", unavailable(exc))
                reply = None
                await backoff.wait()
            except aioredis.ResponseError as exc:
                if not is_group_lost(exc):
                    raise
                log.error("the ingress stream %s or its group is gone (Redis restarted empty, or the key "
                          "was deleted): jobs not yet routed may be lost; recreating groups at 0", self.topo.jobs)
                await self.setup()

    async def _handle_surely(self, entries: list[tuple[Entry, int]], trimmed: Sequence[bytes] = (),
                             read_next: bool = False) -> Any:
        """:meth:`handle`, tried again as it was while Redis refuses writes (out of memory) or
        cannot be reached; returns the next read, as ``handle`` does.

        Meanwhile the entries stay ours: they are renewed before each new try, so no claim
        pass takes them. A claim would count a delivery each time, and a long outage would
        end with innocent jobs dead-lettered for ``max_deliveries``; a renewal leaves the
        count alone.
        """
        backoff = Backoff(cap=min(5.0, self.settings.claim_idle_ms / 3000))
        lost_read = False
        while True:
            try:
                if backoff.failures and entries:
                    await self.scripts.call(calls.renew(self.topo.jobs, POLICY_GROUP, self.name,
                                                        (entry_id for (entry_id, _f), _n in entries)))
                read = await self.handle(entries, trimmed, read_next=read_next and not lost_read)
                break
            except RETRYABLE as exc:
                log.warning("could not route %d entries: %s; trying again", len(entries) + len(trimmed),
                            unavailable(exc))
                lost_read = lost_read or read_next  # that round trip's read may have taken entries
                await backoff.wait()
        if lost_read:
            # Entries the failed round trip read are pending under our name: read them there.
            read = await self.client.xreadgroup(POLICY_GROUP, self.name, {self.topo.jobs: "0"},
                                                count=self.settings.batch)
        return read

    async def handle(self, entries: list[tuple[Entry, int]], trimmed: Sequence[bytes] = (),
                     read_next: bool = False) -> Any:
        """Route a batch of ingress entries (with their delivery counts) in one pipeline.

        The routed entries go to Redis as one ROUTE call, the jobs that end here (expired,
        shed) as one COMPLETE and each bad entry as a DEAD, all in the same round trip. With
        ``read_next``, the next read of new entries goes in that round trip too (after the
        moves, so nothing read is in this batch) and its reply is returned: at low load a
        job then waits for one round trip of the policy worker's, not two.
        """
        pipe = pipeline(self.client)
        self._outcomes = []
        self._routes, self._routed_to, self._finished, self._finished_in = [], [], [], []
        now = self.clock()
        for (entry_id, fields), deliveries in entries:
            try:
                if deliveries > self.settings.max_deliveries:
                    raise InvalidJob("max_deliveries", f"delivered {deliveries - 1} times to policy workers "
                                                       "that died or stalled before routing it")
                self._route_one(pipe, entry_id, fields, now)
            except InvalidJob as exc:
                self._dead(pipe, entry_id, fields, exc, now)
            except Exception as exc:  # noqa: BLE001 - one entry must not stop the loop
                log.exception("could not route entry %s", entry_id.decode())
                self._dead(pipe, entry_id, fields,
                           InvalidJob("internal_error", printable(f"{type(exc).__name__}: {exc}")), now)
        for entry_id in trimmed:
            self._dead(pipe, entry_id, {}, InvalidJob("trimmed", "the entry was deleted while pending"), now)
        counters: list[Counter | None] = list(self._outcomes)
        # The entry and reply stream of each job ROUTE or COMPLETE moves, for a refusal (see below).
        moving: list[tuple[bytes, str] | None] = [None] * len(counters)
        if self._finished:
            self.scripts.queue(pipe, calls.complete(self._finish_target, self._finished))
            counters += self._finished_in
            moving += [(item.entry_id, item.reply) for item in self._finished]
        if self._routes:
            self.scripts.queue(pipe, calls.route(POLICY_GROUP, self.topo, self.settings.result_ttl_s * 1000,
                                                 self._routes))
            counters += self._routed_to
            moving += [(move.entry_id, move.reply) for move in self._routes]
        if read_next:
            pipe.xreadgroup(POLICY_GROUP, self.name, {self.topo.jobs: ">"}, count=self.settings.batch,
                            block=self.settings.block_ms)
        if not len(pipe):
            return None
        replies = await self.scripts.execute(pipe)
        read = replies.pop() if read_next else None
        singles = len(self._outcomes)
        codes = [*replies[:singles], *(code for batch in replies[singles:] for code in batch)]  # type: ignore[attr-defined]
        _count(counters, codes)
        refused = [(*job, kind) for job, code in zip(moving, codes, strict=True)
                   if job is not None and (kind := unanswerable(code)) is not None]
        if refused:
            await self._dead_unanswerable(entries, refused, now)
        return read

    async def _dead_unanswerable(self, entries: list[tuple[Entry, int]], refused: list[tuple[bytes, str, str]],
                                 now: float) -> None:
        """Dead-letter the jobs whose reply stream is a key of another type (``kind``): ROUTE and
        COMPLETE left them pending with nothing written. Rare: a round trip of their own."""
        fields = {entry_id: entry_fields for (entry_id, entry_fields), _ in entries}
        pipe = pipeline(self.client)
        self._outcomes = []
        for entry_id, reply, kind in refused:
            self._dead(pipe, entry_id, fields[entry_id],
                       InvalidJob("invalid_job", not_a_stream(self.topo.under(reply), kind)), now)
        _count(self._outcomes, await self.scripts.execute(pipe))

    def _queue(self, pipe: aioredis.client.Pipeline, call: ScriptCall[object], counter: Counter | None) -> None:
        self.scripts.queue(pipe, call)
        self._outcomes.append(counter)

    def _route_one(self, pipe: aioredis.client.Pipeline, entry_id: bytes, fields: dict[bytes, bytes],
                   now: float) -> None:
        payload = entry_payload(fields)
        limit = self.settings.max_job_bytes
        if len(payload) > limit:
            raise InvalidJob("too_large", f"job is {len(payload)} bytes; the limit is {limit}")
        job = self._owned(decode_job(payload))
        if self.replies and job.reply_to not in self.replies:
            raise InvalidJob("invalid_job", f"`$.reply_to` {job.reply_to!r} is none of this deployment's reply "
                                            f"streams ({', '.join(sorted(self.replies))}: IB_REPLY_STREAMS)")
        if (home := shard_of(job.id, self.topo.shards)) != self.topo.shard:
            raise InvalidJob("wrong_shard", f"job {job.id} belongs on shard {home} (CLUSTER KEYSLOT of its id mod "
                             f"{self.topo.shards}), not {self.topo.shard}: XADD it to {self.topo.at(home).jobs}")
        created = job.created_at if job.created_at is not None else entry_time(entry_id)
        features = JobFeatures(tenant=job.tenant, model=job.model, kind=job.kind,
                               prompt_tokens=job.prompt_tokens(), max_tokens=job.max_tokens,
                               slo_hint=job.slo)
        slo, reason, decision = self.decider.decide(features)  # before the deadline: metrics count expiries per class
        if job.deadline is not None and now > job.deadline:
            self._finish(entry_id, job, "expired", "deadline passed before routing", self.metrics.expired(slo))
            return
        if decision.shed:
            self._finish(entry_id, job, "rejected", decision.reason, self.metrics.shed(slo),
                         slo=slo, retry_after_s=decision.retry_after_s)
            return
        if decision.pool is None:
            raise InvalidJob("unknown_model", decision.reason)
        admission = self.decider.admit(features, job.id, decision.pool, self.lane[slo], now)
        if not admission.admitted:  # the tenant's quota or fair share (policies.tenants)
            self._finish(entry_id, job, "rejected", admission.reason, self.metrics.shed(slo),
                         slo=slo, retry_after_s=admission.retry_after_s)
            return
        target = self.config.classes[slo]
        routed = RoutedJob(job=job, created_at=created, space=self.topo.tenant, route=Route(
            pool=decision.pool, slo=slo, reason=reason, routed_at=now,
            ttft_target_ms=target.ttft_ms, tpot_target_ms=target.tpot_ms, e2e_target_ms=target.e2e_ms,
            predicted_ttft_ms=decision.predicted_ttft_ms, policy=self.name))
        self._routes.append(RouteMove(entry_id, self.lanes[decision.pool][self.lane[slo]], job.id,
                                      json_encode(routed), self.topo.reply_path(job.reply_to)))
        self._routed_to.append(self.metrics.routed(slo, decision.pool))
        self.counts.routed += 1
        self.decider.routed(decision.pool, self.lane[slo])

    def _owned(self, job: Job) -> Job:
        """``job`` as its tenant's: the one whose ingress it came on, whatever its ``tenant`` says.

        On a tenant's ingress only that tenant's credentials can write (docs/security.md), so a
        job naming another tenant is forged, and is refused rather than corrected: its producer
        learns of it. On the default ingress, ``tenant`` stays a label unless it names a tenant
        with a space of its own.
        """
        owner = self.topo.tenant
        if owner:
            if job.tenant not in (DEFAULT_TENANT, owner):
                raise InvalidJob("forged_tenant", f"the job names tenant {printable(job.tenant)!r} but came on tenant "
                                                  f"{owner!r}'s ingress: leave `tenant` out, it comes from credentials")
            return job if job.tenant == owner else msgspec.structs.replace(job, tenant=owner)
        if job.tenant in self.config.tenants:
            own = self.topo.of_tenant(job.tenant).jobs
            raise InvalidJob("forged_tenant", f"the job names tenant {job.tenant!r} on the default ingress: "
                                              f"submit with {job.tenant}'s credentials to {own}")
        return job

    def _finish(self, entry_id: bytes, job: Job, status: Status, error: str, counter: Counter, *,
                slo: str | None = None, retry_after_s: float | None = None) -> None:
        result = Result.for_job(job, status, slo=slo, error=error, retry_after_s=retry_after_s)
        self._finished.append(Completion(entry_id, self.topo.rel, job.id, self.topo.reply_path(job.reply_to),
                                         json_encode(result)))
        self._finished_in.append(counter)

    def _dead(self, pipe: aioredis.client.Pipeline, entry_id: bytes, fields: dict[bytes, bytes],
              exc: InvalidJob, now: float) -> None:
        raw = fields.get(b"job") or fields.get(b"__data__") or json_encode(
            {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()})
        job = None
        # An entry whose bytes were not read as a job (docs/wire-format.md) gets no result,
        # even when an id can be picked out of them: one outcome, the dead letter. Nor does
        # one sent to the wrong shard: its id's outcome belongs on its own shard.
        if exc.reason not in ("decode_error", "too_large", "wrong_shard"):
            try:
                job = salvage(entry_payload(fields))  # unwraps a FastStream envelope
            except InvalidJob:
                job = None
            if job is not None and self.topo.tenant:
                job.tenant = self.topo.tenant  # its result, in the sender's space, names the sender
        letter = DeadLetter(reason=exc.reason, error=str(exc), stream=self.topo.jobs,
                            entry_id=entry_id.decode(), payload=raw, job_id=job.id if job else None,
                            consumer=self.name, failed_at=now)
        # More than max_job_bytes is never a job: a too_large entry keeps no more than that.
        letter = letter.clipped(min(self.settings.max_job_bytes, self.settings.dead_payload_bytes))
        failed = None
        if job is not None:
            result = Result.for_job(job, "failed", error=f"{exc.reason}: {exc}")
            failed = FailedJob(job.id, job.reply_to, json_encode(result), self.settings.result_ttl_s * 1000, mark=True)
        dead = calls.dead(self.topo.jobs, POLICY_GROUP, entry_id, "", json_encode(letter), self.topo, failed)
        self._queue(pipe, dead, self.metrics.dead(None, exc.reason))
        self.counts.dead += 1
        log.warning("dead letter %s (%s): %s", entry_id.decode(), exc.reason, exc,
                    extra=job_context(None, job.id if job else None))


def _count(counters: Sequence[Counter | None], codes: Sequence[object]) -> None:
    """Count each move Redis did (code 1; 0 is a duplicate: the job already had an outcome).
    One increment per counter and batch: each takes a lock."""
    moved = collections.Counter(counter for counter, code in zip(counters, codes, strict=True)
                                if code == 1 and counter is not None)
    for counter, n in moved.items():
        counter.inc(n)
