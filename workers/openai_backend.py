"""A backend that drives OpenAI-compatible HTTP servers: vLLM, SGLang, TGI, hosted APIs.

Chat and completion jobs are streamed (``stream: true`` with ``include_usage``), so the
backend sees each token arrive: ``first_token_at`` is when the first content token came,
``finished_at`` when the stream ended, and token counts come from the stream's ``usage``
(else the number of content chunks). Embeddings are one plain request.

Every request is bounded by the job's ``deadline`` (if set) and by ``request_timeout_s``,
streaming included. Failures map onto :class:`~workers.backend.BackendError`:

* 429, 408, 5xx, a refused or dropped connection, a request timeout, an error event
  mid-stream: ``retryable=True``, and the endpoint cools down (``workers.endpoints``); the
  worker's retry then goes to another endpoint, or fails fast with :class:`CoolingDown`
  while every endpoint of the model is cooling, instead of hammering them;
* other 4xx: ``retryable=False`` (a bad request, a wrong key or model name does not heal);
* the job's deadline reached mid-request: :class:`DeadlineExceeded`, not retryable.

API keys go in the Authorization header and nowhere else: not in ``repr``, logs or error
text (an error body that echoes a key has it replaced by ``***``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import httpx
import msgspec

from broker.wire import Job
from policies.config import Endpoint, PoolSpec
from workers.backend import BackendError, CapacityExceeded, InferenceOutput, TokenSink
from workers.endpoints import Endpoints, EndpointState, retry_after_s

RETRYABLE_STATUS = frozenset({408, 429})
"""Besides every 5xx: statuses that say "not now" rather than "never"."""
ERROR_DETAIL_CHARS = 300


class DeadlineExceeded(BackendError):
    """The job's deadline passed before its answer was complete; retrying cannot help."""

    def __init__(self, message: str) -> None:
        super().__init__(message, expired=True)


class CoolingDown(BackendError):
    """Every endpoint that serves the job's model is cooling down; ``until`` is when one is back."""

    def __init__(self, message: str, until: float) -> None:
        super().__init__(message, retryable=True, retry_at=until)
        self.until = until


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: Any = None


class _Embedding(msgspec.Struct):
    embedding: list[float]
    index: int = 0


class _Embeddings(msgspec.Struct):
    data: list[_Embedding]
    usage: _Usage | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_decode_embeddings = msgspec.json.Decoder(_Embeddings).decode


class _Retryable(Exception):
    """A transient failure found while reading a response: cools the endpoint, retryable."""


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event (multi-line data joined with newlines)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))
        # Comments (":" lines, keep-alives), `event:`, `id:` and `retry:` carry nothing we use.
    if data:
        yield "\n".join(data)


def _error_detail(body: bytes) -> str:
    """The message of an OpenAI-style error body, else the start of the body."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body[:ERROR_DETAIL_CHARS].decode(errors="replace").strip() or "(empty body)"
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        error = error.get("message") or error.get("detail") or error
    return str(error)[:ERROR_DETAIL_CHARS]


class OpenAIBackend:
    """Runs a pool's jobs on its OpenAI-compatible ``endpoints``, over one shared HTTP client.

    ``clock`` gives the instants recorded in results (seconds since the epoch);
    ``environ`` is where ``api_key_env`` names are looked up.
    """

    def __init__(self, endpoints: Iterable[Endpoint], *, request_timeout_s: float = 120.0,
                 max_connections: int = 64, base_cooldown_s: float = 1.0, max_cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.time, environ: Mapping[str, str] = os.environ) -> None:
        self.endpoints = Endpoints(endpoints, clock=clock, base_cooldown_s=base_cooldown_s,
                                   max_cooldown_s=max_cooldown_s, environ=environ)
        self.name = "openai:" + ",".join(s.label for s in self.endpoints.states)
        self.request_timeout_s = request_timeout_s
        self.clock = clock
        # One client for every job: connections to each endpoint are kept alive and reused.
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(request_timeout_s, connect=min(10.0, request_timeout_s)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers={"user-agent": "inference-broker"})

    @classmethod
    def from_spec(cls, spec: PoolSpec, **kwargs: Any) -> OpenAIBackend:
        """The backend of an ``openai`` pool, one connection per job slot."""
        return cls(spec.endpoints, request_timeout_s=spec.request_timeout_s, max_connections=spec.concurrency,
                   **kwargs)

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.endpoints!r})"

    def cooldown_until(self, model: str | None = None) -> float | None:
        """When an endpoint (serving ``model``, if given) is usable again, while *all* of them
        are cooling down; ``None`` while any can take a request. What the policy should see."""
        return self.endpoints.cooldown_until(model)

    def cooling(self) -> dict[str, float]:
        """Endpoints cooling down now: label (base URL) -> when their cooldown ends."""
        return self.endpoints.cooling()

    async def aclose(self) -> None:
        await self.http.aclose()

    def _scrub(self, text: str) -> str:
        for state in self.endpoints.states:
            if state.key is not None:
                text = text.replace(state.key.reveal(), "***")
        return text

    async def run(self, job: Job, on_token: TokenSink | None = None) -> InferenceOutput:
        state = self.endpoints.pick(job.model)
        if state is None:
            until = self.endpoints.cooldown_until(job.model)
            if until is None:
                raise BackendError(f"no endpoint of {self.name} serves model {job.model!r}")
            raise CoolingDown(f"every endpoint serving {job.model!r} is cooling down for another "
                              f"{until - self.clock():.1f} s", until)
        budget, by_deadline = self.request_timeout_s, False
        if job.deadline is not None:
            left = job.deadline - self.clock()
            if left <= 0:
                raise DeadlineExceeded("the job's deadline passed before its request was sent")
            budget, by_deadline = min(budget, left), left < budget
        progress: list[str] = []
        try:
            async with asyncio.timeout(budget):
                if job.kind == "embedding":
                    out = await self._embed(state, job)
                else:
                    out = await self._stream(state, job, progress, on_token)
        except TimeoutError:
            if by_deadline:
                raise DeadlineExceeded(f"the job's deadline passed {budget:.2f} s into its request to "
                                       f"{state.label}, after {len(progress)} streamed tokens; cut off") from None
            self.endpoints.failed(state, "a request timeout")
            raise BackendError(f"{state.label} did not finish within request_timeout_s = {budget:g} s",
                               retryable=True) from None
        except (httpx.RequestError, _Retryable) as exc:
            # `from None`: the httpx exception holds the request, Authorization header included.
            what = str(exc) if isinstance(exc, _Retryable) else f"{type(exc).__name__}: {exc}"
            cooldown = self.endpoints.failed(state, type(exc).__name__)
            raise BackendError(f"{state.label}: {self._scrub(what)}; cooling down {cooldown:.1f} s",
                               retryable=True, retry_at=self.endpoints.cooldown_until(job.model) or 0.0) from None
        except BackendError as exc:
            if exc.retryable:  # a 429 or 5xx: the retry can wait until an endpoint is back
                exc.retry_at = self.endpoints.cooldown_until(job.model) or 0.0
            raise
        self.endpoints.succeeded(state)
        return out

    def _request(self, state: EndpointState, path: str, body: dict[str, Any], stream: bool) -> httpx.Request:
        headers = {"accept": "text/event-stream" if stream else "application/json"}
        if state.key is not None:
            headers["authorization"] = f"Bearer {state.key.reveal()}"
        return self.http.build_request("POST", state.url + path, json=body, headers=headers)

    async def _check(self, state: EndpointState, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        body = await response.aread()
        status = response.status_code
        message = f"{state.label} answered HTTP {status}: {self._scrub(_error_detail(body))}"
        if status in RETRYABLE_STATUS or status >= 500:
            cooldown = self.endpoints.failed(state, f"HTTP {status}", retry_after_s(response.headers, self.clock()))
            message += f"; cooling down {cooldown:.1f} s"
            raise CapacityExceeded(message) if status == 429 else BackendError(message, retryable=True)
        raise BackendError(message, retryable=False)

    async def _stream(self, state: EndpointState, job: Job, pieces: list[str],
                      on_token: TokenSink | None = None) -> InferenceOutput:
        model = state.config.upstream(job.model)
        body: dict[str, Any] = {"model": model, "max_tokens": max(1, job.max_tokens), "stream": True,
                                "stream_options": {"include_usage": True}}
        if job.kind == "chat":
            path = "/chat/completions"
            body["messages"] = [{"role": m.role, "content": m.content} for m in job.messages or ()]
        else:
            path = "/completions"
            body["prompt"] = job.prompt or ""
        first: float | None = None
        done: float | None = None
        tokens, usage, finish = 0, None, None
        response = await self.http.send(self._request(state, path, body, stream=True), stream=True)
        try:
            await self._check(state, response)
            async for data in sse_data(response.aiter_lines()):
                if done is not None:
                    continue  # read to the end: a fully read response returns its connection to the pool
                if data == "[DONE]":
                    done = self.clock()
                    continue
                try:
                    chunk = _decode_chunk(data)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    raise _Retryable(f"malformed stream chunk ({exc})") from None
                if chunk.error is not None:
                    raise _Retryable(f"error event mid-stream after {tokens} tokens: {str(chunk.error)[:200]}")
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    delta = choice.delta
                    text = choice.text if delta is None else delta.content
                    if text or (delta is not None and (delta.reasoning_content or delta.reasoning)):
                        if first is None:
                            first = self.clock()
                        tokens += 1
                        if text:
                            pieces.append(text)
                            if on_token is not None:
                                on_token(text)
                    finish = choice.finish_reason or finish
        finally:
            await response.aclose()
        finished = self.clock() if done is None else done
        if done is None and finish is None:
            raise _Retryable(f"the stream ended after {tokens} tokens without a finish_reason or [DONE]")
        return InferenceOutput(
            first_token_at=finished if first is None else first, finished_at=finished,
            prompt_tokens=usage.prompt_tokens if usage and usage.prompt_tokens else job.prompt_tokens(),
            completion_tokens=usage.completion_tokens if usage and usage.completion_tokens else tokens,
            output="".join(pieces))

    async def _embed(self, state: EndpointState, job: Job) -> InferenceOutput:
        body = {"model": state.config.upstream(job.model), "input": list(job.texts or ()),
                "encoding_format": "float"}
        response = await self.http.send(self._request(state, "/embeddings", body, stream=False))
        await self._check(state, response)
        finished = self.clock()
        try:
            reply = _decode_embeddings(response.content)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise _Retryable(f"malformed embeddings response ({exc})") from None
        vectors = [e.embedding for e in sorted(reply.data, key=lambda e: e.index)]
        if len(vectors) != len(job.texts or ()):
            raise _Retryable(f"{len(vectors)} embeddings for {len(job.texts or ())} texts")
        prompt = reply.usage.prompt_tokens if reply.usage and reply.usage.prompt_tokens else job.prompt_tokens()
        return InferenceOutput(first_token_at=finished, finished_at=finished, prompt_tokens=prompt,
                               completion_tokens=0, embeddings=vectors)
