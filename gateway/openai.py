"""The OpenAI API bodies the gateway accepts and produces, mapped onto jobs and results.

Pure: bytes and broker messages in, jobs and response dicts out; no I/O, no clock. The
gateway's routes and the Batch API (one JSONL line at a time) share it.

Requests decode into msgspec Structs that ignore fields they do not know, as OpenAI's
SDKs expect of a server (a newer SDK sends parameters an older server has not heard of);
a field we know but cannot honour (``n`` above 1, image content, token-array prompts) is
a 400 naming it. Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``.

Every response body carries a ``broker`` object (ignored by OpenAI clients): the job id,
its SLO class, pool, route reason and timings, which :func:`timing_headers` also puts in
``x-ib-*`` response headers.
"""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Mapping
from typing import Annotated, Literal

import msgspec

from broker.wire import ChatMessage, Job, MaxTokens, Model, Result
from policies.config import PolicyConfig

Endpoint = Literal["chat", "completion", "embedding"]
Tier = Literal["auto", "default", "flex", "priority", "scale"]
COMPLETION_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` of a legacy completion (chat takes the job's default)."""


class ApiError(Exception):
    """A request answered with an error in OpenAI's format; ``retry_after_s`` sets Retry-After."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def of_result(cls, result: Result) -> ApiError:
        """The error a job's non-``ok`` result answers: 429 refused, 504 expired, 502 failed, 409 cancelled."""
        error = result.error or "no detail"
        if result.status == "rejected":
            return cls(429, f"the broker refused job {result.id}: {error}; retry after the Retry-After seconds",
                       type="rate_limit_error", code=error.split(":", 1)[0] or "rejected",
                       retry_after_s=result.retry_after_s or 1.0)
        if result.status == "expired":
            return cls(504, f"job {result.id} missed its deadline before it ran: {error}", type="timeout",
                       code="deadline_exceeded")
        if result.status == "failed":
            return cls(502, f"job {result.id} failed: {error}", type="server_error", code="backend_error")
        if result.status == "cancelled":
            return cls(409, f"job {result.id} was cancelled before it started: {error}", type="cancelled",
                       code="job_cancelled")
        return cls(500, f"job {result.id} ended {result.status}: {error}", type="server_error", code=result.status)


# --------------------------------------------------------------------------- requests


class ContentPart(msgspec.Struct, frozen=True):
    type: str
    text: str | None = None


class Message(msgspec.Struct, frozen=True):
    role: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    content: str | list[ContentPart] | None = None
    """None for an assistant turn that only called tools."""


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool | None = None


class _Common(msgspec.Struct, frozen=True, kw_only=True):
    model: Model
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    service_tier: Tier | None = None
    n: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None


class ChatRequest(_Common, frozen=True, kw_only=True):
    messages: list[Message]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None


class CompletionRequest(_Common, frozen=True, kw_only=True):
    prompt: str | list[str]
    max_tokens: MaxTokens | None = None


class EmbeddingRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: Model
    input: str | list[str]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None


Request = ChatRequest | CompletionRequest | EmbeddingRequest
_DECODERS: dict[Endpoint, msgspec.json.Decoder[ChatRequest] | msgspec.json.Decoder[CompletionRequest]
                | msgspec.json.Decoder[EmbeddingRequest]] = {
    "chat": msgspec.json.Decoder(ChatRequest),
    "completion": msgspec.json.Decoder(CompletionRequest),
    "embedding": msgspec.json.Decoder(EmbeddingRequest),
}
_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`")


def decode(endpoint: Endpoint, body: bytes) -> Request:
    """The request body of ``endpoint``, validated; a 400 naming the bad parameter otherwise."""
    try:
        return _DECODERS[endpoint].decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        at, missing = _PATH.search(text), _MISSING.match(text)
        param = at["path"] if at else None
        if missing:
            param = f"{param}.{missing['field']}" if param else missing["field"]
        raise ApiError(400, _PATH.sub(f" at '{param}'" if at else "", text), param=param) from None
    except msgspec.DecodeError:
        raise ApiError(400, "the request body is not valid JSON; send one JSON object "
                            "(Content-Type: application/json)") from None


# --------------------------------------------------------------------------- service tiers


class Tiers(msgspec.Struct, frozen=True):
    """OpenAI's ``service_tier`` mapped onto the policy's SLO classes.

    A tier maps to a class (sent as the job's SLO hint) or to None (no hint: the policy's
    rules decide). By default ``priority`` is the most urgent class, ``flex`` the ``batch``
    class (else the least urgent), ``default`` and ``auto`` leave it to the rules.
    """

    slo_of: dict[str, str | None]
    classes: frozenset[str]

    @classmethod
    def of(cls, config: PolicyConfig, overrides: Mapping[str, str | None] | None = None) -> Tiers:
        """The default mapping for ``config``, with ``overrides`` (tier -> class or None) applied."""
        urgency = sorted(config.classes, key=lambda name: config.classes[name].priority)
        slo_of: dict[str, str | None] = {"auto": None, "default": None, "priority": urgency[0],
                                         "flex": "batch" if "batch" in config.classes else urgency[-1], "scale": None}
        for tier, slo in (overrides or {}).items():
            if slo is not None and slo not in config.classes:
                raise ValueError(f"service tier {tier!r} maps to {slo!r}, not a class of the policy "
                                 f"({', '.join(sorted(config.classes))})")
            slo_of[tier] = slo
        return cls(slo_of=slo_of, classes=frozenset(config.classes))

    def hint(self, tier: str | None, header: str | None = None) -> str | None:
        """The SLO hint of a request: the ``X-IB-SLO`` header's class, else its tier's."""
        if header is not None:
            if header not in self.classes:
                raise ApiError(400, f"X-IB-SLO: {header!r} is not an SLO class of this broker; use one of "
                                    f"{', '.join(sorted(self.classes))}", code="invalid_slo_class")
            return header
        return self.slo_of.get(tier or "default")

    def applied(self, slo: str | None) -> str:
        """The tier reported for a job served in class ``slo``: the first tier mapping to it, else default."""
        return next((tier for tier in ("priority", "flex") if slo is not None and self.slo_of.get(tier) == slo),
                    "default")


# --------------------------------------------------------------------------- request -> job


def _text(message: Message, i: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"content part type {part.type!r} is not supported; send text",
                           param=f"messages[{i}].content[{j}].type")
        parts.append(part.text)
    return "".join(parts)


def _one_prompt(prompt: str | list[str]) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) != 1:
        raise ApiError(400, f"one prompt per request (got {len(prompt)}); send them as separate requests "
                            "or through the Batch API", param="prompt")
    return prompt[0]


def _texts(given: str | list[str]) -> list[str]:
    texts = [given] if isinstance(given, str) else given
    if not texts:
        raise ApiError(400, "input is empty; send a string or a list of strings", param="input")
    for i, text in enumerate(texts):
        if not text:
            raise ApiError(400, "input must not contain empty strings", param=f"input[{i}]" if len(texts) > 1
                           else "input")
    return texts


def to_job(endpoint: Endpoint, body: bytes, *, job_id: str, tenant: str, tiers: Tiers, deadline: float | None,
           slo: str | None = None, catalog: Catalog | None = None) -> Job:
    """The job for an OpenAI request ``body`` to ``endpoint``; raises :class:`ApiError` (400, 404).

    ``tenant`` comes from the caller's credentials, never the body. ``slo``: the ``X-IB-SLO``
    header, over the body's ``service_tier``. ``deadline``: absolute time after which the job
    must not start. With ``catalog``, a model it does not serve for ``endpoint`` is a 404.
    What :func:`to_response` needs later (requested tier, encoding, usage in streams) rides
    in the job's metadata.
    """
    request = decode(endpoint, body)
    if catalog is not None:
        catalog.check(request.model, endpoint)
    meta: dict[str, str] = {}
    common = {"id": job_id, "model": request.model, "kind": endpoint, "tenant": tenant, "deadline": deadline}
    if isinstance(request, EmbeddingRequest):
        if request.dimensions is not None:
            raise ApiError(400, "dimensions is not supported: embeddings come at the model's size",
                           param="dimensions")
        if request.encoding_format == "base64":
            meta["encoding_format"] = "base64"
        return Job(**common, texts=_texts(request.input), slo=tiers.hint(None, slo), metadata=meta)  # type: ignore[arg-type]
    if request.n not in (None, 1):
        raise ApiError(400, "n must be 1: one choice per request", param="n")
    hint = tiers.hint(request.service_tier, slo)
    if request.service_tier is not None:
        meta["service_tier"] = request.service_tier
    if request.stream_options is not None and request.stream_options.include_usage:
        meta["include_usage"] = "1"
    stream = bool(request.stream)
    if isinstance(request, ChatRequest):
        if not request.messages:
            raise ApiError(400, "messages is empty; send at least one message", param="messages")
        messages = [ChatMessage(m.role, _text(m, i)) for i, m in enumerate(request.messages)]
        limit = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        extra = {} if limit is None else {"max_tokens": limit}
        return Job(**common, messages=messages, slo=hint, stream=stream, metadata=meta, **extra)  # type: ignore[arg-type]
    limit = COMPLETION_MAX_TOKENS if request.max_tokens is None else request.max_tokens
    return Job(**common, prompt=_one_prompt(request.prompt), max_tokens=limit, slo=hint,  # type: ignore[arg-type]
               stream=stream, metadata=meta)


class Catalog(msgspec.Struct, frozen=True):
    """The models of the policy config and the endpoints each serves (GET /v1/models)."""

    kinds: dict[str, frozenset[str]]
    owner: str = "inference-broker"

    @classmethod
    def of(cls, config: PolicyConfig) -> Catalog:
        kinds: dict[str, set[str]] = {}
        for pool in config.pools.values():
            for model in pool.models:
                kinds.setdefault(model, set()).update(pool.kinds)
        return cls(kinds={model: frozenset(k) for model, k in sorted(kinds.items())})

    def check(self, model: str, endpoint: Endpoint) -> None:
        served = self.kinds.get(model)
        if served is None:
            raise ApiError(404, f"The model '{model}' does not exist; GET /v1/models lists those served",
                           param="model", code="model_not_found")
        if endpoint not in served:
            raise ApiError(400, f"model '{model}' does not serve {endpoint} requests (it serves "
                                f"{', '.join(sorted(served))})", param="model", code="model_not_supported")

    def body(self, created: int = 0) -> dict[str, object]:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": self.owner}
                                           for model in self.kinds]}


# --------------------------------------------------------------------------- result -> response

_PREFIX: dict[Endpoint, str] = {"chat": "chatcmpl-", "completion": "cmpl-", "embedding": "embd-"}


def response_id(endpoint: Endpoint, job: Job) -> str:
    return _PREFIX[endpoint] + job.id


def usage(job: Job, result: Result | None, completion_tokens: int | None = None) -> dict[str, int]:
    """OpenAI's usage object: the backend's counts, the prompt estimated where it reported none."""
    prompt = (result.usage.prompt_tokens if result else 0) or job.prompt_tokens()
    done = completion_tokens if completion_tokens is not None else (result.usage.completion_tokens if result else 0)
    if job.kind == "embedding":
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def finish_reason(job: Job, completion_tokens: int) -> str:
    return "length" if job.max_tokens and completion_tokens >= job.max_tokens else "stop"


def extension(result: Result) -> dict[str, object]:
    """The ``broker`` field of a response: where and how fast the job ran."""
    metrics = result.metrics
    return {"job_id": result.id, "status": result.status, "slo": result.slo, "pool": result.pool,
            "route_reason": result.route_reason, "slo_met": result.slo_met,
            "attempt": result.timing.attempt if result.timing else None,
            "queue_time_ms": metrics.queue_time_ms if metrics else None,
            "time_to_first_token_ms": metrics.time_to_first_token_ms if metrics else None,
            "e2e_latency_ms": metrics.e2e_latency_ms if metrics else None}


def timing_headers(result: Result) -> dict[str, str]:
    """``x-ib-*`` response headers from the result (ASCII, one line each)."""
    found = {"x-request-id": result.id, "x-ib-job-id": result.id, "x-ib-slo": result.slo,
             "x-ib-pool": result.pool, "x-ib-route-reason": result.route_reason}
    if result.metrics is not None:
        found |= {"x-ib-queue-ms": f"{result.metrics.queue_time_ms:.1f}",
                  "x-ib-ttft-ms": f"{result.metrics.time_to_first_token_ms:.1f}",
                  "x-ib-e2e-ms": f"{result.metrics.e2e_latency_ms:.1f}"}
    return {name: _header_safe(value) for name, value in found.items() if value is not None}


def _header_safe(value: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in value[:512])


def created(job: Job, result: Result | None = None) -> int:
    if result is not None and result.timing is not None:
        return int(result.timing.created_at)
    return int(job.created_at or 0)


def to_response(endpoint: Endpoint, job: Job, result: Result, *, tiers: Tiers | None = None) -> dict[str, object]:
    """The OpenAI body of ``job``'s ``ok`` result: chat.completion, text_completion or an embedding list.

    ``tiers`` names the service tier applied (else the one requested). A result that is not
    ``ok`` raises its :class:`ApiError`.
    """
    if result.status != "ok":
        raise ApiError.of_result(result)
    base: dict[str, object] = {"id": response_id(endpoint, job), "created": created(job, result), "model": job.model}
    if endpoint == "embedding":
        vectors = result.embeddings or []
        b64 = job.metadata.get("encoding_format") == "base64"
        data = [{"object": "embedding", "index": i, "embedding": _b64(v) if b64 else v} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": job.model, "usage": usage(job, result),
                "broker": extension(result)}
    tokens = result.usage.completion_tokens
    tier = tiers.applied(result.slo) if tiers is not None else job.metadata.get("service_tier", "default")
    reason = finish_reason(job, tokens)
    choice: dict[str, object]
    if endpoint == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.output or "", "refusal": None},
                  "logprobs": None, "finish_reason": reason}
        base["object"] = "chat.completion"
    else:
        choice = {"index": 0, "text": result.output or "", "logprobs": None, "finish_reason": reason}
        base["object"] = "text_completion"
    return {**base, "choices": [choice], "usage": usage(job, result), "service_tier": tier,
            "system_fingerprint": None, "broker": extension(result)}


def _b64(vector: list[float]) -> str:
    # OpenAI's base64 embeddings: little-endian float32, which the official SDK asks for by default.
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def chunk(endpoint: Endpoint, job: Job, created_at: int, text: str | None, *, finish: str | None = None,
          first: bool = False) -> dict[str, object]:
    """One streamed chunk: ``chat.completion.chunk`` or ``text_completion`` with ``text``, or the finish."""
    include_usage = job.metadata.get("include_usage") == "1"
    base: dict[str, object] = {"id": response_id(endpoint, job), "created": created_at, "model": job.model}
    if endpoint == "chat":
        delta: dict[str, object] = {} if text is None else {"content": text}
        if first:
            delta["role"] = "assistant"
        choice: dict[str, object] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        base |= {"object": "chat.completion.chunk", "system_fingerprint": None}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        base["object"] = "text_completion"
    return {**base, "choices": [choice], **({"usage": None} if include_usage else {})}


def usage_chunk(endpoint: Endpoint, job: Job, created_at: int, result: Result | None,
                completion_tokens: int) -> dict[str, object]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    kind = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
    body: dict[str, object] = {"id": response_id(endpoint, job), "object": kind, "created": created_at,
                               "model": job.model, "choices": [], "usage": usage(job, result, completion_tokens)}
    if result is not None:
        body["broker"] = extension(result)
    return body
