"""``/v1/files``: upload a batch's input file, read its output and error files.

An upload is ``multipart/form-data`` with ``purpose=batch`` and a ``file`` part holding
JSONL. It is refused (413) past ``max_file_bytes`` from its Content-Length, before it is
read, and checked line by line as the online API would check each request (400 naming the
line). Files belong to the tenant of the API key: another tenant's file id answers 404.
"""

from __future__ import annotations

import asyncio

import msgspec
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.batchfile import InvalidFile, parse
from gateway.batchsettings import BatchSettings
from gateway.files import FileObject, FileStore, FileTooLarge
from gateway.openai import ApiError, Tiers

FORM_OVERHEAD = 64 << 10
"""Bytes a multipart body may hold beyond its file (boundaries, headers, the purpose field)."""
UPLOADS_AT_ONCE = 2
"""Uploads read and checked at once; the others wait their turn. Each holds its file in memory
(up to ``max_file_bytes``): this bounds what uploads take together."""


def json_response(body: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def not_found(what: str, given: str) -> ApiError:
    return ApiError(404, f"No {what} found with id '{given[:80]}'", code="not_found")


class Uploads:
    """The routes of ``/v1/files`` over a :class:`FileStore`."""

    def __init__(self, store: FileStore, settings: BatchSettings, tiers: Tiers) -> None:
        self.store = store
        self.settings = settings
        self.tiers = tiers
        self._turns = asyncio.Semaphore(UPLOADS_AT_ONCE)

    @property
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/files", self.upload, methods=["POST"]),
            Route("/v1/files", self.list, methods=["GET"]),
            Route("/v1/files/{file_id}", self.stat, methods=["GET"]),
            Route("/v1/files/{file_id}", self.delete, methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", self.content, methods=["GET"]),
        ]

    async def upload(self, request: Request) -> Response:
        limit = self.settings.max_file_bytes
        length = request.headers.get("content-length", "")
        if not length.isdigit():
            raise ApiError(411, "send the upload with a Content-Length header (as the OpenAI SDKs do)",
                           code="length_required")
        if int(length) > limit + FORM_OVERHEAD:
            raise _too_large(f"the upload is {length} bytes; the limit is {limit} bytes per file")
        async with self._turns:
            return await self._upload(request, limit)

    async def _upload(self, request: Request, limit: int) -> Response:
        try:
            async with request.form(max_files=1, max_fields=8) as form:
                purpose, upload = form.get("purpose"), form.get("file")
                if purpose != "batch":
                    raise ApiError(400, f"purpose {purpose!r} is not supported; upload batch input files "
                                        "with purpose 'batch'", param="purpose")
                if not isinstance(upload, UploadFile):
                    raise ApiError(400, "send the file as the multipart part 'file'", param="file")
                data = await upload.read(limit + 1)
                filename = upload.filename or "batch.jsonl"
        except HTTPException as exc:  # a body that is no multipart form
            raise ApiError(400, f"the upload is not a valid multipart form: {exc.detail}", param="file") from None
        if len(data) > limit:
            raise _too_large(f"the file is over {limit} bytes, the limit per file")
        try:
            await asyncio.to_thread(parse, data, max_lines=self.settings.batch_max_lines, tiers=self.tiers)
            record = await self.store.put(request.state.tenant, filename, "batch", data)
        except InvalidFile as exc:
            raise ApiError(400, f"{filename}: {exc}", param="file", code="invalid_file") from None
        except FileTooLarge as exc:
            raise _too_large(str(exc)) from None
        return json_response(record)

    async def list(self, request: Request) -> Response:
        files = await self.store.list(request.state.tenant)
        purpose = request.query_params.get("purpose")
        data = [f for f in reversed(files) if purpose is None or f.purpose == purpose]  # newest first, as OpenAI
        return json_response({"object": "list", "data": data, "has_more": False})

    async def _record(self, request: Request) -> FileObject:
        file_id = request.path_params["file_id"]
        found = await self.store.stat(request.state.tenant, file_id)
        if found is None:
            raise not_found("file", file_id)
        return found

    async def stat(self, request: Request) -> Response:
        return json_response(await self._record(request))

    async def content(self, request: Request) -> Response:
        record = await self._record(request)
        data = await self.store.get(request.state.tenant, record.id)
        if data is None:
            raise not_found("file", record.id)
        return Response(data, media_type="application/jsonl")

    async def delete(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if not await self.store.delete(request.state.tenant, file_id):
            raise not_found("file", file_id)
        return json_response({"id": file_id, "object": "file", "deleted": True})


def _too_large(message: str) -> ApiError:
    return ApiError(413, f"{message}; split the batch into smaller files", code="file_too_large")
