"""Results as OpenAI response bodies: completions, embedding lists, stream chunks, timing headers. Pure.

Every body carries a ``broker`` object that OpenAI clients ignore (:func:`extension`): the
job id, its SLO class, pool, route reason and timings, which :func:`timing_headers` also
puts in ``x-ib-*`` response headers.
"""

from __future__ import annotations

import base64
import struct

from broker.wire import Job, Result
from gateway.catalog import Endpoint, Tiers
from gateway.errors import ApiError

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
