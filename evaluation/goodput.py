"""The goodput search: the highest arrival rate at which a class still meets its attainment
target, found by simulating a workload at rising multiples of its rate (grid, then bisection).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import msgspec

from evaluation.metrics import attainment
from evaluation.options import DEFAULT_OPTIONS, SimOptions
from evaluation.simulator import simulate
from evaluation.workloads import Workload
from policies.config import PolicyConfig
from policies.router import Router


class GoodputPoint(msgspec.Struct, frozen=True):
    multiplier: float
    rate: float
    attainment: float


class Goodput(msgspec.Struct, frozen=True, kw_only=True):
    """The highest arrival rate at which ``cls`` still met its attainment target."""

    cls: str
    target: float
    rate: float
    """Jobs/s; 0 when even the lowest rate tried missed the target."""
    multiplier: float
    """Of the workload's base rate."""
    capped: bool
    """The highest rate tried still met the target: the goodput is at least ``rate``."""
    points: list[GoodputPoint]
    """Every run, by multiplier."""


MULTIPLIERS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)


def goodput(config: PolicyConfig, router: Callable[[], Router], workload: Workload, fleet: Mapping[str, int],
            seed: int, duration: float, *, cls: str = "interactive", multipliers: Sequence[float] = MULTIPLIERS,
            refine: int = 3, floor: float | None = None, options: SimOptions = DEFAULT_OPTIONS) -> Goodput:
    """Goodput by grid then bisection over rate multipliers of ``workload.rate``.

    The grid climbs until the first multiplier that misses the target; ``refine`` bisection
    steps then narrow the gap between the last pass and that miss. With ``floor``, the grid
    goes on past the miss while attainment stays at or above ``floor`` (points for a curve;
    the goodput is still set by the first miss). ``router`` makes a fresh router per run
    (they learn). The same seed at every rate: common random numbers.
    """
    target = config.classes[cls].attainment
    points: list[GoodputPoint] = []

    def run(m: float) -> float:
        result = simulate(config, router(), workload.scaled(m), fleet, seed, duration, options=options)
        got = attainment(result, cls)
        points.append(GoodputPoint(m, workload.rate * m, got))
        return got

    good, bad = 0.0, None
    grid = iter(sorted(multipliers))
    for m in grid:
        if run(m) < target:
            bad = m
            break
        good = m
    if bad is not None and floor is not None and points[-1].attainment >= floor:
        for m in grid:
            if run(m) < floor:
                break
    if bad is not None and good > 0:
        for _ in range(refine):
            mid = (good + bad) / 2
            good, bad = (mid, bad) if run(mid) >= target else (good, mid)
    points.sort(key=lambda p: p.multiplier)
    return Goodput(cls=cls, target=target, rate=workload.rate * good, multiplier=good, capped=bad is None,
                   points=points)
