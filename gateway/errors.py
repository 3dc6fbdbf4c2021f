"""The gateway's one error: a request answered in OpenAI's error format.

Every failure a client can see is an :class:`ApiError` with its HTTP status and OpenAI's
body, ``{"error": {"message", "type", "param", "code"}}``, so the official SDKs raise their
usual exceptions (``BadRequestError``, ``AuthenticationError``, ``RateLimitError``, ...).
"""

from __future__ import annotations

from broker.wire import Result


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
