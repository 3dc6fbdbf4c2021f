"""Running one batch: its lines submitted as batch-class jobs, their outcomes collected, its files written.

A line's job id is ``<batch id>.<line index>`` (``.<attempt>`` once the policy refused it):
a gateway that resumes a batch after a restart submits again what may not have gone in,
and the broker runs each id once. The jobs go to the space of the batch's tenant (its own
when the policy config names it: :meth:`gateway.context.Gateway.client_for`), and their
results and cancellations are written there. At most ``batch_in_flight`` of a batch's jobs wait or
run at once, so a large batch neither floods the ingress nor counts as work ahead of its
own later lines (the policy's admission). A job the policy refused anyway is submitted
again after its retry hint, as the line's next attempt (:meth:`Runner.record`).

Every line ends with one outcome: the job's result (through the gateway's consumer group
on the batch reply stream, :class:`gateway.batches.BatchApi`), or, when the batch is
cancelled or expires, a ``cancelled`` result from :meth:`broker.client.Client.cancel` for
a job that had not started. A job that had started finishes; its result counts.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Sequence
from typing import Literal, NamedTuple

import msgspec

from broker.connection import RETRYABLE
from broker.errors import Backpressure, JobRejected
from broker.wire import Job, Result
from gateway import metrics
from gateway.batchfile import (
    URLS,
    InputLine,
    OutputLine,
    job_id,
    line_index,
    line_job,
)
from gateway.batchsettings import BatchSettings
from gateway.context import Gateway
from gateway.files import FileStore
from gateway.ledger import BatchStatus, Ledger, RequestCounts, Stored
from gateway.openai import ApiError, Catalog, Tiers, to_response
from gateway.spool import Entry, Spool

log = logging.getLogger("inference_broker.gateway")

Ending = Literal["completed", "cancelled", "expired"]
FRESH, SUBMITTED, DONE = 0, 1, 2
RETRY_S = (1.0, 300.0)
"""A refused line is submitted again after its refusal's retry_after_s, within these bounds."""
BACKOFF_S = (0.05, 5.0)
"""A refused submission (full backlog, Redis away) is tried again after the first, doubling up to the second."""


class BatchContext(NamedTuple):
    """What every batch shares: the gateway (its SDK clients), the records, the files, the served models."""

    gateway: Gateway
    ledger: Ledger
    store: FileStore
    settings: BatchSettings
    tiers: Tiers
    catalog: Catalog


class Runner:
    """One batch, from ``in_progress`` to a final status; :meth:`record` takes its results as they come."""

    def __init__(self, ctx: BatchContext, stored: Stored, lines: Sequence[InputLine], cancel_at: float | None) -> None:
        self.ctx = ctx
        self.tenant = stored.tenant
        self.client = ctx.gateway.client_for(stored.tenant)
        """The SDK client of the batch's space: its tenant's own when configured, else the default."""
        self.batch = stored.batch
        self.lines = lines
        self.spool = Spool(ctx.settings.spool_dir, self.batch.id)
        self.state = bytearray(len(lines))
        self.in_flight = 0
        self.counts = RequestCounts(total=len(lines))
        self.ending: Ending = "completed"
        self.cancel_at = cancel_at
        self.changed = asyncio.Event()
        outcomes, self.attempts = self.spool.read()
        """Lines the policy refused: the attempt each is submitted as now."""
        self.due: list[tuple[float, int]] = []
        """Refused lines to submit again: (when, on the monotonic clock; index), a heap."""
        for entry in outcomes.values():
            self._mark(entry)
        self.due = [(0.0, i) for i in self.attempts if self.state[i] != DONE]  # resumed: due at once

    def job(self, index: int) -> Job:
        return line_job(self.lines[index], job_id=job_id(self.batch.id, index, self.attempts.get(index, 0)),
                        tenant=self.tenant,
                        tiers=self.ctx.tiers, deadline=float(self.batch.expires_at),
                        reply_to=self.ctx.settings.batch_reply_to)

    @property
    def left(self) -> int:
        return self.counts.total - self.counts.completed - self.counts.failed

    def _mark(self, entry: Entry) -> None:
        if self.state[entry.index] == SUBMITTED:
            self.in_flight -= 1
        self.state[entry.index] = DONE
        if entry.ok:
            self.counts.completed += 1
        else:
            self.counts.failed += 1
        self.changed.set()

    def record(self, index: int, attempt: int, result: Result) -> None:
        """Line ``index`` has the result of its job's ``attempt``: spool it (before the caller acks it), once.

        A job the policy refused (``rejected``: no pool would start it in time now) is submitted
        again after the refusal's ``retry_after_s``, up to ``batch_retries`` times: the batch has
        its whole window, and the refusal is about now.
        """
        if index >= len(self.lines) or self.state[index] == DONE:
            return
        if result.status == "rejected" and self.ending == "completed":
            if attempt != self.attempts.get(index, 0):
                return  # an earlier attempt's refusal, read again
            if attempt < self.ctx.settings.batch_retries:
                self.spool.append(Entry(index, False, None, attempt + 1))
                self._again(index, attempt + 1, result.retry_after_s)
                return
        line = self.lines[index]
        if result.status == "cancelled" and self.ending != "completed":
            self._settle(index, False, OutputLine.unrun(line, result.id, self.ending))
        elif result.status == "ok":
            body = to_response(URLS[line.url], self.job(index), result, tiers=self.ctx.tiers)
            self._settle(index, True, OutputLine.answer(line, result.id, 200, body))
        else:
            self._refuse(index, result.id, ApiError.of_result(result))

    def _refuse(self, index: int, request_id: str, error: ApiError) -> None:
        """Spool the error the online API would have answered the line's request with."""
        self._settle(index, False, OutputLine.answer(self.lines[index], request_id, error.status, error.body()))

    def _again(self, index: int, attempt: int, after_s: float | None) -> None:
        self.attempts[index] = attempt
        if self.state[index] == SUBMITTED:
            self.in_flight -= 1
        self.state[index] = FRESH
        wait = min(max(after_s or 0.0, RETRY_S[0]), RETRY_S[1])
        heapq.heappush(self.due, (time.monotonic() + wait, index))
        metrics.BATCH_RETRIES.inc()
        self.changed.set()

    def _settle(self, index: int, ok: bool, line: OutputLine) -> None:
        entry = Entry(index, ok, line)
        self.spool.append(entry)
        self._mark(entry)
        metrics.BATCH_REQUESTS.labels("output" if ok else "error").inc()

    def cancel(self, at: float) -> None:
        """Stop submitting; the jobs not started are cancelled, the batch ends ``cancelled``."""
        if self.cancel_at is None:
            self.cancel_at = at
        self.changed.set()

    async def run(self) -> None:
        """Submit, collect, write the files; returns when the batch is final (or on cancellation of this task)."""
        try:
            await self._save("in_progress", in_progress_at=self.batch.in_progress_at or int(time.time()))
            await self._submit_and_wait()
            await self._finalize()
        finally:
            self.spool.close()

    async def _submit_and_wait(self) -> None:
        settings = self.ctx.settings
        fresh = (i for i in range(len(self.lines)) if self.state[i] == FRESH and i not in self.attempts)
        while self.left and not await self._ending():
            room = min(settings.batch_in_flight - self.in_flight, settings.batch_chunk)
            chunk = self._due(room)
            chunk += [i for _, i in zip(range(room - len(chunk)), fresh, strict=False)]
            if chunk:
                await self._submit(chunk)
            else:
                await self._tick()
        if self.left:
            await self._end_the_rest()

    def _due(self, room: int) -> list[int]:
        """Refused lines whose wait is over (up to ``room``), and, after a restart, those not yet resubmitted."""
        now, lines = time.monotonic(), list[int]()
        while self.due and self.due[0][0] <= now and len(lines) < room:
            lines.append(heapq.heappop(self.due)[1])
        return [i for i in lines if self.state[i] == FRESH]

    async def _ending(self) -> bool:
        """Whether the batch must stop taking work: cancelled (here or through another gateway), or expired."""
        if self.cancel_at is None:
            loaded = await self.ctx.ledger.load(self.batch.id)
            self.cancel_at = loaded[1] if loaded else None
        if self.cancel_at is not None:
            self.ending = "cancelled"
            if self.batch.cancelling_at is None:
                await self._save("cancelling", cancelling_at=int(self.cancel_at))
        elif time.time() >= self.batch.expires_at:
            self.ending = "expired"
        return self.ending != "completed"

    async def _tick(self) -> None:
        """Wait for an outcome (or a moment), then save the progress."""
        self.changed.clear()
        try:
            await asyncio.wait_for(self.changed.wait(), self.ctx.settings.batch_poll_s)
        except TimeoutError:
            pass
        if self.counts != self.batch.request_counts:
            await self._save(self.batch.status)

    async def _submit(self, indexes: list[int]) -> None:
        jobs = []
        for index in indexes:
            job = self.job(index)
            try:
                self.ctx.catalog.check(job.model, job.kind)
            except ApiError as exc:  # what the online API answers a model it does not serve: no job
                self._refuse(index, job.id, exc)
                continue
            jobs.append(job)
        pause = BACKOFF_S[0]
        while jobs and self.ending == "completed":
            try:
                went_in = await self.client.submit_many(jobs)
            except Backpressure as exc:  # the backlog is full: wait for it to drain, bounded by the window
                went_in = exc.accepted
            except JobRejected:
                went_in = await self._one_by_one(jobs)
            except RETRYABLE as exc:
                log.warning("submitting batch %s: %s; trying again", self.batch.id, exc)
                went_in = []
            took = set(went_in)
            for job in jobs:
                if job.id in took and self.state[line_index(job)] == FRESH:  # (not DONE: its result came first)
                    self.state[line_index(job)] = SUBMITTED
                    self.in_flight += 1
            jobs = [job for job in jobs if job.id not in took and self.state[line_index(job)] != DONE]
            if jobs:
                await asyncio.sleep(pause)
                pause = min(2 * pause, BACKOFF_S[1])
                await self._ending()

    async def _one_by_one(self, jobs: list[Job]) -> list[str]:
        """A job the SDK refuses (too large once encoded) fails alone; the others go in."""
        went_in: list[str] = []
        for job in jobs:
            try:
                went_in += await self.client.submit_many([job])
            except Backpressure as full:
                return went_in + full.accepted
            except JobRejected as refused:
                self._refuse(line_index(job), job.id, ApiError(400, str(refused), code="job_rejected"))
        return went_in

    async def _end_the_rest(self) -> None:
        """Cancel every job without an outcome; wait (``batch_drain_s`` at most) for those that had started."""
        settings = self.ctx.settings
        todo = [i for i in range(len(self.lines)) if self.state[i] != DONE]
        for start in range(0, len(todo), 64):
            chunk = todo[start:start + 64]
            # Whether it wrote the outcome or the job had one (or started) already, the
            # result comes on the reply stream: nothing to do with the answer.
            await asyncio.gather(*(self.client.cancel(self.job(i)) for i in chunk), return_exceptions=True)
        until = time.monotonic() + settings.batch_drain_s
        while self.left and time.monotonic() < until:
            await self._tick()
        for index in range(len(self.lines)):
            if self.state[index] != DONE:  # a job that started and did not finish in time: say so, once
                late = ApiError(504, f"no outcome within {settings.batch_drain_s:g} s of the batch being "
                                     f"{self.ending}; the job may still finish, unrecorded", type="timeout",
                                code="batch_drain_timeout")
                self._refuse(index, self.job(index).id, late)

    async def _finalize(self) -> None:
        if self.ending == "completed":
            await self._save("finalizing", finalizing_at=int(time.time()))
        entries = sorted(self.spool.read()[0].values(), key=lambda e: e.index)
        names = {kind: f"{self.batch.id}_{kind}.jsonl" for kind in ("output", "error")}
        store = self.ctx.store
        for old in await store.list(self.tenant):  # written by a finalize cut short (a stop, a crash)
            if old.purpose == "batch_output" and old.filename in names.values():
                await store.delete(self.tenant, old.id)
        files = {}
        for ok, kind in ((True, "output"), (False, "error")):
            data = b"".join(msgspec.json.encode(e.line) + b"\n" for e in entries if e.ok is ok)
            if data:
                files[kind] = (await store.put(self.tenant, names[kind], "batch_output", data)).id
        now = int(time.time())
        done_at = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[self.ending]
        await self._save(self.ending, output_file_id=files.get("output"), error_file_id=files.get("error"),
                         **{done_at: now})
        self.spool.remove()
        metrics.BATCHES.labels(self.ending).inc()

    async def _save(self, status: BatchStatus, **fields: object) -> None:
        counts = msgspec.structs.replace(self.counts)
        self.batch = msgspec.structs.replace(self.batch, status=status, request_counts=counts, **fields)
        await self.ctx.ledger.save(Stored(tenant=self.tenant, batch=self.batch))
