"""The Batch API's file formats: input lines in, output and error lines out (pure, no I/O).

An input file is JSONL, one request per line, as OpenAI documents it::

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

:func:`parse` checks every line the way the online API checks a request (the body goes
through :func:`gateway.openai.to_job`), so a file is refused at upload, naming the line,
rather than failing line by line hours later. Output and error files hold one
:class:`OutputLine` per request, ``custom_id`` kept, in input order.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from broker.wire import DECODE_ERRORS, Job
from gateway.openai import ApiError, Endpoint, Tiers, to_job

URLS: dict[str, Endpoint] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
}
"""The endpoints a batch line may call, and the kind of job each becomes."""

CustomId = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class InputLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One request of an input file."""

    custom_id: CustomId
    method: str
    url: str
    body: msgspec.Raw


class InvalidFile(ValueError):
    """An input file that cannot run: the message names the line (1-based) and the problem."""


_decode_line = msgspec.json.Decoder(InputLine).decode


def parse(data: bytes, *, max_lines: int, tiers: Tiers) -> list[InputLine]:
    """The requests of an input file, each checked as the online API would check it.

    Raises :class:`InvalidFile` at the first bad line: not JSON, a field missing, a
    ``custom_id`` seen before, a method other than POST, an unknown url, a body its
    endpoint refuses. Blank lines are skipped; a file with no request is refused.
    """
    lines: list[InputLine] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        if len(lines) == max_lines:
            raise InvalidFile(f"the file has more than {max_lines} requests; split it into several batches")
        try:
            line = _decode_line(raw)
        except DECODE_ERRORS as exc:
            raise InvalidFile(f"line {number}: not a batch request ({exc})") from None
        if line.custom_id in seen:
            raise InvalidFile(f"line {number}: custom_id {line.custom_id!r} is used twice; each must be unique")
        if line.method != "POST":
            raise InvalidFile(f"line {number}: method {line.method!r} is not supported; use POST")
        if line.url not in URLS:
            raise InvalidFile(f"line {number}: url {line.url!r} is not supported; use one of {', '.join(URLS)}")
        try:
            to_job(URLS[line.url], bytes(line.body), job_id="check", tenant="check", tiers=tiers, deadline=None)
        except ApiError as exc:
            raise InvalidFile(f"line {number}: {exc.message}") from None
        seen.add(line.custom_id)
        lines.append(line)
    if not lines:
        raise InvalidFile("the file holds no request; write one JSON request per line")
    return lines


def line_job(line: InputLine, *, job_id: str, tenant: str, tiers: Tiers, deadline: float, reply_to: str) -> Job:
    """The job of a checked line: the batch class, results on the stream the gateways follow (``reply_to``)."""
    job = to_job(URLS[line.url], bytes(line.body), job_id=job_id, tenant=tenant, tiers=tiers, deadline=deadline)
    return msgspec.structs.replace(job, slo="batch", stream=False, reply_to=reply_to)


# ---------------------------------------------------------------- ids: a job per line, a line per job


def job_id(batch_id: str, index: int, attempt: int = 0) -> str:
    """The job id of line ``index`` of a batch, ``<batch id>.<index>`` (``.<attempt>`` after a refusal):
    a resubmission of the line runs nothing twice."""
    return f"{batch_id}.{index}" + (f".{attempt}" if attempt else "")


def request_line_id(job: str) -> str:
    """The ``id`` of a line in the output files: ``batch_req_<batch hex>.<line index>``."""
    return "batch_req_" + job.removeprefix("batch_")


def line_index(job: Job) -> int:
    """The line of a batch job."""
    return int(job.id.split(".")[1])


def parse_job_id(value: str) -> tuple[str, int, int] | None:
    """The batch id, line index and attempt of a batch job's id; ``None`` for any other id."""
    batch_id, *numbers = value.split(".")
    if not batch_id.startswith("batch_") or len(numbers) not in (1, 2) or not all(n.isdigit() for n in numbers):
        return None
    return batch_id, int(numbers[0]), int(numbers[1]) if len(numbers) == 2 else 0


class Response(msgspec.Struct, frozen=True, kw_only=True):
    """What the online API would have answered."""

    status_code: int
    request_id: str
    body: dict[str, object]


class LineError(msgspec.Struct, frozen=True, kw_only=True):
    """Why a request has no response (it never ran: the batch was cancelled or expired first)."""

    code: Literal["batch_cancelled", "batch_expired"]
    message: str


class OutputLine(msgspec.Struct, frozen=True, kw_only=True):
    """One line of an output or error file, as OpenAI writes them."""

    id: str
    custom_id: str
    response: Response | None
    error: LineError | None

    @classmethod
    def answer(cls, line: InputLine, request_id: str, status: int, body: dict[str, object]) -> OutputLine:
        """The line of a request that the online API would have answered with ``status`` and ``body``."""
        return cls(id=request_line_id(request_id), custom_id=line.custom_id,
                   response=Response(status_code=status, request_id=request_id, body=body), error=None)

    @classmethod
    def unrun(cls, line: InputLine, request_id: str, ending: Literal["cancelled", "expired"]) -> OutputLine:
        """The line of a request that never ran: its batch was cancelled or expired first."""
        error = LineError(code="batch_expired" if ending == "expired" else "batch_cancelled",
                          message=f"the batch was {ending} before this request started")
        return cls(id=request_line_id(request_id), custom_id=line.custom_id, response=None, error=error)
