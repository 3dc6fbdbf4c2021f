"""The OpenAI API bodies the gateway accepts, mapped onto jobs; with the rest of its OpenAI interface.

Pure: bytes in, jobs out; no I/O, no clock. The gateway's routes and the Batch API (one
JSONL line at a time) share it: :func:`to_job` here, :func:`to_response` for the way back,
:class:`ApiError` for every refusal, :class:`Tiers` and :class:`Catalog` for what the
policy config offers.

Requests decode into msgspec Structs that ignore fields they do not know, as OpenAI's
SDKs expect of a server (a newer SDK sends parameters an older server has not heard of);
a field we know but cannot honour (``n`` above 1, image content, token-array prompts) is
a 400 naming it.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

from broker.wire import ChatMessage, Job, MaxTokens, Model
from gateway.catalog import Catalog, Endpoint, Tier, Tiers
from gateway.errors import ApiError
from gateway.responses import to_response

__all__ = ["ApiError", "Catalog", "Endpoint", "Tiers", "decode", "to_job", "to_response"]
"""Requests to jobs here; errors, tiers and models from :mod:`gateway.errors` and
:mod:`gateway.catalog`; results to bodies from :mod:`gateway.responses`."""
COMPLETION_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` of a legacy completion (chat takes the job's default)."""


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
