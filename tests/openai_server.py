"""A local server speaking the OpenAI HTTP API, with timing and failures set by the test.

Serves ``POST /v1/chat/completions`` and ``/v1/completions`` (streamed as server-sent
events, or whole), ``POST /v1/embeddings`` (float or base64 vectors) and ``GET /v1/models``,
on 127.0.0.1 and a free port::

    async with serve(Behaviour(ttft_s=0.1, tokens_per_s=200)) as server:
        backend = OpenAIBackend([Endpoint(base_url=server.url)])

Output tokens are emitted on a schedule fixed from the request's arrival (token ``i`` at
``ttft_s + i / tokens_per_s``), not by chained sleeps, so the timing a client measures does
not drift with this process's scheduling. ``behaviour`` may be changed between requests;
``requests`` records what arrived. Failures are counted down: ``fail_429=2`` answers the
next two requests with 429 (and ``Retry-After`` when ``retry_after`` is set), then serves.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web


@dataclass
class Behaviour:
    """What the server does; tests change it freely between requests."""

    ttft_s: float = 0.0
    tokens_per_s: float = 1000.0
    output_tokens: int | None = None
    """Tokens per answer; ``None``: the request's ``max_tokens`` (16 when absent)."""
    fail_429: int = 0
    retry_after: str | None = "1"
    """The 429s' ``Retry-After`` header value; ``None`` sends none."""
    fail_500: int = 0
    fail_status: int = 500
    """The status the ``fail_500`` answers carry (any 4xx or 5xx)."""
    fail_mid_stream: int = 0
    """Streams to break after ``mid_stream_after`` tokens."""
    mid_stream_after: int = 2
    mid_stream_mode: Literal["close", "error"] = "close"
    """``close``: drop the connection; ``error``: send an error event and end the stream."""
    send_usage: bool = True
    """Honour ``stream_options.include_usage`` (off: a server that never reports usage)."""
    api_key: str | None = None
    """When set, requests need ``Authorization: Bearer <api_key>``; others get 401."""
    echo_key_in_401: bool = True
    """Like some real servers, repeat the offending key in the 401 body (tests scrub it)."""
    models: tuple[str, ...] = ("test-model", "test-embed")
    embedding_dim: int = 8


@dataclass
class Seen:
    """One request as the server received it."""

    path: str
    body: dict[str, Any]
    authorization: str | None
    at: float
    peer: object
    """The client's (host, port): one per connection, so reuse shows as repeats."""


@dataclass
class OpenAIServer:
    behaviour: Behaviour
    url: str = ""
    """Base URL up to ``/v1``, as OpenAI clients and :class:`Endpoint` take it."""
    requests: list[Seen] = field(default_factory=list)
    disconnected: int = 0
    """Streams whose client went away before the end (a deadline cut, a cancel)."""


def embedding(text: str, dim: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest() * (dim // 32 + 1)
    return [round(b / 255 - 0.5, 4) for b in digest[:dim]]


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": None}},
                             status=status, headers=headers)


def _prompt_tokens(body: dict[str, Any]) -> int:
    if "messages" in body:
        chars = sum(len(str(m.get("content", ""))) for m in body["messages"])
    else:
        value = body.get("prompt", body.get("input", ""))
        chars = sum(len(v) for v in value) if isinstance(value, list) else len(str(value))
    return max(1, chars // 4)


def _app(server: OpenAIServer) -> web.Application:
    def b() -> Behaviour:
        return server.behaviour  # looked up per request: tests may swap the whole object

    async def gate(request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
        """Record the request; the failure it should get, if any."""
        body = await request.json() if request.can_read_body else {}
        auth = request.headers.get("Authorization")
        peer = request.transport.get_extra_info("peername") if request.transport else None
        server.requests.append(Seen(request.path, body, auth, time.time(), peer))
        beh = b()
        if beh.api_key is not None and auth != f"Bearer {beh.api_key}":
            given = (auth or "").removeprefix("Bearer ")
            shown = f" {given}" if beh.echo_key_in_401 else ""
            return body, _error(401, f"Incorrect API key provided:{shown}", "invalid_request_error")
        if beh.fail_429 > 0:
            beh.fail_429 -= 1
            headers = {"Retry-After": beh.retry_after} if beh.retry_after is not None else None
            return body, _error(429, "Rate limit reached", "rate_limit_exceeded", headers)
        if beh.fail_500 > 0:
            beh.fail_500 -= 1
            return body, _error(beh.fail_status, "The server had an error", "server_error")
        model = body.get("model")
        if request.method == "POST" and model not in beh.models:
            return body, _error(404, f"The model `{model}` does not exist", "invalid_request_error")
        return body, None

    async def generate(request: web.Request) -> web.StreamResponse:
        arrived = asyncio.get_running_loop().time()
        body, failure = await gate(request)
        if failure is not None:
            return failure
        beh = b()
        chat = request.path.endswith("/chat/completions")
        n = beh.output_tokens if beh.output_tokens is not None else int(body.get("max_tokens") or 16)
        usage = {"prompt_tokens": _prompt_tokens(body), "completion_tokens": n,
                 "total_tokens": _prompt_tokens(body) + n}
        common = {"id": "chatcmpl-test" if chat else "cmpl-test", "created": int(time.time()), "model": body["model"]}
        words = [f"tok{i} " for i in range(n)]

        async def at_token(i: int) -> None:
            due = arrived + beh.ttft_s + i / beh.tokens_per_s
            await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))

        if not body.get("stream"):
            await at_token(max(0, n - 1))
            text = "".join(words)
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            return web.json_response({**common, "object": "chat.completion" if chat else "text_completion",
                                      "choices": [choice], "usage": usage})

        def chunk(text: str | None, finish: str | None = None, first: bool = False) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if first else {}
                if text is not None:
                    delta["content"] = text
                choice["delta"] = delta
            else:
                choice["text"] = text or ""
            return {**common, "object": "chat.completion.chunk" if chat else "text_completion",
                    "choices": [choice]}

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(data: dict[str, Any] | str) -> None:
            payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
            await response.write(f"data: {payload}\n\n".encode())

        breaking = beh.fail_mid_stream > 0
        if breaking:
            beh.fail_mid_stream -= 1
        try:
            if chat:
                await send(chunk("", first=True))  # role first, no content: not a token
            for i, word in enumerate(words):
                if breaking and i == beh.mid_stream_after:
                    if beh.mid_stream_mode == "error":
                        await send({"error": {"message": "the engine died mid-request", "type": "server_error",
                                              "code": 500}})
                        await send("[DONE]")
                        await response.write_eof()
                        return response
                    assert request.transport is not None
                    request.transport.close()  # no terminating chunk: the client sees a broken stream
                    return response
                await at_token(i)
                await send(chunk(word))
            await send(chunk(None if chat else "", finish="length"))
            options = body.get("stream_options") or {}
            if beh.send_usage and options.get("include_usage"):
                await send({**common, "object": "chat.completion.chunk" if chat else "text_completion",
                            "choices": [], "usage": usage})
            await send("[DONE]")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            server.disconnected += 1
            raise
        return response

    async def embeddings(request: web.Request) -> web.Response:
        body, failure = await gate(request)
        if failure is not None:
            return failure
        beh = b()
        await asyncio.sleep(beh.ttft_s)
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        data = []
        for i, text in enumerate(texts):
            vector: list[float] | str = embedding(text, beh.embedding_dim)
            if body.get("encoding_format") == "base64":  # what the official client asks for by default
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        tokens = _prompt_tokens(body)
        return web.json_response({"object": "list", "data": data, "model": body["model"],
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def models(request: web.Request) -> web.Response:
        _body, failure = await gate(request)
        if failure is not None:
            return failure
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "tests"} for m in b().models]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    return app


@asynccontextmanager
async def serve(behaviour: Behaviour | None = None) -> AsyncIterator[OpenAIServer]:
    """Run a server on 127.0.0.1 and a free port for the duration of the block."""
    server = OpenAIServer(behaviour or Behaviour())
    runner = web.AppRunner(_app(server), access_log=None, handler_cancellation=True)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    server.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    try:
        yield server
    finally:
        await runner.cleanup()
