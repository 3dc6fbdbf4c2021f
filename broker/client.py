"""The producer/consumer SDK: submit jobs, await their results, follow result streams.

::

    async with Client("redis://localhost:6379") as client:
        job = Job.chat("llama-3.1-8b", "Why is the sky blue?", max_tokens=128)
        result = await client.run(job, timeout=30)
        print(result.output, result.metrics.time_to_first_token_ms)

Results are deduplicated by job id on the broker side, so :meth:`Client.result` returns
the one result of a job however often it was delivered.

A deployment of several shards (``shards``, the same for every producer and role) keeps each
job on the shard of its id (:func:`broker.topology.shard_of`): the client sends each job to
its shard's ingress and looks its result up there, and :meth:`Client.results` follows the
result stream of every shard.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from types import TracebackType
from typing import Any, cast

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError, ResponseError

from broker import calls
from broker.connection import OUT_OF_MEMORY, RETRYABLE, connect, queue_wait
from broker.errors import (
    Backpressure,
    JobFailed,
    JobRejected,
    NotReplicated,
    RedisOutOfMemory,
    ResultTimeout,
    ScriptsNotLoaded,
)
from broker.merge import merge
from broker.scripts import Scripts
from broker.streams import STOP_TIMEOUT_S, Backoff, briefly, ensure_group, is_group_lost
from broker.topology import Topology, shard_of
from broker.wire import DECODE_ERRORS, InvalidJob, Job, Result, TokenChunk, decode_result, encode_job, json_encode

log = logging.getLogger("inference_broker.client")
_decode_chunk = msgspec.json.Decoder(TokenChunk).decode

LISTEN_BLOCK_MS = 200
"""Longest blocking read of a result listener: bounds how long closing a client takes."""
RECHECK_S = (0.5, 5.0)
"""A waiting caller looks up the done key again after the first of these, then twice as long
each time up to the second: a result its listener missed is still found."""


class Client:
    """An async client for one deployment (Redis URL, key prefix, shards), in the space of
    ``tenant`` (docs/security.md): it submits to that tenant's ingress and reads its results,
    which the URL's credentials must allow. No tenant: the deployment's default space.

    ``replicas``: how many replicas must have each submitted job before a submit returns
    (``WAIT``, up to ``replicas_ms``); 0 returns at the primary's word (Settings.submit_replicas).
    ``result_ttl_s``: how long the outcome :meth:`cancel` writes is kept (Settings.result_ttl_s).
    """

    def __init__(self, redis_url: str, *, prefix: str = "ib", shards: int = 1, replicas: int = 0,
                 replicas_ms: int = 1000, block_ms: int = 1000, max_backlog: int = 100_000,
                 max_job_bytes: int = 1 << 20, result_ttl_s: int = 3600, tenant: str = "") -> None:
        # Raises ValueError for a bad prefix, shard count or tenant name.
        self.topo = Topology(prefix, shards).of_tenant(tenant)
        self.redis: aioredis.Redis = connect(redis_url, block_ms)
        self.replicas = replicas
        self.replicas_ms = replicas_ms
        self.block_ms = block_ms
        self.max_backlog = max_backlog
        self.max_job_bytes = max_job_bytes
        self.result_ttl_s = result_ttl_s
        self.scripts = Scripts(self.redis)
        self._waiters: dict[str, _ReplyWaiter] = {}

    def as_tenant(self, tenant: str) -> Client:
        """This client in ``tenant``'s space (``""``: the default space), sharing its connections
        and result listeners: for a front door that serves many tenants with credentials that
        reach every space (the gateway). Closing this client closes them all."""
        other = copy.copy(self)
        other.topo = self.topo.of_tenant(tenant)
        return other  # _waiters is shared: it is keyed by full stream names, one per space

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop result listeners and close the connection pool.

        Returns within ``LISTEN_BLOCK_MS`` + 2 x :data:`STOP_TIMEOUT_S` whatever Redis does.
        """
        await asyncio.gather(*(waiter.aclose() for waiter in self._waiters.values()))
        self._waiters.clear()
        await briefly(self.redis.aclose(), "close the connections")

    def _prepare(self, job: Job) -> bytes:
        if job.created_at is None:
            job = msgspec.structs.replace(job, created_at=time.time())
        try:
            data = encode_job(job)
        except InvalidJob as exc:
            raise JobRejected(f"job {job.id}: {exc}") from None
        if len(data) > self.max_job_bytes:
            raise JobRejected(f"job {job.id} is {len(data)} bytes encoded; the limit is {self.max_job_bytes}")
        return data

    async def submit(self, job: Job) -> str:
        """Put one job on the ingress stream; returns the job id.

        Raises :class:`JobRejected` for a bad or oversized job, and :class:`Backpressure` when
        the ingress backlog is full, or :class:`RedisOutOfMemory` when Redis is (nothing was
        submitted; retry later).
        """
        return (await self.submit_many([job]))[0]

    async def submit_many(self, jobs: Iterable[Job], chunk: int = 500) -> list[str]:
        """Submit many jobs, pipelined ``chunk`` at a time; returns their ids in order.

        Each chunk goes to Redis as one script call per shard, which adds that shard's jobs in
        order while its ingress backlog is under ``max_backlog``. When one fills up,
        :class:`Backpressure` is raised after the chunk; its ``accepted`` lists the ids that
        went in, in order (with one shard, a prefix of ``jobs``). With ``replicas``, jobs
        their primary took but too few replicas confirmed in time raise
        :class:`NotReplicated` after the chunk.
        """
        accepted: list[str] = []
        chunked: list[tuple[str, bytes]] = []
        for job in jobs:
            chunked.append((job.id, self._prepare(job)))
            if len(chunked) >= chunk:
                await self._submit_chunk(chunked, accepted)
                chunked = []
        if chunked:
            await self._submit_chunk(chunked, accepted)
        return accepted

    async def _submit_chunk(self, chunked: list[tuple[str, bytes]], accepted: list[str]) -> None:
        """Submit one chunk, one SUBMIT per shard in one pipeline (each with its WAIT); extend ``accepted``."""
        shards = self.topo.shards
        by_shard: dict[int, list[tuple[str, bytes]]] = {}
        for job_id, data in chunked:
            by_shard.setdefault(shard_of(job_id, shards), []).append((job_id, data))
        pipe = self.redis.pipeline(transaction=False)
        for shard, entries in by_shard.items():
            ingress = self.topo.at(shard).jobs
            self.scripts.queue(pipe, calls.submit(ingress, self.max_backlog, [data for _, data in entries]))
            if self.replicas:
                await queue_wait(self.redis, pipe, ingress, self.replicas, self.replicas_ms)
        replies = iter(await self.scripts.execute(pipe, raise_on_error=False))
        added: set[str] = set()
        unconfirmed: list[str] = []
        full: list[int] = []
        failed: BaseException | None = None
        for shard, entries in by_shard.items():
            reply = next(replies)
            confirmed = next(replies) if self.replicas else self.replicas
            if isinstance(reply, ScriptsNotLoaded):
                reply, confirmed = await self._submit_plain(self.topo.at(shard).jobs, [data for _, data in entries])
            if isinstance(reply, BaseException):
                failed = failed or reply
                continue
            went_in, backlog = cast("list[Any]", reply)
            ids = [job_id for job_id, _ in entries[: len(went_in)]]
            added.update(ids)
            if backlog != -1:  # it found the backlog full: the rest of the shard's jobs did not go in
                full.append(backlog)
            if not isinstance(confirmed, int) or confirmed < self.replicas:
                unconfirmed += ids
        accepted += [job_id for job_id, _ in chunked if job_id in added]
        if isinstance(failed, OutOfMemoryError):
            # SUBMIT writes nothing when refused: Redis checks memory before a script's first write.
            raise RedisOutOfMemory(f"{OUT_OF_MEMORY}; the jobs were not submitted, retry later",
                                   accepted=accepted) from None
        if failed is not None:
            raise failed
        if full:
            raise Backpressure(
                f"the ingress backlog is full ({max(full)} jobs waiting, limit {self.max_backlog}); "
                "retry later, or add policy workers", accepted=accepted)
        if unconfirmed:
            raise NotReplicated(
                f"{len(unconfirmed)} job(s) reached their primary but not {self.replicas} replica(s) "
                f"within {self.replicas_ms} ms, so a failover could lose them; submit them again "
                "(a job id runs once) or check the replicas (INFO replication)",
                accepted=accepted, unconfirmed=unconfirmed)

    async def _submit_plain(self, ingress: str, jobs: list[bytes]) -> tuple[list[Any], int]:
        """SUBMIT's work without the script, for a producer whose ACL user may run the broker's
        scripts but not load them into a Redis that forgot them (docs/security.md): the
        backlog is read first, then the jobs added. Two round trips, and producers adding at
        once may pass ``max_backlog`` by a chunk. SUBMIT's reply, and the replicas confirmed."""
        backlog = await self.redis.xlen(ingress)
        room = max(0, self.max_backlog - backlog)
        pipe = self.redis.pipeline(transaction=False)
        for data in jobs[:room]:
            pipe.xadd(ingress, {"job": data})
        if self.replicas:
            await queue_wait(self.redis, pipe, ingress, self.replicas, self.replicas_ms)
        replies = await pipe.execute() if len(pipe) else []
        confirmed = replies.pop() if self.replicas else self.replicas
        return [replies, backlog + len(replies) if room < len(jobs) else -1], confirmed

    async def result(self, job_id: str, *, timeout: float = 60.0, reply_to: str = "results",
                     raise_on_failure: bool = False) -> Result:
        """Wait for the result of ``job_id``; raises :class:`ResultTimeout` after ``timeout`` s.

        With ``raise_on_failure``, a result whose status is not ``ok`` raises :class:`JobFailed`.
        """
        result = await self._waiter(reply_to, self.topo.of_job(job_id)).wait(job_id, timeout)
        if raise_on_failure and result.status != "ok":
            raise JobFailed(result)
        return result

    async def run(self, job: Job, *, timeout: float = 60.0) -> Result:
        """Submit ``job`` and wait for its result."""
        await self.submit(job)
        return await self.result(job.id, timeout=timeout, reply_to=job.reply_to)

    async def cancel(self, job: Job, *, reason: str = "cancelled by its producer") -> bool:
        """End ``job`` as ``cancelled`` if it has not started; True when this call ended it.

        One script on the job's shard writes its one outcome, a ``cancelled`` :class:`Result`
        (``error``: ``reason``), only while the job has none and no pool worker has taken it
        (docs/reliability.md, Cancellation): waiting on the ingress or on its pool's stream,
        it never runs. False: it has an outcome already, or a worker took it and it ends as it
        would have (its result wins). A job not submitted yet is ended too: a later submission
        of its id is dropped at routing.
        """
        return (await self.cancel_many([job], reason=reason))[0]

    async def cancel_many(self, jobs: Iterable[Job], *, reason: str = "cancelled by its producer",
                          chunk: int = 500) -> list[bool]:
        """:meth:`cancel` each of ``jobs`` (a batch's, say), pipelined ``chunk`` at a time; whether
        each call ended its job, in order."""
        ended: list[bool] = []
        pipe = self.redis.pipeline(transaction=False)
        for i, job in enumerate(jobs, start=1):
            result = json_encode(Result.for_job(job, "cancelled", error=reason))
            topo = self.topo.of_job(job.id)
            self.scripts.queue(pipe, calls.cancel(topo, job.id, job.reply_to, result, self.result_ttl_s * 1000))
            if i % chunk == 0:
                ended += [code == 1 for code in await self.scripts.execute(pipe)]
                pipe = self.redis.pipeline(transaction=False)
        if len(pipe):
            ended += [code == 1 for code in await self.scripts.execute(pipe)]
        return ended

    async def tokens(self, job_id: str, *, timeout: float = 60.0) -> AsyncIterator[TokenChunk]:
        """Follow the output of a job submitted with ``stream=True`` as it is generated.

        Yields :class:`TokenChunk` pieces (``text``, ``attempt``) from the job's token stream,
        from its start, until an attempt ends ``ok``, or the job has its result (failed,
        expired, rejected: then :meth:`result` says why). A retried job's output starts again
        with the next ``attempt``. Raises :class:`ResultTimeout` after ``timeout`` seconds.
        """
        topo = self.topo.of_job(job_id)
        key, done = topo.tokens(job_id), topo.done(job_id)
        deadline = time.monotonic() + timeout
        last = "0-0"
        late = ResultTimeout(f"no end of the token stream of {job_id} within {timeout:g} s")
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise late
            block_ms = max(1, int(min(left, LISTEN_BLOCK_MS / 1000) * 1000))
            try:
                async with asyncio.timeout(left):  # a Redis that stopped answering holds a read far longer
                    reply = await self.redis.xread({key: last}, block=block_ms)
                    finished = not reply and await self.redis.exists(done)
            except TimeoutError:
                raise late from None
            entries = reply[0][1] if reply else []
            for entry_id, fields in entries:
                last = entry_id.decode()
                chunk = _decode_chunk(fields.get(b"token", b"{}"))
                if chunk.text:
                    yield chunk
                if chunk.end == "ok":
                    return
            if finished:
                return  # finished without (more) tokens: a failure, or a result without streaming

    def results(self, group: str, consumer: str = "sdk", *, reply_to: str = "results",
                count: int = 100) -> AsyncIterator[Result]:
        """Follow a result stream, on every shard, through consumer group ``group`` (created at id 0 if new).

        Results are acked once the loop bodies of a whole read (up to ``count`` results) have
        finished, in one ``XACK`` sent with the next read: a consumer that crashes (or leaves
        the loop) mid-read gets the unacked results of that read again on restart under the
        same ``consumer`` name.

        A group none of whose consumers read for ``results_group_idle_s`` while it held back
        the stream's trimming is destroyed by the janitor as abandoned; when its consumer
        comes back, the group is created again at 0: it gets the results still retained.

        Each shard's stream is read and acked on its own; their results are merged as they come.
        """
        return merge([self._results(topo.reply(reply_to), group, consumer, count) for topo in self.topo.every_shard])

    async def _results(self, stream: str, group: str, consumer: str, count: int) -> AsyncGenerator[Result, None]:
        """:meth:`results` on one shard's ``stream``."""
        await ensure_group(self.redis, stream, group)
        last_id = "0-0"
        done: list[bytes] = []
        while True:
            block = None if last_id != ">" else self.block_ms
            try:
                if done:  # one round trip for the ack and the next read, not two
                    async with self.redis.pipeline(transaction=False) as pipe:
                        pipe.xack(stream, group, *done)
                        pipe.xreadgroup(group, consumer, {stream: last_id}, count=count, block=block)
                        _acked, reply = await pipe.execute()
                else:
                    reply = await self.redis.xreadgroup(group, consumer, {stream: last_id}, count=count, block=block)
            except ResponseError as exc:
                if not is_group_lost(exc):
                    raise
                await ensure_group(self.redis, stream, group)
                last_id, done = "0-0", []
                continue
            entries = reply[0][1] if reply else []
            if last_id != ">" and len(entries) < count:
                last_id = ">"
            elif last_id != ">":
                last_id = entries[-1][0].decode()
            for entry_id, fields in entries:
                if b"result" in fields:
                    try:
                        result = decode_result(fields[b"result"])
                    except DECODE_ERRORS as exc:  # acked with the rest: it would fail on every read
                        log.warning("skipping entry %s of %s: not a result (%s)", entry_id.decode(), stream, exc)
                        continue
                    yield result
            done = [entry_id for entry_id, _ in entries]

    def _waiter(self, reply_to: str, topo: Topology) -> _ReplyWaiter:
        stream = topo.reply(reply_to)
        waiter = self._waiters.get(stream)
        if waiter is None:
            waiter = self._waiters[stream] = _ReplyWaiter(self, topo, stream)
        return waiter


class _ReplyWaiter:
    """Reads one shard's reply stream (plain XREAD, no group) and hands results to waiting callers.

    A caller registers, then checks the done key: a result written before that check is in
    the key (the scripts write both at once), and one written after it has a later stream id
    than the listener's start, an id of Redis' clock (TIME) read before the first caller's
    check: the client's own clock may be off. While it waits, a caller checks the done key
    again now and then (``RECHECK_S``), for a result the listener could not read.
    """

    def __init__(self, client: Client, topo: Topology, stream: str) -> None:
        self.client = client
        self.topo = topo
        self.stream = stream
        self.futures: dict[str, asyncio.Future[Result]] = {}
        self.position: str | None = None
        """The id the listener reads after: its start, then the last entry it read."""
        self.task: asyncio.Task[None] | None = None
        self.closing = False

    async def wait(self, job_id: str, timeout: float) -> Result:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            # The deadline covers each look-up too: a Redis that stopped answering would hold
            # a command for the socket timeout once per connection retry.
            async with asyncio.timeout_at(deadline):
                await self._start()
                future = self.futures.get(job_id)
                if future is None:
                    future = self.futures[job_id] = loop.create_future()
                pause = RECHECK_S[0]
                done = await self.client.redis.get(self.topo.done(job_id))
                while done is None:
                    try:
                        return await asyncio.wait_for(asyncio.shield(future), min(pause, deadline - loop.time()))
                    except TimeoutError:
                        if loop.time() >= deadline:
                            raise
                    pause = min(2 * pause, RECHECK_S[1])
                    try:
                        done = await self.client.redis.get(self.topo.done(job_id))
                    except RETRYABLE:
                        pass  # Redis is away: the listener resumes when it is back
                return decode_result(done)
        except TimeoutError:
            raise ResultTimeout(f"no result for job {job_id} within {timeout} s; it may still finish: "
                                f"check later with `inference-broker result {job_id}`") from None
        finally:
            self.futures.pop(job_id, None)

    async def _start(self) -> None:
        if self.position is None:
            seconds, micros = await self.client.redis.time()
            if self.position is None:  # else a caller who read TIME before us started it
                self.position = f"{seconds * 1000 + micros // 1000 - 1}-0"
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        backoff = Backoff()
        while not self.closing:
            try:
                await self._read()
                backoff.reset()
            except RETRYABLE:
                await backoff.wait()  # Redis is away: keep waiting, then go on from where we were
            except Exception as exc:  # noqa: BLE001 - e.g. the reply key is no stream: callers still check done keys
                log.exception("reading results from %s failed (%s); retrying from entry %s",
                              self.stream, exc, self.position)
                await backoff.wait()

    async def _read(self) -> None:
        assert self.position is not None
        reply = await self.client.redis.xread({self.stream: self.position}, count=500, block=LISTEN_BLOCK_MS)
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                self.position = entry_id.decode()
                raw = fields.get(b"result")
                if raw is None:
                    continue
                try:
                    result = decode_result(raw)
                except DECODE_ERRORS as exc:
                    log.warning("skipping entry %s of %s: not a result (%s)", self.position, self.stream, exc)
                    continue
                future = self.futures.get(result.id)
                if future is not None and not future.done():
                    future.set_result(result)

    async def aclose(self) -> None:
        # Let the blocking read return rather than cancel it (a read cut short leaves its
        # connection to be torn down); cancel it only if Redis does not answer in time.
        self.closing = True
        if self.task is not None:
            await asyncio.wait({self.task}, timeout=LISTEN_BLOCK_MS / 1000 + STOP_TIMEOUT_S)
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=STOP_TIMEOUT_S)


def run_job(job: Job, *, redis_url: str, prefix: str = "ib", shards: int = 1, timeout: float = 60.0,
            tenant: str = "") -> Result:
    """Synchronous helper: submit ``job`` and wait for its result (runs its own event loop)."""

    async def go() -> Result:
        async with Client(redis_url, prefix=prefix, shards=shards, tenant=tenant) as client:
            return await client.run(job, timeout=timeout)

    return asyncio.run(go())


def submit_jobs(jobs: Iterable[Job], *, redis_url: str, prefix: str = "ib", shards: int = 1,
                tenant: str = "") -> list[str]:
    """Synchronous helper: submit jobs (pipelined) without waiting; returns their ids."""

    async def go() -> list[str]:
        async with Client(redis_url, prefix=prefix, shards=shards, tenant=tenant) as client:
            return await client.submit_many(jobs)

    return asyncio.run(go())


def cancel_job(job: Job, *, redis_url: str, prefix: str = "ib", shards: int = 1, result_ttl_s: int = 3600) -> bool:
    """Synchronous helper: :meth:`Client.cancel` (runs its own event loop)."""

    async def go() -> bool:
        async with Client(redis_url, prefix=prefix, shards=shards, result_ttl_s=result_ttl_s) as client:
            return await client.cancel(job)

    return asyncio.run(go())
