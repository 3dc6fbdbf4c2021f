"""The OpenAI endpoints: each request becomes one job, and its result (or token stream) the response.

A request's life: read the body (bounded), build the job (:func:`gateway.openai.to_job`,
tenant from the API key), submit it through the SDK (its shard's ingress, in the tenant's
own space when the policy config names it: :meth:`Gateway.client_for`), then wait for its
result, or follow its token stream with ``stream: true``, while watching the connection. A
client that goes away before the job started cancels it (the job ends ``cancelled``, its one
outcome); one that goes away later leaves it to finish, its result kept under its id as any
other. A response starts only once the job has a first token or an outcome, so a refused
or expired job is answered with its status (429, 504), not a stream that breaks off.

Deadlines: ``X-IB-Deadline-Ms`` (the job must start within that many milliseconds) or the
client's own timeout (``x-stainless-timeout``, seconds, which the official SDKs send): a
job that would start after the client gave up is wasted work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import TypeVar

import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from broker.errors import Backpressure, JobRejected, NotReplicated, RedisUnavailable, ResultTimeout
from broker.wire import Job, Result, TokenChunk, json_encode, new_id
from gateway import metrics
from gateway.catalog import Endpoint
from gateway.context import Gateway, error_response
from gateway.errors import ApiError
from gateway.openai import to_job
from gateway.responses import chunk, finish_reason, timing_headers, to_response, usage_chunk

log = logging.getLogger("inference_broker.gateway")
T = TypeVar("T")
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
"""No proxy may buffer or cache a stream (nginx honours ``x-accel-buffering``)."""
NO_ANSWER = 499
"""Status recorded, never sent, for a request whose client left or that a drain cut (nginx's 499)."""


class Answer:
    """What a request was answered, for the metrics: the HTTP status, or the error event a stream ended with."""

    code = 0


class OpenAIEndpoint:
    """One OpenAI endpoint as an ASGI app, so that its metrics cover the whole answer, a stream's included."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        in_flight = metrics.IN_FLIGHT.labels(self.endpoint)
        in_flight.inc()
        answer = Answer()
        try:
            try:
                response = await _serve(Request(scope, receive), self.endpoint, answer)
            except ApiError as exc:
                response = error_response(exc)
            answer.code = answer.code or response.status_code
            await response(scope, receive, send)
        except ClientGone:
            answer.code = NO_ANSWER
            await Response(status_code=NO_ANSWER)(scope, receive, send)  # to a closed connection: a no-op
        except asyncio.CancelledError:
            answer.code = NO_ANSWER
            raise
        finally:
            in_flight.dec()
            metrics.REQUESTS.labels(self.endpoint, str(answer.code or NO_ANSWER)).inc()
            metrics.DURATION.labels(self.endpoint).observe(time.monotonic() - started)


async def _serve(request: Request, endpoint: Endpoint, answer: Answer) -> Response:
    gateway = Gateway.of(request)
    body = await _body(request, gateway.options.max_body_bytes)
    now = time.time()
    wait_s, deadline = _timing(request.headers, now, gateway.options.request_timeout_s)
    job = to_job(endpoint, body, job_id=new_id(), tenant=request.state.tenant, tiers=gateway.tiers,
                 deadline=deadline, slo=request.headers.get("x-ib-slo"), catalog=gateway.catalog)
    job = msgspec.structs.replace(job, created_at=now)
    await _submit(gateway, job)
    if job.stream:
        return await _stream(request, gateway, endpoint, job, wait_s, answer)
    try:
        waiting = gateway.client_for(job.tenant).result(job.id, timeout=wait_s)
        result = await _unless_gone(request, gateway, job, waiting)
    except ResultTimeout:
        await _cancel(gateway, job, "its client's wait ran out")
        raise ApiError(504, f"no result for job {job.id} within {wait_s:g} s", type="timeout",
                       code="result_timeout") from None
    if result.status != "ok":
        response = error_response(ApiError.of_result(result))
        response.headers.update(timing_headers(result))
        return response
    return JSONResponse(to_response(endpoint, job, result, tiers=gateway.tiers), headers=timing_headers(result))


async def _body(request: Request, limit: int) -> bytes:
    too_large = ApiError(413, f"the request body is over {limit} bytes; send less per request", code="body_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    pieces, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise too_large
        pieces.append(piece)
    return b"".join(pieces)


def _timing(headers: Mapping[str, str], now: float, default_wait_s: float) -> tuple[float, float | None]:
    """(seconds to wait for the job, the job's deadline) from the request's headers."""
    client_s = _number(headers, "x-stainless-timeout", 1.0)
    budget_ms = _number(headers, "x-ib-deadline-ms", 1000.0)
    wait_s = min(default_wait_s, client_s) if client_s is not None else default_wait_s
    starts_by = [now + s for s in (client_s, budget_ms / 1000 if budget_ms is not None else None) if s is not None]
    return wait_s, min(starts_by) if starts_by else None


def _number(headers: Mapping[str, str], name: str, unit: float) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1e9 * unit / 1000:  # NaN fails too
        raise ApiError(400, f"header {name} must be a positive number, got {raw[:32]!r}", code="invalid_header")
    return value


async def _submit(gateway: Gateway, job: Job) -> None:
    try:
        await gateway.client_for(job.tenant).submit(job)
    except Backpressure as exc:
        raise ApiError(429, f"the broker is at capacity ({exc}); retry after the Retry-After seconds",
                       type="rate_limit_error", code="backlog_full",
                       retry_after_s=gateway.options.backpressure_retry_s) from None
    except JobRejected as exc:
        raise ApiError(400, str(exc), code="job_rejected") from None
    except NotReplicated:
        log.warning("job %s reached its primary but not its replicas in time; serving it anyway", job.id)
    except (RedisUnavailable, RedisConnectionError, RedisTimeoutError):
        raise ApiError(503, "the broker's Redis is unreachable; retry shortly", type="server_error",
                       code="broker_unavailable", retry_after_s=gateway.options.backpressure_retry_s) from None


async def _gone(request: Request) -> None:
    """Return when the client disconnects (the body was read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client disconnected before its response started."""


async def _unless_gone(request: Request, gateway: Gateway, job: Job, work: Awaitable[T]) -> T:
    """``work``'s value; :class:`ClientGone` when the client went away first (the job is cancelled if
    not started).

    The server cancelling the request (a drain past its grace) cancels the job the same way.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_gone(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        await asyncio.shield(_cancel(gateway, job, "the gateway stopped before it started"))
        raise
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.done() and not task.cancelled():
        return task.result()
    await _cancel(gateway, job, "its client went away before it started")
    raise ClientGone


async def _cancel(gateway: Gateway, job: Job, why: str) -> None:
    try:
        if await asyncio.wait_for(gateway.client_for(job.tenant).cancel(job, reason=why), 5):
            metrics.CANCELLED.labels(job.kind).inc()
            log.info("job %s cancelled: %s", job.id, why)
    except Exception as exc:  # noqa: BLE001 - the job still ends (it runs); nothing to answer
        log.warning("job %s could not be cancelled (%s); it runs to its end", job.id, exc)


async def _stream(request: Request, gateway: Gateway, endpoint: Endpoint, job: Job, wait_s: float,
                  answer: Answer) -> Response:
    tokens = gateway.client_for(job.tenant).tokens(job.id, timeout=wait_s)
    try:
        first = await _unless_gone(request, gateway, job, anext(tokens, None))
    except ResultTimeout:
        await _cancel(gateway, job, "its client's wait ran out")
        raise ApiError(504, f"no output for job {job.id} within {wait_s:g} s", type="timeout",
                       code="result_timeout") from None
    if first is None:  # it ended without output: a refused, expired or failed job is answered with its status
        result = await _outcome(gateway, job)
        if result is None or result.status != "ok":
            return error_response(ApiError.of_result(result) if result else _no_result(job))
    return StreamingResponse(_events(gateway, endpoint, job, first, tokens, answer), media_type="text/event-stream",
                             headers={**SSE_HEADERS, "x-request-id": job.id, "x-ib-job-id": job.id})


async def _outcome(gateway: Gateway, job: Job) -> Result | None:
    try:
        return await gateway.client_for(job.tenant).result(job.id, timeout=5)
    except ResultTimeout:
        return None


def _no_result(job: Job) -> ApiError:
    return ApiError(502, f"job {job.id}: its token stream ended without a result", type="server_error",
                    code="no_result")


async def _events(gateway: Gateway, endpoint: Endpoint, job: Job, first: TokenChunk | None,
                  tokens: AsyncIterator[TokenChunk], answer: Answer) -> AsyncIterator[bytes]:
    """The server-sent events of a stream: chunks, the finish, the usage (if asked), ``[DONE]``.

    Once the stream has started its status is sent: a failure can only be an ``error`` event
    (the official SDKs raise it), recorded in ``answer`` for the metrics.
    """
    at = int(job.created_at or 0)
    sent = 0
    error: ApiError | None = None
    try:
        attempt = first.attempt if first else 1
        piece = first
        while piece is not None:
            if piece.attempt != attempt:
                # A retried job starts its output again; what the client has cannot be taken back.
                error = ApiError(502, f"job {job.id} was retried mid-stream after its worker failed; send the "
                                      "request again", type="server_error", code="stream_interrupted")
                break
            yield _event(chunk(endpoint, job, at, piece.text, first=not sent))
            sent += 1
            piece = await anext(tokens, None)
        if error is None:
            result = await _outcome(gateway, job)
            if result is not None and result.status == "ok":
                tokens_out = result.usage.completion_tokens or sent
                yield _event(chunk(endpoint, job, at, None, finish=finish_reason(job, tokens_out), first=not sent))
                if job.metadata.get("include_usage") == "1":
                    yield _event(usage_chunk(endpoint, job, at, result, tokens_out))
                yield b"data: [DONE]\n\n"
                return
            error = ApiError.of_result(result) if result else _no_result(job)
    except ResultTimeout:
        error = ApiError(504, f"job {job.id}: its output stopped before it ended", type="timeout",
                         code="result_timeout")
    answer.code = error.status
    yield _event(error.body())


def _event(body: dict[str, object]) -> bytes:
    return b"data: " + json_encode(body) + b"\n\n"
