"""The endpoints of an HTTP pool: API keys, round-robin choice and per-endpoint cooldown.

An endpoint that answers 429, a 5xx, or not at all is *cooled down*: no request goes to it
until its cooldown ends, so a struggling server is not hammered while others can take the
work. The cooldown is the server's ``Retry-After`` when it sends one, else an exponential
backoff on consecutive failures, capped. A success ends the streak.

API keys are read once, when the backend is built, from the environment variable or file
that the configuration names; they live in :class:`Secret`, whose ``repr`` hides them.
"""

from __future__ import annotations

import email.utils
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from policies.config import Endpoint

log = logging.getLogger("inference_broker.endpoints")
MAX_RETRY_AFTER_S = 3600.0
"""Longest ``Retry-After`` honoured: a misbehaving server must not park an endpoint for days."""


class EndpointConfigError(ValueError):
    """An endpoint cannot be used as configured (its key's variable is unset, its file unreadable)."""


class Secret:
    """A string that never shows itself in ``repr``/``str``, so a log line cannot leak it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself: for the Authorization header only."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def load_key(ep: Endpoint, environ: Mapping[str, str] = os.environ) -> Secret | None:
    """The endpoint's API key from its variable or file; ``None`` when it needs none."""
    where = f"endpoint {display_url(ep.base_url)}"
    if ep.api_key_env is not None:
        value = environ.get(ep.api_key_env, "").strip()
        if not value:
            raise EndpointConfigError(f"{where}: environment variable {ep.api_key_env} is unset or empty")
        return Secret(value)
    if ep.api_key_file is not None:
        try:
            value = Path(ep.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise EndpointConfigError(f"{where}: cannot read api_key_file {ep.api_key_file} ({reason})") from None
        if not value:
            raise EndpointConfigError(f"{where}: api_key_file {ep.api_key_file} is empty")
        return Secret(value)
    return None


def display_url(url: str) -> str:
    """``url`` without credentials, query or fragment: safe for logs and errors."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def retry_after_s(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds from a ``retry-after-ms`` or ``Retry-After`` header (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return min(MAX_RETRY_AFTER_S, max(0.0, float(ms) / 1000))
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError):
            return None
    if seconds != seconds:  # NaN
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


class EndpointState:
    """One endpoint, its key and its cooldown."""

    def __init__(self, config: Endpoint, key: Secret | None, label: str) -> None:
        self.config = config
        self.key = key
        self.label = label
        """The base URL without credentials (numbered when two endpoints share one)."""
        self.url = config.base_url.rstrip("/")
        self.failures = 0
        """Consecutive failures: the exponent of the backoff."""
        self.cooling_until = 0.0

    def __repr__(self) -> str:
        return f"EndpointState({self.label!r}, failures={self.failures}, cooling_until={self.cooling_until:.3f})"


class Endpoints:
    """Round-robin over a pool's endpoints, skipping those in cooldown."""

    def __init__(self, configs: Iterable[Endpoint], *, clock: Callable[[], float],
                 base_cooldown_s: float = 1.0, max_cooldown_s: float = 30.0,
                 environ: Mapping[str, str] = os.environ) -> None:
        self.clock = clock
        self.base_cooldown_s = base_cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.states: list[EndpointState] = []
        for ep in configs:
            label = display_url(ep.base_url)
            if any(s.label == label for s in self.states):
                label = f"{label}#{len(self.states)}"
            self.states.append(EndpointState(ep, load_key(ep, environ), label))
        if not self.states:
            raise EndpointConfigError("an HTTP pool needs at least one endpoint")
        self._turn = itertools.count()

    def __repr__(self) -> str:
        return f"Endpoints({self.states!r})"

    def serving(self, model: str) -> list[EndpointState]:
        """The endpoints that serve ``model``, cooling or not."""
        return [s for s in self.states if s.config.serves(model)]

    def pick(self, model: str) -> EndpointState | None:
        """The next endpoint for ``model`` not in cooldown, or ``None`` while all of them are."""
        candidates = self.serving(model)
        if not candidates:
            return None
        now = self.clock()
        start = next(self._turn)
        for i in range(len(candidates)):
            state = candidates[(start + i) % len(candidates)]
            if state.cooling_until <= now:
                return state
        return None

    def succeeded(self, state: EndpointState) -> None:
        state.failures = 0

    def failed(self, state: EndpointState, reason: str, retry_after: float | None = None) -> float:
        """Cool ``state`` down after a transient failure; returns the cooldown in seconds."""
        state.failures += 1
        if retry_after is not None:
            cooldown = retry_after
        else:
            cooldown = min(self.max_cooldown_s, self.base_cooldown_s * 2 ** (state.failures - 1))
        state.cooling_until = max(state.cooling_until, self.clock() + cooldown)
        log.warning("endpoint %s cooling down for %.1f s after %s (%d in a row)", state.label, cooldown, reason,
                    state.failures)
        return cooldown

    def cooling(self) -> dict[str, float]:
        """Endpoints in cooldown now: label -> the time (``clock``) their cooldown ends."""
        now = self.clock()
        return {s.label: s.cooling_until for s in self.states if s.cooling_until > now}

    def cooldown_until(self, model: str | None = None) -> float | None:
        """When the first endpoint (of those serving ``model``, if given) is usable again, if
        *all* of them are cooling now; ``None`` while any can take a request."""
        states = self.serving(model) if model is not None else self.states
        now = self.clock()
        if not states or any(s.cooling_until <= now for s in states):
            return None
        return min(s.cooling_until for s in states)
