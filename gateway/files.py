"""The gateway's file store: the input, output and error files of the Batch API, per tenant.

Everything goes through :class:`FileStore` (put, get, stat, delete, list, each by tenant),
so another backend (an object store, a shared volume) replaces :class:`LocalFileStore`
without touching the Batch API. A file belongs to the tenant that put it: every call
takes the tenant from the caller's credentials, and a file id of another tenant reads as
missing, never as forbidden (that would tell that it exists).

:class:`LocalFileStore` keeps ``<root>/<sha256(tenant)[:32]>/<file id>`` and a ``.json``
record beside each file. Tenant names never become paths, and a file id must match
:data:`FILE_ID` before it does: neither can walk out of the root.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
import uuid
from pathlib import Path
from typing import Literal, Protocol

import msgspec

from broker.wire import DECODE_ERRORS

Purpose = Literal["batch", "batch_output"]
FILE_ID = re.compile(r"file-[0-9a-f]{32}")


class FileObject(msgspec.Struct, frozen=True, kw_only=True):
    """A file as OpenAI's ``/v1/files`` returns it."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: Purpose
    object: Literal["file"] = "file"
    status: Literal["processed"] = "processed"
    """Deprecated by OpenAI, still read by older clients: a stored file is always processed."""


class FileTooLarge(Exception):
    """An upload over the per-file limit, or one that would take its tenant over the total limit."""


class FileStore(Protocol):
    """Where files live. Every method takes the owning tenant; another tenant's file reads as missing."""

    async def put(self, tenant: str, filename: str, purpose: Purpose, data: bytes) -> FileObject:
        """Store ``data``; an upload (purpose ``batch``) past a limit raises :class:`FileTooLarge`."""
        ...

    async def get(self, tenant: str, file_id: str) -> bytes | None:
        """The content of a file, or ``None`` when the tenant has no such file."""
        ...

    async def stat(self, tenant: str, file_id: str) -> FileObject | None:
        """The file's record, or ``None``."""
        ...

    async def delete(self, tenant: str, file_id: str) -> bool:
        """Remove a file; ``False`` when the tenant had no such file."""
        ...

    async def list(self, tenant: str) -> list[FileObject]:
        """The tenant's files, oldest first."""
        ...


_decode_record = msgspec.json.Decoder(FileObject).decode


class LocalFileStore:
    """Files in a local directory (``files_dir``), within ``max_file_bytes`` each and
    ``max_tenant_bytes`` per tenant. One process should write a directory: the tenant
    total is checked under a lock of this process."""

    def __init__(self, root: Path, *, max_file_bytes: int, max_tenant_bytes: int) -> None:
        self.root = root
        self.max_file_bytes = max_file_bytes
        self.max_tenant_bytes = max_tenant_bytes
        self._lock = asyncio.Lock()

    def _dir(self, tenant: str) -> Path:
        return self.root / hashlib.sha256(tenant.encode()).hexdigest()[:32]

    def _path(self, tenant: str, file_id: str) -> Path | None:
        return self._dir(tenant) / file_id if FILE_ID.fullmatch(file_id) else None

    async def put(self, tenant: str, filename: str, purpose: Purpose, data: bytes) -> FileObject:
        if purpose == "batch_output":  # a batch's results are written whatever they take; they count for uploads
            return await self._put(tenant, filename, purpose, data)
        if len(data) > self.max_file_bytes:
            raise FileTooLarge(f"the file is {len(data)} bytes; the limit is {self.max_file_bytes} bytes per file")
        async with self._lock:
            used = sum(f.bytes for f in await self.list(tenant))
            if used + len(data) > self.max_tenant_bytes:
                raise FileTooLarge(f"the tenant's files would take {used + len(data)} bytes; the limit is "
                                   f"{self.max_tenant_bytes} bytes: delete files you no longer need")
            return await self._put(tenant, filename, purpose, data)

    async def _put(self, tenant: str, filename: str, purpose: Purpose, data: bytes) -> FileObject:
        record = FileObject(id=f"file-{uuid.uuid4().hex}", bytes=len(data), created_at=int(time.time()),
                            filename=filename[-256:] or "upload.jsonl", purpose=purpose)
        await asyncio.to_thread(self._write, self._dir(tenant), record, data)
        return record

    @staticmethod
    def _write(folder: Path, record: FileObject, data: bytes) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        # Content first, record last, each renamed into place: a crash leaves no record of a half file.
        for name, content in ((record.id, data), (f"{record.id}.json", msgspec.json.encode(record))):
            part = folder / f".{name}.part"
            part.write_bytes(content)
            os.replace(part, folder / name)

    async def get(self, tenant: str, file_id: str) -> bytes | None:
        path = self._path(tenant, file_id)
        if path is None or not path.with_name(f"{file_id}.json").exists():
            return None
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None

    async def stat(self, tenant: str, file_id: str) -> FileObject | None:
        path = self._path(tenant, file_id)
        return None if path is None else _read_record(path.with_name(f"{file_id}.json"))

    async def delete(self, tenant: str, file_id: str) -> bool:
        path = self._path(tenant, file_id)
        if path is None:
            return False
        record = path.with_name(f"{file_id}.json")
        existed = record.exists()
        record.unlink(missing_ok=True)  # the record first: the file is gone for readers at once
        path.unlink(missing_ok=True)
        return existed

    async def list(self, tenant: str) -> list[FileObject]:
        folder = self._dir(tenant)
        if not folder.is_dir():
            return []
        records = (_read_record(p) for p in folder.glob("file-*.json"))
        return sorted((r for r in records if r is not None), key=lambda r: (r.created_at, r.id))


def _read_record(path: Path) -> FileObject | None:
    try:
        return _decode_record(path.read_bytes())
    except FileNotFoundError:
        return None
    except DECODE_ERRORS:
        return None  # a record damaged by hand: the file reads as missing rather than failing every list
