"""``/v1/batches``: create, read, list and cancel batches, each its tenant's own.

A batch is checked whole at creation (its input file the tenant's, every line calling the
batch's endpoint, the tenant under ``batch_max_active`` batches not yet final), then run by
:class:`gateway.batches.BatchApi`. Another tenant's batch id answers 404, as a missing one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Protocol

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.batchfile import URLS, InputLine, InvalidFile, parse
from gateway.batchsettings import BatchSettings
from gateway.files import FileStore
from gateway.ledger import FINAL, Batch, Ledger, RequestCounts, Stored, shown
from gateway.openai import ApiError
from gateway.runner import BatchContext, Runner
from gateway.uploads import json_response, not_found

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


class Batches(Protocol):
    """What the routes need of :class:`gateway.batches.BatchApi`, which runs the batches."""

    @property
    def ctx(self) -> BatchContext: ...
    @property
    def ledger(self) -> Ledger: ...
    @property
    def store(self) -> FileStore: ...
    @property
    def settings(self) -> BatchSettings: ...

    async def launch(self, stored: Stored, lines: list[InputLine]) -> None: ...
    async def fail(self, stored: Stored, code: str, message: str, line: int | None = None) -> Batch: ...
    async def runner_of(self, batch_id: str) -> Runner | None: ...


class BatchRoutes:
    """The routes of ``/v1/batches`` over the batches that :class:`Batches` runs."""

    def __init__(self, api: Batches) -> None:
        self.api = api

    @property
    def routes(self) -> list[BaseRoute]:
        return [Route("/v1/batches", self.create, methods=["POST"]),
                Route("/v1/batches", self.list, methods=["GET"]),
                Route("/v1/batches/{batch_id}", self.retrieve, methods=["GET"]),
                Route("/v1/batches/{batch_id}/cancel", self.cancel, methods=["POST"])]

    async def create(self, request: Request) -> Response:
        tenant: str = request.state.tenant
        api, settings = self.api, self.api.settings
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
        live, limit = await api.ledger.live(tenant), settings.batch_max_active
        if live >= limit:
            raise ApiError(429, f"{live} batches of yours are not final yet, the limit is {limit}: wait for one "
                                "to end, or cancel one", type="rate_limit_error", code="too_many_batches",
                           retry_after_s=60)
        record = await api.store.stat(tenant, asked.input_file_id)
        if record is None or record.purpose != "batch":
            raise not_found("batch input file", asked.input_file_id)
        data = await api.store.get(tenant, asked.input_file_id) or b""
        try:
            lines = await asyncio.to_thread(parse, data, max_lines=settings.batch_max_lines, tiers=api.ctx.tiers)
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
            failed = await api.fail(stored, "mismatched_endpoint", f"request {wrong} calls {lines[wrong - 1].url}, "
                                    f"not the batch's endpoint {asked.endpoint}", line=wrong)
            return json_response(failed)
        await api.launch(stored, lines)
        return json_response(stored.batch)

    async def _load(self, request: Request) -> tuple[Stored, float | None]:
        batch_id = request.path_params["batch_id"]
        loaded = await self.api.ledger.load(batch_id, request.state.tenant)
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
        batches, more = await self.api.ledger.page(tenant, request.query_params.get("after"), int(raw))
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
            await self.api.ledger.ask_cancel(stored.batch.id, cancel_at)
            loaded = await self.api.ledger.load(stored.batch.id)  # the cancel as recorded: the first one counts
            stored, cancel_at = loaded or (stored, cancel_at)
        runner = await self.api.runner_of(stored.batch.id)
        if runner is not None and cancel_at is not None:
            runner.cancel(cancel_at)
        return json_response(shown(stored, cancel_at))

