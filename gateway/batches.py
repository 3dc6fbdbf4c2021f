"""The OpenAI Batch API on the broker's batch class: ``/v1/batches`` and ``/v1/files``.

::

    batches = BatchApi(gateway, BatchSettings.from_env())
    app = create_app(gateway, keys=keys, extensions=[batches])

A batch's lines run as jobs of class ``batch`` (behind interactive work, through the
policy's lanes) with the batch's completion window as their deadline, each under a job id
made of the batch id and its line, so that a resubmission runs nothing twice
(:mod:`gateway.runner`). Their results come back on one reply stream,
``batch_reply_to``, which every gateway reads through the consumer group
``gateway-batches``; a result is acked once its line is spooled (:mod:`gateway.spool`).
Batch records live in Redis (:mod:`gateway.ledger`), so a restarted gateway resumes the
batches that were not final, and answers for all of them.

Run the Batch API on one gateway process per deployment, or on several that share
``files_dir``: a batch's outcomes so far are spooled there.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import Annotated

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from broker.connection import RETRYABLE
from broker.streams import Backoff
from broker.wire import Result
from gateway import metrics
from gateway.batchfile import URLS, InputLine, InvalidFile, parse, parse_job_id
from gateway.batchsettings import BatchSettings
from gateway.context import Gateway
from gateway.files import FileStore, LocalFileStore
from gateway.ledger import FINAL, Batch, BatchError, BatchErrors, Ledger, RequestCounts, Stored, shown
from gateway.openai import ApiError
from gateway.runner import BatchContext, Runner
from gateway.spool import Spool
from gateway.uploads import Uploads, json_response, not_found

log = logging.getLogger("inference_broker.gateway")
GROUP = "gateway-batches"
CONSUMER = "gateway"
"""One consumer name for every gateway: a restarted one (a new container) reads what its
predecessor had not acked."""
WINDOW_S = {"24h": 86_400}
Metadata = Annotated[dict[str, Annotated[str, msgspec.Meta(max_length=512)]], msgspec.Meta(max_length=16)]


def new_batch_id() -> str:
    """``batch_`` and 32 hex digits, the first 16 the creation time in ns: ids of one second (the
    list's score) sort by creation, so the list's order is the creation order."""
    return f"batch_{time.time_ns():016x}{uuid.uuid4().hex[:16]}"


class CreateBatch(msgspec.Struct, frozen=True, kw_only=True):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: Metadata | None = None


_decode_create = msgspec.json.Decoder(CreateBatch).decode


class BatchApi:
    """A :class:`gateway.app.GatewayExtension`: the routes, the running batches, the result follower."""

    def __init__(self, gateway: Gateway, settings: BatchSettings, store: FileStore | None = None) -> None:
        self.settings = settings
        self.store = store or LocalFileStore(settings.root, max_file_bytes=settings.max_file_bytes,
                                             max_tenant_bytes=settings.max_tenant_bytes)
        self.ledger = Ledger(gateway.client.redis, gateway.client.topo, settings.batch_retention_s)
        self.ctx = BatchContext(gateway.client, self.ledger, self.store, settings, gateway.tiers, gateway.catalog)
        self.uploads = Uploads(self.store, settings, gateway.tiers)
        self.runners: dict[str, Runner] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._adopting = asyncio.Lock()

    @property
    def routes(self) -> list[BaseRoute]:
        return [*self.uploads.routes,
                Route("/v1/batches", self.create, methods=["POST"]),
                Route("/v1/batches", self.list, methods=["GET"]),
                Route("/v1/batches/{batch_id}", self.retrieve, methods=["GET"]),
                Route("/v1/batches/{batch_id}/cancel", self.cancel, methods=["POST"])]

    async def start(self) -> None:
        """In the background: resume every batch that is not final, then follow the batch reply stream."""
        self._spawn(self._follow())

    async def aclose(self) -> None:
        """Stop following and running (bounded: every task is cancelled); a restart resumes."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for runner in self.runners.values():
            runner.spool.close()

    def _spawn(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ------------------------------------------------------------------ running

    async def _follow(self) -> None:
        """Resume the batches not final, then hand each batch job's result to its runner; a result
        is acked (with the next read) once it is spooled."""
        backoff = Backoff()
        resumed = False
        while True:
            try:
                if not resumed:
                    for batch_id in await self.ledger.active():
                        await self._adopt(batch_id)
                    resumed = True
                async for result in self.ctx.client.results(GROUP, CONSUMER, reply_to=self.settings.batch_reply_to):
                    backoff.reset()
                    await self._hand_over(result)
            except RETRYABLE as exc:
                log.warning("following batch results: %s; trying again", exc)
                await backoff.wait()

    async def _hand_over(self, result: Result) -> None:
        if (found := parse_job_id(result.id)) is None:
            return  # not a batch job's: someone else's result on this stream
        batch_id, index, attempt = found
        try:
            runner = self.runners.get(batch_id) or await self._adopt(batch_id)
            if runner is not None:  # else the batch is final or gone: a late duplicate
                runner.record(index, attempt, result)
        except RETRYABLE:
            raise  # read again once Redis is back: it was not acked
        except Exception:  # noqa: BLE001 - one bad result must not stop every batch's results
            log.exception("batch %s: the result of line %d could not be recorded; skipped", batch_id, index)

    async def _adopt(self, batch_id: str) -> Runner | None:
        """The runner of a batch not final, started here; ``None`` for a batch final or gone."""
        async with self._adopting:
            if batch_id in self.runners:
                return self.runners[batch_id]
            loaded = await self.ledger.load(batch_id)
            if loaded is None:
                await self.ledger.forget(batch_id)
                return None
            stored, cancel_at = loaded
            if stored.batch.status in FINAL:
                return None
            data = await self.store.get(stored.tenant, stored.batch.input_file_id)
            if data is None:  # deleted while the batch ran, and the gateway restarted since
                await self._fail(stored, "missing_input", f"the input file {stored.batch.input_file_id} was deleted "
                                 "before the batch ended; upload it again and create a new batch")
                return None
            try:
                lines = parse(data, max_lines=self.settings.batch_max_lines, tiers=self.ctx.tiers)
            except InvalidFile as exc:  # accepted under other limits (batch_max_lines) than today's
                await self._fail(stored, "invalid_file", str(exc))
                return None
            return self._run(Runner(self.ctx, stored, lines, cancel_at))

    async def launch(self, stored: Stored, lines: list[InputLine]) -> None:
        """Record a new batch and start running it here."""
        await self.ledger.save(stored)
        self._run(Runner(self.ctx, stored, lines, None))

    def _run(self, runner: Runner) -> Runner:
        self.runners[runner.batch.id] = runner
        metrics.BATCHES_RUNNING.inc()
        self._spawn(self._supervise(runner))
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
            self.runners.pop(runner.batch.id, None)
            metrics.BATCHES_RUNNING.dec()

    async def _fail(self, stored: Stored, code: str, message: str, line: int | None = None) -> Batch:
        failed = msgspec.structs.replace(stored.batch, status="failed", failed_at=int(time.time()),
                                         errors=BatchErrors(data=[BatchError(code=code, message=message, line=line)]))
        await self.ledger.save(Stored(tenant=stored.tenant, batch=failed))
        metrics.BATCHES.labels("failed").inc()
        Spool(self.settings.spool_dir, failed.id).remove()  # what ran of it is lost with its input
        return failed

    # ------------------------------------------------------------------ routes

    async def create(self, request: Request) -> Response:
        tenant: str = request.state.tenant
        try:
            asked = _decode_create(await request.body())
        except msgspec.ValidationError as exc:
            raise ApiError(400, f"invalid batch request: {exc}") from None
        except msgspec.DecodeError:
            raise ApiError(400, "the request body is not valid JSON; send one JSON object") from None
        if asked.completion_window not in WINDOW_S:
            raise ApiError(400, f"completion_window {asked.completion_window!r} is not supported; use '24h'",
                           param="completion_window")
        if asked.endpoint not in URLS:
            raise ApiError(400, f"endpoint {asked.endpoint!r} is not supported; use one of {', '.join(URLS)}",
                           param="endpoint")
        live, limit = await self.ledger.live(tenant), self.settings.batch_max_active
        if live >= limit:
            raise ApiError(429, f"{live} batches of yours are not final yet, the limit is {limit}: wait for one "
                                "to end, or cancel one", type="rate_limit_error", code="too_many_batches",
                           retry_after_s=60)
        record = await self.store.stat(tenant, asked.input_file_id)
        if record is None or record.purpose != "batch":
            raise not_found("batch input file", asked.input_file_id)
        data = await self.store.get(tenant, asked.input_file_id) or b""
        try:
            lines = await asyncio.to_thread(parse, data, max_lines=self.settings.batch_max_lines, tiers=self.ctx.tiers)
        except InvalidFile as exc:  # checked at upload, unless the limits changed since
            raise ApiError(400, f"{record.filename}: {exc}", param="input_file_id", code="invalid_file") from None
        now = int(time.time())
        stored = Stored(tenant=tenant, batch=Batch(
            id=new_batch_id(), endpoint=asked.endpoint, input_file_id=asked.input_file_id,
            status="validating", created_at=now, expires_at=now + WINDOW_S[asked.completion_window],
            request_counts=RequestCounts(total=len(lines)), completion_window=asked.completion_window,
            metadata=asked.metadata))
        wrong = next((n for n, line in enumerate(lines, start=1) if line.url != asked.endpoint), None)
        if wrong is not None:
            failed = await self._fail(stored, "mismatched_endpoint", f"request {wrong} calls {lines[wrong - 1].url}, "
                                      f"not the batch's endpoint {asked.endpoint}", line=wrong)
            return json_response(failed)
        await self.launch(stored, lines)
        return json_response(stored.batch)

    async def _load(self, request: Request) -> tuple[Stored, float | None]:
        batch_id = request.path_params["batch_id"]
        loaded = await self.ledger.load(batch_id, request.state.tenant)
        if loaded is None:
            raise not_found("batch", batch_id)
        return loaded

    async def retrieve(self, request: Request) -> Response:
        return json_response(shown(*await self._load(request)))

    async def list(self, request: Request) -> Response:
        tenant: str = request.state.tenant
        raw = request.query_params.get("limit", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= 100:
            raise ApiError(400, f"limit {raw[:20]!r} must be a whole number from 1 to 100", param="limit")
        batches, more = await self.ledger.page(tenant, request.query_params.get("after"), int(raw))
        return json_response({"object": "list", "data": batches, "has_more": more,
                              "first_id": batches[0].id if batches else None,
                              "last_id": batches[-1].id if batches else None})

    async def cancel(self, request: Request) -> Response:
        stored, cancel_at = await self._load(request)
        if stored.batch.status in FINAL:
            raise ApiError(409, f"batch {stored.batch.id} is {stored.batch.status}: only a batch not yet final "
                                "can be cancelled", code="batch_final")
        if cancel_at is None:
            cancel_at = time.time()
            await self.ledger.ask_cancel(stored.batch.id, cancel_at)
            loaded = await self.ledger.load(stored.batch.id)  # the cancel as recorded: the first one counts
            stored, cancel_at = loaded or (stored, cancel_at)
        runner = self.runners.get(stored.batch.id) or await self._adopt(stored.batch.id)
        if runner is not None and cancel_at is not None:
            runner.cancel(cancel_at)
        return json_response(shown(stored, cancel_at))

