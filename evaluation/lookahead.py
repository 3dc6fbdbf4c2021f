"""The oracle's truth: what would really happen to one job on one pool, from a copy run forward.

For the job being decided and a candidate pool, :func:`look_ahead` copies the pool (workers,
running jobs, queue), adds the job and runs the copy with no further arrivals and no failures
to come: the job's real queue wait, TTFT and time per output token there, on the pool's true
devices, as far as they do not depend on jobs not yet arrived. The simulator hands it to
:class:`~evaluation.baselines.OracleRouter` through its ``truth`` hook.
"""

from __future__ import annotations

import math

from evaluation.baselines import OracleTruth
from evaluation.options import SimOptions
from evaluation.pools import SimJob, SimPool


def look_ahead(pool: SimPool, job: SimJob, now: float, ttft_ms: float, options: SimOptions) -> OracleTruth:
    """Run a copy of ``pool`` with ``job`` (its model set, ``own``) pushed at ``now``.

    The copy waits for the job to start up to ``options.oracle_horizon`` times its class's TTFT
    target ``ttft_ms``, follows its decoding for ``options.oracle_decode_s`` (at least one chunk,
    or to its end) and runs at most ``options.oracle_events`` events; a job not started by then
    waits at least that long (a lower bound), and forever on a pool with no live worker.
    """
    tokens = 0 if job.job.kind == "embedding" else max(1, job.job.max_tokens)
    fork = pool.clone()
    done = False

    def finished(j: SimJob, _at: float, _tokens: int) -> None:
        nonlocal done
        done = done or j is job

    fork.on_finish = finished
    fork.push(job)
    fork.dispatch(now)
    start_by = now + options.oracle_horizon * ttft_ms / 1000
    seen, steps = now, 0
    while not done and fork.events and steps < options.oracle_events:
        t = fork.events[0][0]
        if job.worker is None and t > start_by:
            break
        if job.first is not None and job.last > job.first and t > job.first + options.oracle_decode_s:
            break  # seen at least one decode chunk, and long enough
        seen = fork.step()
        steps += 1
    if job.worker is None:  # not started within the look-ahead: it waits at least this long
        if not fork.live:
            return OracleTruth(output_tokens=tokens, queue_wait_ms=math.inf)
        waited = start_by if steps < options.oracle_events else seen
        return OracleTruth(output_tokens=tokens, queue_wait_ms=(waited - now) * 1000)
    decoded = max(0, tokens - 1) - job.remaining if job.first is not None else 0
    tpot = (job.last - job.first) * 1000 / decoded if job.first is not None and decoded > 0 else None
    return OracleTruth(output_tokens=tokens, ttft_ms=(job.first_due - job.start) * 1000, tpot_ms=tpot,
                       queue_wait_ms=(job.start - now) * 1000)
