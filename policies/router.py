"""The router interface: every routing policy, live or simulated, behind one Protocol.

A router is pure: it decides from (job, class, snapshot of the pools, random generator)
and learns from observations of finished jobs that the caller feeds it. The policy worker
and the simulator hold a router each and drive it the same way, on a real or a virtual
clock (``snapshot.now``).
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from policies.config import PolicyConfig
from policies.route import Decision, JobFeatures, Snapshot, route


class RandomSource(Protocol):
    """What routers need of a random generator; ``random.Random`` satisfies it.

    A Protocol rather than ``random.Random`` itself, so ``policies`` never imports the
    ``random`` module (whose module-level functions are global state).
    """

    def random(self) -> float:
        """A float in [0, 1)."""
        ...


class Observation(msgspec.Struct, frozen=True, kw_only=True):
    """What one finished job tells a router about its pool (service side, queueing excluded)."""

    pool: str
    model: str
    prompt_tokens: int
    output_tokens: int
    concurrency: int
    """Jobs in flight on the worker when this one started (this one included)."""
    ttft_ms: float
    """Start of inference to first token."""
    tpot_ms: float | None
    """Mean time per output token after the first."""
    at: float
    """When it finished (snapshot clock)."""


class Router(Protocol):
    """A routing policy.

    A router whose class sets ``reusable = True`` decides from its arguments and what it
    learned alone (no randomness, no per-call state): the policy worker then reuses its
    decision for identical jobs until the snapshot or what it learned changes.
    """

    name: str

    def decide(self, job: JobFeatures, slo: str, snapshot: Snapshot, rng: RandomSource) -> Decision:
        """Choose a pool for ``job`` of class ``slo`` (deterministic for a given rng state)."""
        ...

    def observe(self, obs: Observation) -> None:
        """Learn from a finished job."""
        ...


class StaticRouter:
    """The first policy: class preferences plus backlog (``policies.route.route``)."""

    name = "static"
    reusable = True

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    def decide(self, job: JobFeatures, slo: str, snapshot: Snapshot, rng: RandomSource) -> Decision:
        return route(job, slo, self.config, snapshot)

    def observe(self, obs: Observation) -> None:
        return None
