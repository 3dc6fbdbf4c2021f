"""Log output of every command: plain text or one JSON object per line, with no credentials.

``inference-broker --log-format json`` (or ``IB_LOG_FORMAT=json``) writes lines like::

    {"ts": "2026-11-02T10:15:03.412Z", "level": "WARNING", "logger": "inference_broker.worker",
     "msg": "dead letter 1762078503411-0 (backend_error): ...", "job_id": "j-42",
     "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7"}

A line about a job carries ``job_id``, and the job's W3C trace context when its producer
put one in ``metadata["traceparent"]``: code that logs about a job passes
``extra=job_context(job)``. Exceptions add ``exc`` (the formatted traceback).

**No credentials.** Every line, text or JSON, and every traceback goes through
:func:`scrub`, which masks the password of any URL (``redis://:secret@host`` becomes
``redis://:***@host``), ``password=`` query values and ``AUTH`` arguments. Code should
still log :func:`broker.connection.redacted` URLs; this is the net under it.

**No raw job data.** Messages and their arguments carry what producers sent (field names,
models, error text quoting them). Every line, text or JSON, goes through :func:`printable`,
which escapes control and other non-printable characters the way ``repr`` does (a newline
becomes ``\\n``, ESC ``\\x1b``): a record is one line, and no job can forge a record of its
own or send the operator's terminal an escape sequence. A traceback keeps its lines; in
text, each is indented, so only a record starts at the beginning of a line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, Literal, Protocol

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:@/\s]*):(?P<secret>[^@/\s]+)@")
_QUERY_PASSWORD = re.compile(r"(?P<head>\b(?:ssl_)?password=)[^&\s'\"]+", re.IGNORECASE)
# AUTH [user] password, as redis-py quotes a failed command; over-masking a word is fine.
_AUTH = re.compile(r"(?P<head>\bAUTH\s+)[^\s)'\"]+(?:\s+[^\s)'\"]+)?", re.IGNORECASE)
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")


def printable(text: str) -> str:
    """``text`` with every non-printable character (C0 and C1 controls, line and paragraph
    separators, ...) written as ``repr`` writes it: ``\\n``, ``\\r``, ``\\x1b``, ``\\u2028``."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _printable_lines(text: str) -> list[str]:
    """A multi-line text (a traceback) as lines, each :func:`printable`."""
    return [printable(line) for line in text.split("\n")]


def scrub(text: str) -> str:
    """``text`` with URL passwords, ``password=`` values and ``AUTH`` arguments masked."""
    if "@" in text:
        text = _URL_PASSWORD.sub(r"\g<head>:***@", text)
    if "=" in text:
        text = _QUERY_PASSWORD.sub(r"\g<head>***", text)
    if "auth" in text.lower():
        text = _AUTH.sub(r"\g<head>***", text)
    return text


class _HasJob(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def metadata(self) -> dict[str, str]: ...


def job_context(job: _HasJob | None, job_id: str | None = None) -> dict[str, Any]:
    """``extra=`` for a log call about ``job`` (or only its id): the job id and its trace context."""
    if job is None:
        return {"job_id": job_id} if job_id else {}
    trace = job.metadata.get("traceparent")
    return {"job_id": job.id, "trace": trace} if trace else {"job_id": job.id}


def _trace_ids(record: logging.LogRecord) -> tuple[str, str] | None:
    trace = getattr(record, "trace", None)
    if not isinstance(trace, str):
        return None
    found = _TRACEPARENT.match(trace.strip().lower())
    return (found.group(1), found.group(2)) if found else None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg; job_id, trace_id, span_id, exc when known."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {"ts": f"{ts}.{int(record.msecs):03d}Z", "level": record.levelname,
                               "logger": record.name, "msg": scrub(printable(record.getMessage()))}
        job_id = getattr(record, "job_id", None)
        if job_id:
            out["job_id"] = printable(str(job_id))
        ids = _trace_ids(record)
        if ids is not None:
            out["trace_id"], out["span_id"] = ids
        if record.exc_info:
            out["exc"] = scrub("\n".join(_printable_lines(self.formatException(record.exc_info))))
        if record.stack_info:
            out["stack"] = scrub("\n".join(_printable_lines(self.formatStack(record.stack_info))))
        # json.dumps escapes C0 controls but not C1 ones (CSI is \x9b) with ensure_ascii off:
        # printable above took care of both.
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic ``time LEVEL logger: message`` line, scrubbed, with the trace id when a job has one.

    A traceback or stack follows on lines of its own, indented by four spaces.
    """

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.message = printable(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        lines = [self.formatMessage(record)]
        ids = _trace_ids(record)
        if ids is not None:
            lines[0] += f" trace_id={ids[0]}"
        if record.exc_info:
            lines += ("    " + line for line in _printable_lines(self.formatException(record.exc_info)))
        if record.stack_info:
            lines += ("    " + line for line in _printable_lines(self.formatStack(record.stack_info)))
        return scrub("\n".join(lines))


def setup(level: str = "INFO", fmt: LogFormat = "text") -> None:
    """Send the process's logs to stderr at ``level`` as ``fmt`` (a no-op if logging is set up)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
