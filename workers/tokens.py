"""A streamed job's output, appended to its token stream as the backend generates it.

Backends call :meth:`TokenStream.put` synchronously for every piece of text; a writer task
sends whatever has gathered since its last write in one ``XADD`` (so a fast backend costs
one round trip per batch of tokens, not per token) and ends each attempt with an ``end``
entry. The stream is capped (``MAXLEN ~``) and expires with the job's result.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from broker.wire import Status, TokenChunk, json_encode

log = logging.getLogger("inference_broker.worker")
MAX_ENTRIES = 10_000
"""Entries kept per token stream (approximately): a runaway generation stays bounded."""


class TokenStream:
    """Writes one attempt of one job to ``key``; entries expire ``ttl_ms`` after the last write."""

    def __init__(self, client: aioredis.Redis, key: str, attempt: int, ttl_ms: int) -> None:
        self.client, self.key, self.attempt, self.ttl_ms = client, key, attempt, ttl_ms
        self.pending: list[str] = []
        self.ready = asyncio.Event()
        self.writer = asyncio.create_task(self._write())

    def put(self, text: str) -> None:
        """Queue ``text`` for the stream (the backend's token callback)."""
        self.pending.append(text)
        self.ready.set()

    def abort(self) -> None:
        """Stop writing (the run was cancelled): no end entry; a later attempt starts over."""
        self.writer.cancel()

    async def close(self, status: Status) -> None:
        """Flush what is queued and end the attempt with ``status``."""
        self.abort()
        await asyncio.gather(self.writer, return_exceptions=True)
        await self._send(TokenChunk(text="".join(self.pending), attempt=self.attempt, end=status))

    async def _write(self) -> None:
        while True:
            await self.ready.wait()
            self.ready.clear()
            text, self.pending = "".join(self.pending), []
            await self._send(TokenChunk(text=text, attempt=self.attempt))

    async def _send(self, chunk: TokenChunk) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.xadd(self.key, {"token": json_encode(chunk)}, maxlen=MAX_ENTRIES, approximate=True)
                pipe.pexpire(self.key, self.ttl_ms)
                await pipe.execute()
        except aioredis.RedisError as exc:
            # Streaming is best effort: the result, with the whole output, is what must arrive.
            log.warning("could not append to %s (%s); the result will still carry the output", self.key, exc)
