"""The OpenAI Batch API on the broker's batch class: the gateway extension that serves
``/v1/files`` (:mod:`gateway.uploads`) and ``/v1/batches`` (:mod:`gateway.batchroutes`), and
runs the batches.

::

    batches = BatchApi(gateway, BatchSettings.from_env())
    app = create_app(gateway, keys=keys, extensions=[batches])

A batch's lines run as jobs of class ``batch`` (behind interactive work, through the
policy's lanes) with the batch's completion window as their deadline, each under a job id
made of the batch id and its line, so that a resubmission runs nothing twice
(:mod:`gateway.runner`). Their results come back on the reply stream ``batch_reply_to`` of
the batch's space (the default space, or its tenant's when the policy config names it),
read through the consumer group ``gateway-batches`` in every space, merged; a result is
acked once its line is spooled (:mod:`gateway.spool`), and counts only for a batch of the
space it was read in. Batch records live in Redis, in the default space
(:mod:`gateway.ledger`).

Every gateway of a deployment serves the routes; one runs the batches, the one holding the
batch lease in Redis: it runs every batch not final, wherever it was made, and alone reads
their results, so a batch never has two runners (nor its results two readers). When it
stops or dies, another gateway (or it, restarted) takes the lease and resumes them. The
gateways share ``files_dir``: inputs, outputs and spools live there.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator

import msgspec
from starlette.routing import BaseRoute

from broker.client import Client
from broker.connection import RETRYABLE
from broker.merge import merge
from broker.streams import Backoff, briefly
from broker.wire import Result
from gateway import metrics
from gateway.batchfile import InputLine, InvalidFile, parse, parse_job_id
from gateway.batchroutes import BatchRoutes
from gateway.batchsettings import BatchSettings
from gateway.context import Gateway
from gateway.files import FileStore, LocalFileStore
from gateway.ledger import FINAL, Batch, BatchError, BatchErrors, Ledger, Stored
from gateway.runner import BatchContext, Runner
from gateway.spool import Spool
from gateway.uploads import Uploads

log = logging.getLogger("inference_broker.gateway")
GROUP = "gateway-batches"
CONSUMER = "gateway"
"""One consumer name for every gateway: a restarted one (a new container) reads what its
predecessor had not acked."""
class BatchApi:
    """A :class:`gateway.app.GatewayExtension`: the routes, the running batches, the result follower."""

    def __init__(self, gateway: Gateway, settings: BatchSettings, store: FileStore | None = None) -> None:
        self.settings = settings
        self.store = store or LocalFileStore(settings.root, max_file_bytes=settings.max_file_bytes,
                                             max_tenant_bytes=settings.max_tenant_bytes)
        self.ledger = Ledger(gateway.client.redis, gateway.client.topo, settings.batch_retention_s)
        self.gateway = gateway
        self.ctx = BatchContext(gateway, self.ledger, self.store, settings, gateway.tiers, gateway.catalog)
        self.uploads = Uploads(self.store, settings, gateway.tiers)
        self.runners: dict[str, Runner] = {}
        self.running: dict[str, asyncio.Task[None]] = {}
        self.leading = False
        """Whether this gateway holds the lease: it runs the batches and follows their results."""
        self._token = uuid.uuid4().hex
        self._lead_task: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._adopting = asyncio.Lock()

    @property
    def routes(self) -> list[BaseRoute]:
        return [*self.uploads.routes, *BatchRoutes(self).routes]

    async def start(self) -> None:
        """In the background: take the lease when it is free, and while it is held run the batches."""
        self._lead_task = asyncio.create_task(self._lead())

    async def aclose(self) -> None:
        """Stop running batches (bounded: every task is cancelled) and hand the lease back: another
        gateway, or this one restarted, resumes them."""
        if self._lead_task is not None:
            self._lead_task.cancel()
            await asyncio.gather(self._lead_task, return_exceptions=True)
        await self._step_down()
        await briefly(self.ledger.give_up(self._token), "hand the batch lease back")

    async def _lead(self) -> None:
        """Hold the lease (renewed every third of ``batch_lease_s``) and, while it is held, start a
        runner for every batch not final (made here or by another gateway) and follow the results."""
        backoff, loop = Backoff(), asyncio.get_running_loop()
        renew_at = 0.0
        while True:
            try:
                if loop.time() >= renew_at:
                    renew_at = loop.time() + self.settings.batch_lease_s / 3
                    if await self.ledger.lead(self._token, int(self.settings.batch_lease_s * 1000)):
                        if not self.leading:
                            log.info("this gateway runs the deployment's batches")
                            self.leading = True
                            self._follower = asyncio.create_task(self._follow())
                    elif self.leading:
                        log.warning("another gateway took the batch lease; stopping the batches here")
                        await self._step_down()
                if self.leading:
                    for batch_id in await self.ledger.active():
                        if batch_id not in self.runners:
                            await self.runner_of(batch_id)
                backoff.reset()
                await asyncio.sleep(self.settings.batch_poll_s)
            except RETRYABLE as exc:  # Redis away: the lease may lapse meanwhile, so stop running here
                log.warning("batch lease: %s; stopping the batches here until Redis answers", exc)
                await self._step_down()
                renew_at = 0.0
                await backoff.wait()

    async def _step_down(self) -> None:
        """Stop following and running batches here (their state is in Redis and the spool)."""
        self.leading = False
        tasks = [*self.running.values(), *([self._follower] if self._follower else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._follower = None
        for runner in self.runners.values():
            runner.spool.close()
        self.runners.clear()

    # ------------------------------------------------------------------ running

    async def _follow(self) -> None:
        """Hand each batch job's result to its runner; a result is acked (with the next read) once it
        is spooled."""
        backoff = Backoff()
        while True:
            try:
                async for space, result in merge([self._space(client) for client in self.gateway.spaces]):
                    backoff.reset()
                    await self._hand_over(space, result)
            except RETRYABLE as exc:
                log.warning("following batch results: %s; trying again", exc)
                await backoff.wait()

    async def _space(self, client: Client) -> AsyncGenerator[tuple[str, Result], None]:
        """The results on one space's batch reply stream, each with the space's tenant (``""``: the
        default space). The next is read only once the last was handed over: acks stay as late."""
        async for result in client.results(GROUP, CONSUMER, reply_to=self.settings.batch_reply_to):
            yield client.topo.tenant, result

    async def _hand_over(self, space: str, result: Result) -> None:
        if (found := parse_job_id(result.id)) is None:
            return  # not a batch job's: someone else's result on this stream
        batch_id, index, attempt = found
        try:
            runner = self.runners.get(batch_id) or await self.runner_of(batch_id)
            if runner is not None and runner.client.topo.tenant != space:
                # A producer may write its own space's reply streams (its ACL allows it): a result
                # there naming another space's batch job is not that job's.
                log.warning("batch %s: a result for line %d in another tenant's space; ignored", batch_id, index)
            elif runner is not None:  # else the batch is final or gone: a late duplicate
                runner.record(index, attempt, result)
        except RETRYABLE:
            raise  # read again once Redis is back: it was not acked
        except Exception:  # noqa: BLE001 - one bad result must not stop every batch's results
            log.exception("batch %s: the result of line %d could not be recorded; skipped", batch_id, index)

    async def runner_of(self, batch_id: str) -> Runner | None:
        """The runner of a batch not final (started if this gateway leads and it runs nowhere here
        yet); ``None`` for a batch final or gone, or when another gateway runs the batches."""
        async with self._adopting:
            if batch_id in self.runners or not self.leading:
                return self.runners.get(batch_id)
            loaded = await self.ledger.load(batch_id)
            if loaded is None:
                await self.ledger.forget(batch_id)
                return None
            stored, cancel_at = loaded
            if stored.batch.status in FINAL:
                return None
            data = await self.store.get(stored.tenant, stored.batch.input_file_id)
            if data is None:  # deleted while the batch ran, and the gateway restarted since
                await self.fail(stored, "missing_input", f"the input file {stored.batch.input_file_id} was deleted "
                                 "before the batch ended; upload it again and create a new batch")
                return None
            try:
                lines = await asyncio.to_thread(parse, data, max_lines=self.settings.batch_max_lines,
                                                tiers=self.ctx.tiers)
            except InvalidFile as exc:  # accepted under other limits (batch_max_lines) than today's
                await self.fail(stored, "invalid_file", str(exc))
                return None
            return self._run(Runner(self.ctx, stored, lines, cancel_at))

    async def launch(self, stored: Stored, lines: list[InputLine]) -> None:
        """Record a new batch and start running it: here when this gateway leads, else the leader
        finds it (its next look at the active batches)."""
        await self.ledger.save(stored)
        if self.leading:
            async with self._adopting:
                self._run(Runner(self.ctx, stored, lines, None))

    def _run(self, runner: Runner) -> Runner:
        self.runners[runner.batch.id] = runner
        metrics.BATCHES_RUNNING.inc()
        self.running[runner.batch.id] = asyncio.create_task(self._supervise(runner))
        return runner

    async def _supervise(self, runner: Runner) -> None:
        backoff = Backoff()
        try:
            while True:
                try:
                    await runner.run()
                    return
                except RETRYABLE as exc:  # Redis away: the runner keeps its state and goes on
                    log.warning("batch %s: %s; going on shortly", runner.batch.id, exc)
                    await backoff.wait()
        except Exception:
            log.exception("batch %s stopped; it resumes with its next result or the gateway's restart",
                          runner.batch.id)
        finally:
            if self.runners.get(runner.batch.id) is runner:
                del self.runners[runner.batch.id]
            self.running.pop(runner.batch.id, None)
            metrics.BATCHES_RUNNING.dec()

    async def fail(self, stored: Stored, code: str, message: str, line: int | None = None) -> Batch:
        """End a batch ``failed`` as a whole, with one error saying why."""
        failed = msgspec.structs.replace(stored.batch, status="failed", failed_at=int(time.time()),
                                         errors=BatchErrors(data=[BatchError(code=code, message=message, line=line)]))
        await self.ledger.save(Stored(tenant=stored.tenant, batch=failed))
        metrics.BATCHES.labels("failed").inc()
        Spool(self.settings.spool_dir, failed.id).remove()  # what ran of it is lost with its input
        return failed
