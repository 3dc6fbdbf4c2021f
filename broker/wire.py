"""The wire contract: every message on every stream, as msgspec Structs.

Schema rules: each message carries ``v`` (the schema version). Changes only add fields
with defaults, so older readers skip what they do not know and newer readers fill in
defaults for what older writers left out. docs/wire-format.md documents the JSON form.

Stream entries hold one field each, named for the message it carries:

======================  ============  ============================================
stream                  field         message
======================  ============  ============================================
``<p>:{<p>}:jobs``      ``job``       :class:`Job` as JSON or msgpack
``<p>:{<p>}:pool:<n>``  ``routed``    :class:`RoutedJob` as JSON
reply stream            ``result``    :class:`Result` as JSON
``<p>:{<p>}:dead``      ``dead``      :class:`DeadLetter` as JSON
``<p>:{<p>}:tokens:<i>``  ``token``   :class:`TokenChunk` as JSON (jobs with ``stream``)
======================  ============  ============================================

Heartbeats are hash fields, role name to beat: :class:`Heartbeat` as JSON in
``<p>:{<p>}:hb:pool:<n>`` (pool workers), :class:`PolicyHeartbeat` in ``<p>:{<p>}:hb:policy``.

A pool has one stream per class priority (``pool:<n>`` for the most urgent, then
``pool:<n>:1``, ``pool:<n>:2``, ...), all carrying the same message.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal, Protocol

import msgspec

from broker.logs import printable
from broker.topology import RESERVED

VERSION = 1

Kind = Literal["chat", "completion", "embedding"]
Status = Literal["ok", "failed", "expired", "rejected", "cancelled"]

# Patterns end in \Z, not $: `$` also matches before a trailing newline.
JobId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@/+=-]+\Z")]
StreamName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+\Z")]
Timestamp = Annotated[float, msgspec.Meta(ge=0, le=1e11)]
"""Seconds since the epoch; the bounds also reject NaN and infinity."""
Model = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Tenant = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
MaxTokens = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
Count = Annotated[int, msgspec.Meta(ge=0)]


class ChatMessage(msgspec.Struct, frozen=True):
    """One turn of a chat conversation."""

    role: str
    content: str


class Job(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """An inference job as a producer submits it.

    Exactly one input matches ``kind``: ``messages`` for chat, ``prompt`` for completion,
    ``texts`` for embedding. Times are seconds since the Unix epoch. Unknown fields are
    refused (a misspelt ``max_token`` must not silently become the default): upgrade the
    broker before producers send fields a newer version added.
    """

    id: JobId
    """Stable id chosen by the producer; results are deduplicated by it."""
    model: Model
    kind: Kind = "chat"
    tenant: Tenant = "default"
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    texts: list[str] | None = None
    max_tokens: MaxTokens = 256
    """Maximum output tokens (ignored for embeddings)."""
    slo: str | None = None
    """SLO class hint (``interactive``, ``standard``, ``batch``, ...); rules decide if unset."""
    deadline: Timestamp | None = None
    """Absolute time after which the job must not start."""
    reply_to: StreamName = "results"
    """Name of the result stream (not the full key): results go to ``<p>:{<p>}:<reply_to>``."""
    created_at: Timestamp | None = None
    """Submission time; when absent the broker takes it from the stream entry id."""
    metadata: dict[str, str] = {}
    stream: bool = False
    """Append the output to the job's token stream ``<p>:{<p>}:tokens:<id>`` as it is generated
    (chat and completion); the result still arrives on the reply stream."""
    v: int = VERSION

    @classmethod
    def chat(cls, model: str, content: str, **fields: object) -> Job:
        """A chat job with one user message and a fresh id (``id=`` overrides it)."""
        fields.setdefault("id", new_id())
        return cls(model=model, kind="chat", messages=[ChatMessage("user", content)], **fields)  # type: ignore[arg-type]

    def input_chars(self) -> int:
        """Characters of input, whatever its kind."""
        if self.messages is not None:
            return sum(len(m.content) for m in self.messages)
        if self.prompt is not None:
            return len(self.prompt)
        return sum(len(t) for t in self.texts or ())

    def prompt_tokens(self) -> int:
        """Estimated prompt tokens (about four characters each) until a tokenizer reports."""
        return max(1, self.input_chars() // 4)


class TokenChunk(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One entry of a job's token stream: output text as it was generated, or the end of an attempt."""

    text: str = ""
    attempt: int = 1
    """The delivery that produced it: a retried job's stream starts again with the next attempt."""
    end: Status | None = None
    """Set on an attempt's last entry: ``ok``, or ``failed`` when the attempt failed (a retry may follow)."""
    v: int = VERSION


def new_id() -> str:
    """A fresh job id (random UUID, hex)."""
    return uuid.uuid4().hex


class Route(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The policy's decision, recorded on the routed job; results carry its class and reason."""

    pool: str
    slo: str
    reason: str
    routed_at: float
    ttft_target_ms: float
    tpot_target_ms: float | None = None
    e2e_target_ms: float | None = None
    predicted_ttft_ms: float | None = None
    policy: str = ""
    """Consumer name of the policy worker that decided."""


class RoutedJob(msgspec.Struct, frozen=True, kw_only=True):
    """A job on a pool stream: the job, as submitted, plus its route."""

    job: Job
    route: Route
    created_at: float
    """The job's submission time (from the job, else its ingress entry id)."""
    v: int = VERSION
    space: str = ""
    """The tenant whose key space holds the job's outcome (``""``: the default space): set by
    the policy worker from the ingress the job came on, never from the job (docs/security.md)."""


class Timing(msgspec.Struct, frozen=True, kw_only=True):
    """Timestamps of one job's life, seconds since the epoch. Monotonic in this order."""

    created_at: float
    routed_at: float
    dequeued_at: float
    started_at: float
    first_token_at: float
    finished_at: float
    attempt: int = 1


class Metrics(msgspec.Struct, frozen=True, kw_only=True):
    """Derived from :class:`Timing`; names follow vLLM's per-request metrics."""

    queue_time_ms: float
    """Submission to start of inference (routing and pool queueing)."""
    time_to_first_token_ms: float
    """Submission to first token."""
    time_per_output_token_ms: float | None
    """Mean gap between output tokens after the first (``None`` under two tokens)."""
    inference_time_ms: float
    """Start of inference to last token."""
    e2e_latency_ms: float
    """Submission to last token."""

    @classmethod
    def of(cls, t: Timing, output_tokens: int) -> Metrics:
        """Derive the metrics from a timing record."""
        tpot = (t.finished_at - t.first_token_at) * 1000 / (output_tokens - 1) if output_tokens > 1 else None
        return cls(
            queue_time_ms=(t.started_at - t.created_at) * 1000,
            time_to_first_token_ms=(t.first_token_at - t.created_at) * 1000,
            time_per_output_token_ms=tpot,
            inference_time_ms=(t.finished_at - t.started_at) * 1000,
            e2e_latency_ms=(t.finished_at - t.created_at) * 1000,
        )


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Token counts, as the backend reported them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


class JobIdentity(Protocol):
    """What a result copies from its job: a :class:`Job`, or the parts of a rejected one."""

    @property
    def id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def kind(self) -> Kind: ...
    @property
    def tenant(self) -> str: ...


class Result(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The one outcome a job's producer sees, on the job's reply stream."""

    id: str
    status: Status
    model: str
    kind: Kind
    tenant: str
    slo: str | None = None
    pool: str | None = None
    worker: str | None = None
    output: str | None = None
    embeddings: list[list[float]] | None = None
    usage: Usage = Usage()
    timing: Timing | None = None
    metrics: Metrics | None = None
    slo_met: bool | None = None
    route_reason: str | None = None
    error: str | None = None
    v: int = VERSION
    retry_after_s: float | None = None
    """``rejected`` by admission (``slo_unattainable: ...``): seconds after which the pools are
    predicted to have drained (or their load fallen) enough for the job to be served in time."""

    @classmethod
    def for_job(cls, job: JobIdentity, status: Status, **fields: Any) -> Result:
        """The result of ``job``: its identity (id, model, kind, tenant) copied, ``status`` and
        ``fields`` set. Every result is built here, so none can name another job's model or tenant."""
        return cls(id=job.id, model=job.model, kind=job.kind, tenant=job.tenant, status=status, **fields)


DeadReason = Literal[
    "decode_error", "invalid_job", "too_large", "unknown_model", "backend_error", "max_deliveries", "trimmed",
    "internal_error", "wrong_shard", "forged_tenant",
]


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A message no consumer could process, kept with the reason for inspection and replay."""

    reason: DeadReason
    error: str
    stream: str
    """Full key of the stream the entry came from."""
    entry_id: str
    payload: bytes
    """The entry's original bytes (base64 in JSON)."""
    job_id: str | None = None
    delivery_count: int = 1
    consumer: str = ""
    failed_at: float = 0.0
    v: int = VERSION
    truncated: int = 0
    """Bytes cut from the end of ``payload`` to keep the letter small (0: it is whole). A cut
    letter still says why and which job, but cannot be replayed."""

    def clipped(self, limit: int) -> DeadLetter:
        """This letter with at most ``limit`` bytes of payload (``dead_payload_bytes``)."""
        if len(self.payload) <= limit:
            return self
        return msgspec.structs.replace(self, payload=self.payload[:limit],
                                       truncated=self.truncated + len(self.payload) - limit)


class Beat(msgspec.Struct, frozen=True, kw_only=True):
    """What every role's heartbeat has: :class:`Heartbeat` (pool workers) and :class:`PolicyHeartbeat`."""

    ts: Timestamp
    """When the role sent it. A beat older than 5 x ``heartbeat_s`` does not count; one older
    than ``heartbeat_expiry_s`` is deleted (its role died without removing it)."""
    v: int = VERSION


class ObservedJob(msgspec.Struct, frozen=True, kw_only=True):
    """The service timings of one job a pool worker finished (queueing excluded): what the
    policy learns its latency estimates from."""

    model: str
    prompt_tokens: int
    output_tokens: int
    concurrency: int
    """Jobs in flight on the worker when this one started (this one included)."""
    ttft_ms: float
    """Start of inference to first token."""
    tpot_ms: float | None
    """Mean time per output token after the first (``null`` under two tokens)."""
    at: float
    """When it finished."""


class Heartbeat(Beat, frozen=True, kw_only=True):
    """A pool worker's heartbeat, every ``heartbeat_s``: its load, and what it learnt since the last."""

    in_flight: Count
    """Jobs it has taken and not yet finished."""
    capacity: Count
    """Jobs it runs at once (its concurrency)."""
    seq: int = 0
    """Numbers the worker's beats from 1: the policy learns each beat's ``obs`` once (0: nothing to learn)."""
    obs: list[ObservedJob] = []
    """Jobs finished since the previous beat (the freshest 256 at most)."""
    cooling_until: Timestamp | None = None
    """Set while every endpoint of its backend refused work (rate limits): when the first takes work again."""


class PolicyHeartbeat(Beat, frozen=True, kw_only=True):
    """A policy worker's heartbeat, every ``heartbeat_s``: written right after a refresh of its pool view."""

    routed: Count = 0
    """Jobs it routed since it started."""
    dead: Count = 0
    """Ingress entries it dead-lettered since it started."""


DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)
"""Everything decoding untrusted bytes can raise (msgpack reports bad UTF-8 as UnicodeDecodeError)."""

# One encoder/decoder per type, built once: the hot paths reuse them.
json_encode = msgspec.json.Encoder().encode
_job_json = msgspec.json.Decoder(Job)
_job_msgpack = msgspec.msgpack.Decoder(Job)
decode_routed = msgspec.json.Decoder(RoutedJob).decode
decode_result = msgspec.json.Decoder(Result).decode
decode_dead = msgspec.json.Decoder(DeadLetter).decode
decode_heartbeat = msgspec.json.Decoder(Heartbeat).decode
decode_policy_heartbeat = msgspec.json.Decoder(PolicyHeartbeat).decode


class InvalidJob(ValueError):
    """A job that cannot be accepted; ``reason`` is the dead-letter reason."""

    def __init__(self, reason: DeadReason, message: str) -> None:
        super().__init__(message)
        self.reason: DeadReason = reason


_INPUTS = ("messages", "prompt", "texts")
_INPUT_OF = {"chat": "messages", "completion": "prompt", "embedding": "texts"}
"""The one input field each kind of job has."""
_SET_OF = {kind: tuple(name == field for name in _INPUTS) for kind, field in _INPUT_OF.items()}
"""The same as which of ``_INPUTS`` are set: one tuple comparison per job."""


def _check_input(job: Job) -> None:
    given = (job.messages is not None, job.prompt is not None, job.texts is not None)
    if given != _SET_OF[job.kind]:
        names = [f"`$.{name}`" for name, on in zip(_INPUTS, given, strict=True) if on]
        raise InvalidJob("invalid_job", f"a {job.kind} job needs exactly `$.{_INPUT_OF[job.kind]}`; "
                                        f"found {', '.join(names) or 'none'}")
    if job.kind == "chat" and not job.messages:
        raise InvalidJob("invalid_job", "`$.messages` is empty")
    if job.kind == "embedding" and not job.texts:
        raise InvalidJob("invalid_job", "`$.texts` is empty")
    if job.reply_to in RESERVED:
        raise InvalidJob("invalid_job", f"`$.reply_to` {job.reply_to!r} is a reserved stream name")


def _undecodable(what: str) -> InvalidJob:
    """The ``decode_error`` of a body that is not a job at all: ``what`` it is, and what was expected."""
    return InvalidJob("decode_error", f"not a job: {what}; expected a UTF-8 JSON object or a msgpack map")


def decode_job(data: bytes) -> Job:
    """Decode and validate a job from JSON or msgpack bytes.

    Bytes that cannot be decoded at all (not JSON or msgpack, malformed, not UTF-8, nested
    too deeply) raise :class:`InvalidJob` ``decode_error``; a document that decodes but
    breaks the schema raises ``invalid_job``, naming the path of the first problem.
    Messages hold no raw job data (:func:`broker.logs.printable`).
    """
    first = data.lstrip()[:1]
    typed: Callable[[bytes], Job]
    untyped: Callable[[bytes], object]
    if first == b"{":
        typed, untyped, fmt = _job_json.decode, msgspec.json.decode, "JSON"
    elif first and (0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF)):
        typed, untyped, fmt = _job_msgpack.decode, msgspec.msgpack.decode, "msgpack"
    else:
        raise _undecodable(f"it starts with byte 0x{first[0]:02x}" if first else "the body is empty")
    try:
        job = typed(data)
    except msgspec.ValidationError as exc:
        # msgspec validates as it decodes: a schema error can come before the bytes that
        # would not decode at all (bad UTF-8, trailing junk). Those are decode errors.
        try:
            untyped(data)
        except DECODE_ERRORS as junk:
            raise _not_decoded(data, fmt, junk) from None
        raise InvalidJob("invalid_job", printable(str(exc))) from None
    except DECODE_ERRORS as exc:
        raise _not_decoded(data, fmt, exc) from None
    _check_input(job)
    return job


def _not_decoded(data: bytes, fmt: str, exc: Exception) -> InvalidJob:
    if data[:1] == b"\x80" and data[1:2] and 2 <= data[1] <= 5:  # pickle's PROTO opcode; 0x80 is an empty map
        return _undecodable(f"what looks like a Python pickle (protocol {data[1]}), which is never read")
    if isinstance(exc, RecursionError):
        return _undecodable(f"{fmt} nested too deeply")
    return _undecodable(f"malformed {fmt} ({printable(str(exc))})")


def encode_job(job: Job) -> bytes:
    """Encode a job as JSON (what the SDK puts on the ingress stream)."""
    _check_input(job)
    return json_encode(job)
