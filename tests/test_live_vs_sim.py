"""Issue 4, outcome 3: the live stack lands within a few points of the simulator's attainment.

One short workload (chat, 15 s of arrivals at 38 jobs/s, seed 1) runs through a live stack
(real Redis, a policy worker process routing with the SLO router, one GPU and one accelerator
worker process on simulated devices) and through ``evaluation.simulator`` with the same seed,
config, fleet and the live policy worker's snapshot and heartbeat lags (``bench/live_vs_sim.py``
does both). At this load the fleet sits just below the interactive class's knee (the
simulator puts its attainment at 95.7%, the target is 90%), so a live stack that routed,
queued or timed jobs differently would show, while the run stays out of the chaotic region
right at the knee.

Tolerance: 5 points per class. On the 2-core dev box, thirteen live runs of this configuration
(seven of this test, six of the bench script) landed 0.2 to 3.4 points below the simulation for
the interactive class (mean 1.6) and exactly on it for the standard class; the simulator's own spread
over a live run's timing freedoms (arrivals moved by up to 3 ms, snapshot and heartbeat phases)
is 88.4..92.7%, over 4 points wide, because at the knee one flipped decision changes the rest of
the run. Most of the mean gap is the simulator taking lagged snapshots at decision instants where
the live policy worker takes them on a clock (bench/LIVE_VS_SIM.md). A tighter bound would test
that chaos; a looser one would let a real regression (a lost observation feed, a mis-estimated
prompt, a slow device loop) through.
"""

from __future__ import annotations

from pathlib import Path

from bench.live_vs_sim import compare, report

TOLERANCE_POINTS = 5.0
DEVICE_TIMING = 0.05
"""Largest share by which the live devices' median TTFT and TPOT may differ from their profiles."""
WORKLOAD, RATE, DURATION, SEED = "chat", 38.0, 15.0, 1
FLEET = {"gpu": 1, "accel": 1}


def test_live_attainment_within_a_few_points_of_the_simulator(redis_url: str, tmp_path: Path) -> None:
    c = compare(WORKLOAD, rate=RATE, duration=DURATION, seed=SEED, fleet=FLEET, policy="slo", repeat=1,
                ensemble=0, drain_s=60.0, redis_url=redis_url, log_dir=tmp_path)
    text = report([c], "tests/test_live_vs_sim.py")
    live, sim, diag = c.live[0], c.sim, c.diagnostics[0]
    print("live vs sim:", ", ".join(f"{k} {live[k].attainment:.1%} vs {m.attainment:.1%}" for k, m in sim.items()))
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in tmp_path.glob("stack-*.log"))
    # The comparison means something only if the simulated interactive class is not trivially met.
    assert 0.5 < sim["interactive"].attainment < 0.99, (
        f"the simulator no longer puts {WORKLOAD} at {RATE} jobs/s near the knee of {FLEET}; pick a rate "
        f"where interactive attainment is below 99% (python -m bench.live_vs_sim --rate ...)\n{text}")
    # The live run itself was sound: every job answered, the driver kept to the schedule, the
    # devices followed their profiles, and the worker's own SLO verdicts agree with the simulator's.
    assert diag.unfinished == 0, f"{text}\n{logs}"
    assert diag.slo_met_mismatch == 0, text
    assert diag.submit_lag_p99_ms < 50, text
    assert diag.overhead_p50_ms < 20, text
    # Device timing within 5%: a simulated device sleeps its profile's time, and on a busy
    # 2-core VM a sleep overshoots (median TTFT 3.6% over its profile in one CI run there,
    # 2026-12-03). A device that ignored its profile would be off by far more.
    assert diag.ttft_ratio is not None and abs(diag.ttft_ratio - 1) < DEVICE_TIMING, text
    assert diag.tpot_ratio is not None and abs(diag.tpot_ratio - 1) < DEVICE_TIMING, text
    for cls, metrics in sim.items():
        gap = 100 * (live[cls].attainment - metrics.attainment)
        assert abs(gap) <= TOLERANCE_POINTS, (
            f"{cls}: live {live[cls].attainment:.1%} vs simulated {metrics.attainment:.1%} "
            f"({gap:+.1f} points, tolerance {TOLERANCE_POINTS:g})\n{text}")
