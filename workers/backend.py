"""The backend Protocol: what a pool worker needs from whatever runs the model.

A backend gets a job and returns its output with the instants of the first and last
token, measured on the clock it was given. Backends raise :class:`BackendError` for
failures the worker should report; ``retryable`` tells transient ones (429, 5xx, a
dropped connection) from permanent ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec

from broker.wire import Job


class BackendError(Exception):
    """A job failed in the backend.

    ``retryable`` marks transient failures (429, 5xx, ...); ``retry_at`` (seconds since the
    epoch) is the earliest instant a retry can succeed, where the backend knows it;
    ``expired`` marks a job cut off at its deadline, which ends as ``expired``, not failed.
    """

    def __init__(self, message: str, *, retryable: bool = False, retry_at: float = 0.0,
                 expired: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_at = retry_at
        self.expired = expired


class CapacityExceeded(BackendError):
    """The device refused the job because it is at its concurrency cap (an HTTP 429)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


TokenSink = Callable[[str], None]
"""Takes output text as a backend generates it (streamed jobs); must not block."""


class InferenceOutput(msgspec.Struct, frozen=True, kw_only=True):
    """What a backend produced for one job."""

    first_token_at: float
    finished_at: float
    prompt_tokens: int
    completion_tokens: int
    output: str | None = None
    embeddings: list[list[float]] | None = None


class Backend(Protocol):
    """Runs jobs for one pool worker. One instance serves all of the worker's concurrent jobs."""

    name: str
    """Short description for results and logs, e.g. ``simulated:h100``."""

    async def run(self, job: Job, on_token: TokenSink | None = None) -> InferenceOutput:
        """Run ``job`` to completion; pass output text to ``on_token`` as it is generated."""
        ...

    async def aclose(self) -> None:
        """Release connections, models and other resources."""
        ...
