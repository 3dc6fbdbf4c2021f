"""Taking over work that other consumers left behind.

Redis reclaims nothing on its own: entries delivered to a consumer that died stay pending
under its name for good. Every consumer therefore runs a :class:`Claimer`: every
``claim_interval`` it takes over, in bulk, entries that have sat pending longer than
``claim_idle_ms`` (one CLAIM script per pass, see :mod:`broker.scripts`). Live workers
renew their leases well inside that idle time, so only abandoned entries (a dead or
stalled consumer, or a job given back for a retry) qualify. Delivery counts are Redis'
own, so a job that keeps killing its worker is counted even though no process survives
to count it.

A worker can refuse *suspects*: jobs delivered at least twice whose runs left no error,
i.e. whose workers died under them, or whose last run killed the sandbox it ran in. It
takes only as many as it has sandboxes free and runs each in a process of its own
(:mod:`workers.sandbox`), so a job that crashes its process takes no innocent neighbour's
delivery with it, and a pool full of innocent suspects after a burst of crashes keeps
serving everything else. The rest are left for a worker with a sandbox free.

Entries trimmed while pending come back as deleted ids (Redis 7.0+); they are reported so
the caller can dead-letter them instead of losing them silently.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from broker import calls
from broker.scripts import Scripts
from broker.streams import Entry

CRASHED = "crashed: "
"""How the error of a run that killed its sandbox begins: the job stays a suspect, so its
next delivery runs in a sandbox again, never among other jobs."""


class Claimed(msgspec.Struct, frozen=True):
    """What one claim pass took over."""

    entries: list[tuple[Entry, int]]
    """Entries to run, with their delivery counts (this delivery included)."""
    suspects: list[tuple[Entry, int]]
    """Suspects taken to run in a sandbox (no more than asked for)."""
    deleted: list[bytes]
    """Ids that were pending but whose entries no longer exist (trimmed or deleted)."""
    waiting: int = 0
    """Suspects seen but left for a consumer with a sandbox free."""


def _entry(raw: list[object]) -> Entry:
    entry_id, flat = raw
    it = iter(flat)  # type: ignore[call-overload]
    return entry_id, dict(zip(it, it, strict=True))  # type: ignore[return-value]


class Claimer:
    """Claims idle entries of ``stream`` for ``consumer`` in group ``group``.

    ``error_prefix + entry_id`` names the key where a failed run recorded its error; with
    it, redelivered entries without one, or with one that starts with :data:`CRASHED`, are
    suspects. Without it there are no suspects.
    """

    def __init__(self, scripts: Scripts, stream: str, group: str, consumer: str, *, idle_ms: int,
                 interval_s: float, error_prefix: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.scripts = scripts
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.idle_ms = idle_ms
        self.interval_s = interval_s
        self.error_prefix = error_prefix
        self.clock = clock
        self.cursor: bytes = b"0-0"
        self.next_at = 0.0
        self.claimed = 0

    def due(self) -> bool:
        """Whether a claim pass is due (one full scan of the pending list per interval)."""
        return self.clock() >= self.next_at

    async def claim(self, count: int, suspects: int = 0) -> Claimed:
        """Take over up to ``count`` idle entries, and up to ``suspects`` suspects to run in sandboxes."""
        reply = await self.scripts.call(calls.claim(
            self.stream, self.group, self.consumer, idle_ms=self.idle_ms, cursor=self.cursor, count=count,
            suspects=suspects, error_prefix=self.error_prefix, crash_mark=CRASHED))
        cursor, entries, isolated, deleted, counts, isolated_counts, waiting = reply
        self.cursor = cursor
        if cursor in (b"0-0", "0-0") or not (entries or isolated):
            self.cursor = b"0-0"
            self.next_at = self.clock() + self.interval_s
        taken = [(_entry(e), n) for e, n in zip(entries, counts, strict=True)]
        alone = [(_entry(e), n) for e, n in zip(isolated, isolated_counts, strict=True)]
        self.claimed += len(taken) + len(alone)
        return Claimed(taken, alone, list(deleted), int(waiting))
