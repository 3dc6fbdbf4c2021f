"""How a pool worker's jobs end in Redis: a result with the ack, a NACK back to the pool, or a dead letter.

Each is one fenced, idempotent script on the job's entry (:mod:`broker.calls`): it acts only
while the entry is this worker's, so a worker that stalled past its lease and woke up cannot
publish over the peer that took the job. Results of jobs ending together go in one pipeline
(:class:`~broker.script_batcher.ScriptBatcher`); every script is sent again while Redis is
unreachable.

* **Admission.** An entry that is too large, does not decode, or names a reserved reply
  stream is dead-lettered without running.
* **Retries.** A retryable backend error gives the entry back with a backoff (NACK); any
  worker claims it again after the backoff, which counts a delivery. Other errors
  dead-letter at once.
* **Delivery limit.** Past ``max_deliveries`` the job is dead-lettered with its last error
  instead of being run again, unless its last run only died with its worker: that is no
  evidence against it, and it runs again in a sandbox, up to ``delivery_cap``. The NACK
  script records each failed delivery's error in the lane's error hash for this check.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from broker import calls
from broker.calls import Completion, FailedJob
from broker.connection import RETRYABLE
from broker.logs import job_context
from broker.metrics import PoolMetrics
from broker.reclaim import CRASHED
from broker.script_batcher import ScriptBatcher
from broker.scripts import ScriptCall, Scripts
from broker.settings import Settings
from broker.streams import Backoff
from broker.topology import WORKER_GROUP
from broker.wire import (
    DECODE_ERRORS,
    DeadLetter,
    Job,
    Metrics,
    Result,
    RoutedJob,
    Status,
    Timing,
    Usage,
    decode_routed,
    json_encode,
)
from workers.backend import BackendError, InferenceOutput
from workers.lanes import Lane
from workers.sandbox import SandboxCrashed

log = logging.getLogger("inference_broker.worker")
T = TypeVar("T")


def slo_met(route_ttft: float, route_tpot: float | None, route_e2e: float | None, m: Metrics) -> bool:
    """Whether every target that is set was met."""
    if m.time_to_first_token_ms > route_ttft:
        return False
    if route_tpot is not None and m.time_per_output_token_ms is not None and m.time_per_output_token_ms > route_tpot:
        return False
    return route_e2e is None or m.e2e_latency_ms <= route_e2e


class Outcomes:
    """Writes the outcomes of the jobs of worker ``name`` of ``pool``, and counts them."""

    def __init__(self, scripts: Scripts, settings: Settings, pool: str, name: str, *,
                 clock: Callable[[], float], metrics: PoolMetrics) -> None:
        self.scripts = scripts
        self.settings = settings
        self.pool = pool
        self.name = name
        self.clock = clock
        self.metrics = metrics
        self.batcher = ScriptBatcher(scripts)
        """Completion scripts of jobs finishing together go in one pipeline."""
        self.completed = 0
        self.retried = 0
        self.dead = 0
        self.fenced = 0
        """Jobs let go because a peer had taken them over: a result dropped, or a run cancelled on a lost lease."""

    def result(self, routed: RoutedJob, status: Status, **fields: Any) -> Result:
        """A result of this worker's: the job's, in its class, from this pool and worker."""
        return Result.for_job(routed.job, status, slo=routed.route.slo, pool=self.pool, worker=self.name, **fields)

    def served(self, routed: RoutedJob, out: InferenceOutput, timing: Timing, metrics: Metrics) -> Result:
        """The result of a run that went through: its output, timings and whether its class's targets held."""
        route = routed.route
        return self.result(
            routed, "ok", output=out.output, embeddings=out.embeddings,
            usage=Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens),
            timing=timing, metrics=metrics, route_reason=route.reason,
            slo_met=slo_met(route.ttft_target_ms, route.tpot_target_ms, route.e2e_target_ms, metrics))

    def backoff_ms(self, deliveries: int) -> int:
        """How long a job that failed on delivery ``deliveries`` waits before it is retried."""
        base = self.settings.retry_backoff_ms * 2 ** (deliveries - 1)
        return int(min(base, self.settings.claim_idle_ms) * random.uniform(0.5, 1.0))

    def publish(self, lane: Lane, entry_id: bytes, routed: RoutedJob, result: Result,
                answered: Callable[[object], None]) -> None:
        """Queue ``result`` and the ack for the next COMPLETE; ``answered(code)`` gets Redis' answer.

        Nothing waits for Redis here: waiting cost a future and a task switch per job. While
        Redis is unreachable the script (idempotent) is sent again, later, and only the
        final answer is passed on.
        """
        keys = lane.keys(routed)  # checked by admitted()
        item = Completion(entry_id, keys.rel, result.id, keys.reply_path(routed.job.reply_to), json_encode(result))
        self._complete(lane, item, routed.job, answered, Backoff())

    def _complete(self, lane: Lane, item: Completion, job: Job, answered: Callable[[object], None],
                  backoff: Backoff) -> None:
        def answer(code: object) -> None:
            if not isinstance(code, RETRYABLE):
                answered(code)
                return
            log.warning("Redis unreachable while finishing job %s (%s); retrying", job.id, code)
            asyncio.get_running_loop().call_later(backoff.delay(), self._complete, lane, item, job, answered, backoff)

        self.batcher.complete_then(lane.completes, item, answer)

    def tally(self, job: Job, code: object, counted: Callable[[], object]) -> None:
        """Count and log Redis' answer to a job's COMPLETE; ``counted()`` runs if it became the job's
        outcome (not a duplicate, not fenced)."""
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

    async def failed(self, lane: Lane, entry_id: bytes, raw: bytes, routed: RoutedJob, deliveries: int,
                     exc: BackendError) -> None:
        """A run that failed (not expired): back to the pool while retryable and under the limit, else dead."""
        self.metrics.of(routed.route.slo).failed.inc()
        # A sandbox's death is marked as such: the job stays a suspect (broker.reclaim).
        error = CRASHED + str(exc) if isinstance(exc, SandboxCrashed) else f"{type(exc).__name__}: {exc}"
        if exc.retryable and deliveries < self.settings.max_deliveries:
            # A backend that says when it can take work again (all endpoints cooling
            # down) gets the job back then, not sooner: an earlier retry only burns a delivery.
            delay = max(self.backoff_ms(deliveries), int((exc.retry_at - self.clock()) * 1000))
            delay = min(delay, self.settings.claim_idle_ms)
            await self.nack(lane, entry_id, routed, error, delay_ms=delay, delivery=deliveries)
        elif exc.retryable:
            await self.dead_letter(lane, entry_id, raw, "max_deliveries", f"delivered {deliveries} times without "
                                   f"success; last error: {error}", routed, deliveries=deliveries)
        else:
            await self.dead_letter(lane, entry_id, raw, "backend_error", error, routed, deliveries=deliveries)

    async def admitted(self, lane: Lane, entry_id: bytes, raw: bytes, deliveries: int, *,
                       sandboxed: bool) -> RoutedJob | None:
        """The routed job of an entry, if it may run; if not, the entry is dead-lettered and None returned."""
        if len(raw) > self.settings.max_job_bytes + 65536:
            await self.dead_letter(lane, entry_id, raw[: self.settings.max_job_bytes], "too_large",
                                   f"entry is {len(raw)} bytes", None)
            return None
        try:
            routed = decode_routed(raw)
        except DECODE_ERRORS as exc:
            await self.dead_letter(lane, entry_id, raw, "decode_error", f"not a routed job: {exc}", None)
            return None
        try:
            lane.keys(routed).reply_path(routed.job.reply_to)
        except ValueError as exc:  # not from our policy worker: there is nowhere to answer
            await self.dead_letter(lane, entry_id, raw, "invalid_job", str(exc), None)
            return None
        if deliveries <= self.settings.max_deliveries:
            return routed
        last, at = await self.scripts.client.hmget(lane.errors + entry_id.decode(), ["error", "delivery"])  # type: ignore[misc]
        # Past the limit, a run that only died with its worker (no evidence against the
        # job, which runs in a sandbox now) earns another try, up to delivery_cap.
        evidence = at == str(deliveries - 1).encode()  # the last run failed, or crashed its sandbox
        if sandboxed and not evidence and deliveries <= self.settings.delivery_cap:
            return routed
        error = last.decode(errors="replace") if evidence and last else "its worker died or stalled while running it"
        await self.dead_letter(lane, entry_id, raw, "max_deliveries",
                               f"delivered {deliveries - 1} times without success; last error: {error}", routed,
                               deliveries=deliveries - 1)
        return None

    async def nack(self, lane: Lane, entry_id: bytes, routed: RoutedJob | None, error: str, *,
                   delay_ms: int, delivery: int = 0) -> None:
        """Give the entry back to the pool, to be claimed again after ``delay_ms``; ``error`` is
        recorded as delivery ``delivery``'s (none: a give-back on stop, which counts no retry)."""
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

    async def dead_letter(self, lane: Lane, entry_id: bytes, payload: bytes, reason: str, error: str,
                   routed: RoutedJob | None, *, deliveries: int = 1, fenced: bool = True) -> None:
        """Dead-letter the entry with ``reason``, and answer the job (if it decoded) with a failed result.

        ``fenced=False`` for an entry Redis already dropped from the pending list: nobody owns it.
        """
        letter = DeadLetter(reason=reason, error=error, stream=lane.stream,  # type: ignore[arg-type]
                            entry_id=entry_id.decode(), payload=payload, delivery_count=deliveries,
                            job_id=routed.job.id if routed else None, consumer=self.name,
                            failed_at=self.clock()).clipped(self.settings.dead_payload_bytes)
        failed = None
        if routed is not None:
            job = routed.job
            result = self.result(routed, "failed", error=f"{reason}: {error}")
            failed = FailedJob(job.id, job.reply_to, json_encode(result), self.settings.result_ttl_s * 1000)
        consumer = self.name if fenced else ""
        keys = lane.keys(routed) if routed is not None else lane.topo
        if await self._script(calls.dead(lane.stream, WORKER_GROUP, entry_id, consumer, json_encode(letter),
                                         keys, failed)) == 1:
            self.dead += 1
            self.metrics.dead(routed.route.slo if routed else None, reason).inc()
            log.warning("dead letter %s (%s): %s", entry_id.decode(), reason, error,
                        extra=job_context(routed.job if routed else None))

    async def _script(self, call: ScriptCall[T]) -> T:
        """Run a script (batched), retrying while Redis is unreachable (each is idempotent)."""
        return await _retrying(lambda: self.batcher.call(call))


async def _retrying(call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, retried with backoff while Redis is unreachable (the scripts are idempotent)."""
    backoff = Backoff()
    while True:
        try:
            return await call()
        except RETRYABLE as exc:
            log.warning("Redis unreachable while finishing a job (%s); retrying", exc)
            await backoff.wait()
