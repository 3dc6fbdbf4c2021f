"""The discrete-event simulator and its workloads: determinism, conservation, the device model.

Everything here is pure and fast: no Redis, no clock. The device model is checked against
the live simulated backend (``workers.simulated``) on a virtual asyncio clock, so that a drift
between the two shows up here rather than as a gap between live and simulated attainment.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import math
import statistics
from collections.abc import Awaitable
from typing import Any

import msgspec
import pytest

from broker.config import load_config
from broker.wire import ChatMessage, Job
from evaluation.baselines import ROUTERS, OracleRouter
from evaluation.goodput import goodput
from evaluation.metrics import percentile, summarize
from evaluation.options import SimOptions
from evaluation.records import JobRecord, SimResult
from evaluation.simulator import simulate
from evaluation.workloads import (
    CODE,
    CONVERSATION,
    WORKLOADS,
    Arrival,
    Bursty,
    Diurnal,
    LogNormal,
    Poisson,
    Ramp,
    SeededRandom,
    generate,
)
from policies.config import PolicyConfig
from policies.profiles import PROFILES
from policies.route import Decision, JobFeatures, Snapshot
from policies.router import Observation, StaticRouter

CONFIG = load_config()
FLEET = {"gpu": 2, "accel": 1}
H100_8B = PROFILES["h100"].models["llama-3.1-8b"]


class To:
    """A trivial router: every job to one pool (or shed, or nowhere); counts what it saw."""

    def __init__(self, pool: str | None, *, shed: bool = False) -> None:
        self.pool, self.shed, self.name = pool, shed, f"to-{pool}"
        self.snapshots: list[Snapshot] = []
        self.observed: list[Observation] = []

    def decide(self, job: JobFeatures, slo: str, snapshot: Snapshot, rng: Any) -> Decision:
        self.snapshots.append(snapshot)
        return Decision(pool=None if self.shed else self.pool, reason="test", shed=self.shed)

    def observe(self, obs: Observation) -> None:
        self.observed.append(obs)


def features(prompt: int = 1000, out: int = 101, model: str = "llama-3.1-8b", kind: str = "chat",
             hint: str | None = "interactive") -> JobFeatures:
    return JobFeatures(tenant="t", model=model, kind=kind, prompt_tokens=prompt, max_tokens=out, slo_hint=hint)


def arrivals(*jobs: tuple[float, JobFeatures]) -> list[Arrival]:
    return [Arrival(at, job, job.slo_hint) for at, job in jobs]


def run(router: Any, workload: Any = WORKLOADS["chat"], fleet: dict[str, int] = FLEET, seed: int = 3,
        duration: float = 20.0, config: PolicyConfig = CONFIG, **options: Any) -> SimResult:
    return simulate(config, router, workload, fleet, seed, duration, options=SimOptions(**options))


# --------------------------------------------------------------------------- workloads


@pytest.mark.parametrize(("dist", "p50", "p90"), [
    (CONVERSATION.prompt, 1020, 2700), (CONVERSATION.output, 130, 420),
    (CODE.prompt, 1470, 3590), (CODE.output, 13, 66),
])
def test_token_distributions_hit_their_published_percentiles(dist: LogNormal, p50: float, p90: float) -> None:
    rng = SeededRandom(11)
    sample = [dist.sample(rng) for _ in range(60_000)]
    assert percentile(sample, 0.5) == pytest.approx(p50, rel=0.03, abs=1)
    assert percentile(sample, 0.9) == pytest.approx(p90, rel=0.04, abs=2)


def test_code_trace_fit_matches_the_released_p99_and_means() -> None:
    # Fitted on p50 and p99 of the released 2023 code CSV (p99 7,436 in / 249 out; means 2,048 / 28).
    assert CODE.prompt.quantile(0.99) == pytest.approx(7436, rel=1e-6)
    assert CODE.output.quantile(0.99) == pytest.approx(249, rel=1e-6)
    mean_out = math.exp(CODE.output.mu + CODE.output.sigma**2 / 2)
    assert 25 < mean_out < 32


def _cv(gaps: list[float]) -> float:
    return statistics.pstdev(gaps) / statistics.fmean(gaps)


def test_poisson_arrivals_have_cv_one_and_the_rate() -> None:
    times = list(Poisson().times(50.0, 2000.0, SeededRandom(1)))
    assert len(times) / 2000.0 == pytest.approx(50.0, rel=0.02)
    assert _cv([b - a for a, b in zip(times, times[1:], strict=False)]) == pytest.approx(1.0, abs=0.03)


def test_bursty_arrivals_have_cv_near_ten_and_the_mean_rate() -> None:
    rng = SeededRandom(2)
    bursty = Bursty(cv=10.0)
    gaps = [bursty.gap(1.0, rng) for _ in range(400_000)]
    assert statistics.fmean(gaps) == pytest.approx(1.0, rel=0.05)
    assert _cv(gaps) == pytest.approx(10.0, rel=0.1)


def test_diurnal_rate_swings_from_trough_to_peak() -> None:
    times = list(Diurnal(amplitude=0.565).times(100.0, 1000.0, SeededRandom(4)))
    assert len(times) / 1000.0 == pytest.approx(100.0, rel=0.03)
    trough = sum(t < 100 or t >= 900 for t in times)  # around the start and end of the period
    peak = sum(400 <= t < 600 for t in times)
    assert 2.5 < peak / trough < 4.5


def test_ramp_rate_climbs_from_start_to_end_across_the_run() -> None:
    times = list(Ramp(start=0.25, end=1.75).times(100.0, 1000.0, SeededRandom(5)))
    assert len(times) / 1000.0 == pytest.approx(100.0, rel=0.03)  # the mean of 0.25x and 1.75x
    first, last = sum(t < 100 for t in times), sum(t >= 900 for t in times)
    assert first / 100 == pytest.approx(100 * (0.25 + 0.075), rel=0.15)  # mean rate over the first tenth
    assert last / 100 == pytest.approx(100 * (1.75 - 0.075), rel=0.1)


def test_rag_prompts_are_long_and_its_arrivals_bursty() -> None:
    jobs = generate(WORKLOADS["rag"], 6, 600.0)
    prompts = sorted(a.job.prompt_tokens for a in jobs)
    assert 2500 < prompts[len(prompts) // 2] < 3500 and 7000 < prompts[int(0.9 * len(prompts))] < 11000
    gaps = [b.at - a.at for a, b in zip(jobs, jobs[1:], strict=False)]
    assert 3.0 < _cv(gaps) < 5.0
    assert {a.hint for a in jobs} == {"interactive", "standard", "batch"}


def test_workloads_are_seeded_and_carry_their_hints() -> None:
    a = generate(WORKLOADS["mixed"], 5, 30.0)
    assert a == generate(WORKLOADS["mixed"], 5, 30.0)
    assert a != generate(WORKLOADS["mixed"], 6, 30.0)
    assert all(x.job.slo_hint == x.hint for x in a)
    assert {x.hint for x in a} == {"interactive", "standard", "batch"}
    assert all(0 <= x.at < 30.0 for x in a) and [x.at for x in a] == sorted(x.at for x in a)
    shares = statistics.fmean(x.hint == "batch" for x in a)
    assert shares == pytest.approx(0.4, abs=0.05)


def test_seeded_random_is_uniform_and_stream_separated() -> None:
    draws = _take(SeededRandom(9), 50_000)
    assert 0.0 <= min(draws) and max(draws) < 1.0
    assert statistics.fmean(draws) == pytest.approx(0.5, abs=0.01)
    assert _take(SeededRandom(9), 5) == _take(SeededRandom(9), 5)
    assert _take(SeededRandom(9), 5) != _take(SeededRandom(9, stream=1), 5)


def _take(rng: SeededRandom, n: int) -> list[float]:
    return [rng.random() for _ in range(n)]


# --------------------------------------------------------------------------- determinism and conservation


@pytest.mark.parametrize("policy", ["static", "slo", "oracle", "jsq", "round_robin", "lowest_latency"])
def test_same_seed_same_records(policy: str) -> None:
    first = run(ROUTERS[policy](CONFIG), WORKLOADS["mixed"], duration=10.0)
    again = run(ROUTERS[policy](CONFIG), WORKLOADS["mixed"], duration=10.0)
    assert msgspec.json.encode(first) == msgspec.json.encode(again)
    other = run(ROUTERS[policy](CONFIG), WORKLOADS["mixed"], seed=4, duration=10.0)
    assert other.records != first.records


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_job_has_exactly_one_record_and_monotonic_times(name: str) -> None:
    workload = WORKLOADS[name]
    jobs = generate(workload, 3, 15.0)
    result = run(ROUTERS["slo"](CONFIG), workload.scaled(1.5), duration=15.0)
    assert len(result.records) == len(generate(workload.scaled(1.5), 3, 15.0)) > len(jobs) > 100
    assert [r.id for r in result.records] == list(range(len(result.records)))
    for r in result.records:
        assert r.status in ("ok", "rejected", "failed", "unfinished")
        if r.status == "ok":
            assert r.start is not None and r.first_token is not None and r.finish is not None
            assert r.arrival <= r.start <= r.first_token <= r.finish <= result.end
            assert r.output_tokens == max(1, r.max_tokens) and r.cost_usd > 0
            assert 1 <= r.concurrency <= result.usage[r.pool or ""].slots


def test_shed_failed_and_unfinished_jobs_are_recorded_once() -> None:
    jobs = arrivals((0.1, features()), (0.2, features()))
    shed = run(To("gpu", shed=True), jobs)
    assert [r.status for r in shed.records] == ["rejected", "rejected"]
    assert all(r.rejected and not r.slo_met and r.start is None for r in shed.records)
    nowhere = run(To(None), jobs)
    assert [r.status for r in nowhere.records] == ["failed", "failed"]
    embed = run(To("accel"), arrivals((0.1, features(model="minilm-l6", kind="embedding", hint=None))))
    assert embed.records[0].status == "failed" and "cannot run" in embed.records[0].reason
    idle = run(To("accel"), jobs, fleet={"gpu": 1, "accel": 0})
    assert [r.status for r in idle.records] == ["unfinished", "unfinished"]
    cut = run(To("gpu"), arrivals((0.1, features(out=2000))), duration=1.0, drain_s=1.0)
    assert cut.records[0].status == "unfinished" and cut.records[0].first_token is not None


def test_fleet_must_name_configured_pools() -> None:
    with pytest.raises(ValueError, match="tpu"):
        run(To("gpu"), arrivals((0.1, features())), fleet={"tpu": 1})


# --------------------------------------------------------------------------- the device model


def test_a_single_job_on_an_idle_pool_takes_the_profile_prediction() -> None:
    result = run(To("gpu"), arrivals((1.0, features(prompt=1000, out=101))))
    r = result.records[0]
    assert r.status == "ok" and r.pool == "gpu" and r.concurrency == 1
    assert r.start == 1.0
    assert r.ttft_ms == pytest.approx(H100_8B.ttft(1000, 1))
    assert r.e2e_ms == pytest.approx(H100_8B.service_ms(1000, 101, 1))
    assert r.tpot_ms == pytest.approx(H100_8B.itl(1))
    assert r.slo_met


def test_embeddings_finish_at_their_first_token() -> None:
    result = run(To("gpu"), arrivals((0.5, features(prompt=300, out=0, model="minilm-l6", kind="embedding"))))
    r = result.records[0]
    assert r.status == "ok" and r.first_token == r.finish and r.output_tokens == 0


def test_a_saturated_accelerator_obeys_its_cap() -> None:
    cap = PROFILES["accel"].max_concurrency
    assert cap == 8
    burst = arrivals(*((0.001 * i, features(prompt=500, out=300)) for i in range(60)))
    result = run(To("accel"), burst, fleet={"gpu": 0, "accel": 1})
    assert result.usage["accel"].max_in_flight == cap
    assert all(r.status == "ok" for r in result.records)
    # At no instant do more than ``cap`` jobs run (starts and finishes swept in time order).
    edges = sorted([(r.start or 0.0, 1) for r in result.records] + [(r.finish or 0.0, -1) for r in result.records],
                   key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, delta in edges:
        running += delta
        peak = max(peak, running)
    assert peak == cap
    assert max(r.concurrency for r in result.records) == cap
    # The queue is FIFO: jobs start in arrival order.
    starts = [r.start or 0.0 for r in result.records]
    assert starts == sorted(starts)


def test_jobs_slow_each_other_down_and_spread_over_workers() -> None:
    alone = run(To("gpu"), arrivals((0.0001, features(out=300)))).records[0]
    crowd = run(To("gpu"), arrivals(*((0.0001 * (i + 1), features(out=300)) for i in range(40))),
                fleet={"gpu": 2, "accel": 0})
    assert {r.worker for r in crowd.records} == {0, 1}
    assert all((r.tpot_ms or 0) > (alone.tpot_ms or 0) * 1.05 for r in crowd.records)


def test_priority_queues_put_interactive_work_ahead_of_batch() -> None:
    jobs = [(0.001 * i, features(prompt=500, out=500, hint="batch")) for i in range(20)]
    jobs.append((0.05, features(prompt=500, out=50, hint="interactive")))
    fifo = run(To("accel"), arrivals(*jobs), fleet={"gpu": 0, "accel": 1}, priority_queues=False)
    prio = run(To("accel"), arrivals(*jobs), fleet={"gpu": 0, "accel": 1})  # the default, as live
    last_fifo, last_prio = fifo.records[-1], prio.records[-1]
    assert last_fifo.cls == last_prio.cls == "interactive"
    assert (last_prio.start or 0) < (last_fifo.start or 0)
    batch_starts = sorted(r.start or 0 for r in prio.records[:-1] if (r.start or 0) > 0.05)
    assert batch_starts and (last_prio.start or 0) <= batch_starts[0]


def test_snapshots_count_queued_jobs_by_lane() -> None:
    jobs = [(0.001 * i, features(prompt=500, out=500, hint="batch")) for i in range(12)]
    jobs += [(0.02, features(out=50, hint="standard")), (0.03, features(out=50, hint="interactive"))]
    seen = To("accel")
    run(seen, arrivals(*jobs), fleet={"gpu": 0, "accel": 1})
    last = seen.snapshots[-1].pools["accel"]  # before the interactive job: 8 running, 4 + 1 waiting
    assert (last.backlog, last.queued, last.ahead(0), last.ahead(1)) == (13, (0, 1, 4), 8, 9)
    fifo = To("accel")
    run(fifo, arrivals(*jobs), fleet={"gpu": 0, "accel": 1}, priority_queues=False)
    assert fifo.snapshots[-1].pools["accel"].queued == () and fifo.snapshots[-1].pools["accel"].ahead(0) == 13


def _overload(batch_rate: float, duration: float) -> list[Arrival]:
    """Interactive chat at 1.5x one GPU worker's capacity, and a steady stream of batch jobs."""
    slots = CONFIG.pools["gpu"].concurrency
    interactive = 1.5 * slots / ((H100_8B.ttft(1000, slots) + 100 * H100_8B.itl(slots)) / 1000)
    times = [(i / interactive, features(out=101)) for i in range(int(duration * interactive))]
    times += [(i / batch_rate, features(prompt=500, out=400, hint="batch")) for i in range(int(duration * batch_rate))]
    return arrivals(*sorted(times, key=lambda t: t[0]))


@pytest.mark.parametrize("batch_rate", [2.0, 6.0])
def test_batch_keeps_its_min_share_under_sustained_interactive_overload(batch_rate: float) -> None:
    # One 64-slot worker; batch keeps ceil(0.1 * 64) = 7 slots. At 2 batch jobs/s (about 5
    # slots of work) every batch job starts within seconds; at 6/s (about 16 slots) batch
    # runs on at least its share. With strict priority batch waited for the interactive
    # queue, which under a sustained overload never empties: almost none of it ran.
    duration, slots, share = 40.0, CONFIG.pools["gpu"].concurrency, CONFIG.classes["batch"].min_share
    result = run(To("gpu"), _overload(batch_rate, duration), fleet={"gpu": 1, "accel": 0}, duration=duration,
                 drain_s=0.0)
    batch = [r for r in result.records if r.cls == "batch"]
    busy = sum(min(r.finish or duration, duration) - r.start for r in batch if r.start is not None)
    if batch_rate * 2.65 < share * slots:  # demand under its share: all of it served, each job soon
        waits = [r.start - r.arrival for r in batch if r.start is not None]
        assert len(waits) == len(batch) and max(waits) < 3.0, (len(waits), len(batch), max(waits, default=None))
        assert sum(r.status == "ok" for r in batch) >= 0.9 * len(batch)
    else:  # demand over its share: it runs on its reserved slots, no fewer
        assert busy / (slots * duration) >= share, busy / (slots * duration)
    # Interactive work keeps flowing on the rest of the slots: over 80% of the worker's capacity.
    served = sum(r.status == "ok" for r in result.records if r.cls == "interactive")
    assert served >= 0.8 * sum(r.cls == "interactive" for r in result.records) / 1.5


@pytest.mark.parametrize("rate", [155.0, 180.0])
def test_under_overload_slo_holds_at_or_above_static_on_interactive_work(rate: float) -> None:
    # ``mixed`` (40% interactive, 20% standard, 40% batch) at about 1.3x and 1.5x the rate
    # where slo meets the interactive target on 4 GPUs + 1 accelerator (bench/POLICY.md):
    # standard and batch work queues up on the GPUs. Charged for that queue (one backlog for
    # every lane), interactive jobs looked like misses on the GPUs and piled onto the 8-slot
    # accelerator: 71% and 65% against static's 82%.
    fleet = {"gpu": 4, "accel": 1}
    results = {name: run(ROUTERS[name](CONFIG), WORKLOADS["mixed"].at_rate(rate), fleet=fleet, seed=1,
                         duration=30.0) for name in ("slo", "static")}
    got = {name: summarize(r, CONFIG)["interactive"] for name, r in results.items()}
    assert got["static"].attainment < 0.9  # overload: the target is out of reach
    assert max(r.end for r in results.values()) > 35.0  # and work queued past the arrivals
    assert got["slo"].attainment >= got["static"].attainment


def admitting_all(config: PolicyConfig) -> PolicyConfig:
    """``config`` with admission off for every class (``on_unattainable = "best_effort"``)."""
    classes = {name: msgspec.structs.replace(cls, on_unattainable="best_effort")
               for name, cls in config.classes.items()}
    return msgspec.structs.replace(config, classes=classes)


def test_admission_keeps_admitted_interactive_jobs_on_target_at_1_5x() -> None:
    # The fleet and workload of the overload test above at ~1.5x capacity. Best-effort lets
    # every job join queues it can only make longer (82.8% interactive attainment); admission
    # (`on_unattainable = "shed"`, the default) refuses the jobs no pool can serve in time,
    # and those it admits meet the target.
    fleet = {"gpu": 4, "accel": 1}
    results = {name: summarize(run(ROUTERS["slo"](cfg), WORKLOADS["mixed"].at_rate(180.0), fleet=fleet, seed=1,
                                   duration=30.0, config=cfg), cfg)
               for name, cfg in (("shed", CONFIG), ("best_effort", admitting_all(CONFIG)))}
    admitted, unguarded = results["shed"]["interactive"], results["best_effort"]["interactive"]
    assert unguarded.rejected == 0 and unguarded.attainment < 0.9  # the overload is real
    assert admitted.rejected > 0  # shedding is visible
    assert admitted.admitted_attainment >= 0.9
    assert admitted.attainment > unguarded.attainment  # refusing early also serves more of all jobs in time
    assert results["shed"]["batch"].rejected == 0  # the long batch target is still attainable


def test_the_default_config_at_1_5x_the_knee_sheds_and_keeps_admitted_interactive_jobs_on_target() -> None:
    # The knee: the highest rate of `mixed` at which slo, admitting every job, still meets the
    # interactive target on 4 GPUs + 1 accelerator (admission off, so that the knee is the
    # fleet's capacity, not an effect of the shedding under test). At 1.5x that, the default
    # config, with nothing overridden, refuses some jobs and serves those it admits in time.
    fleet, workload = {"gpu": 4, "accel": 1}, WORKLOADS["mixed"]
    unguarded = admitting_all(CONFIG)
    knee = goodput(unguarded, lambda: ROUTERS["slo"](unguarded), workload, fleet, 1, 30.0,
                   multipliers=(1.0, 2.0, 3.0, 4.0), refine=3)
    assert not knee.capped and knee.rate > 0
    table = summarize(run(ROUTERS["slo"](CONFIG), workload.at_rate(1.5 * knee.rate), fleet=fleet, seed=1,
                          duration=30.0), CONFIG)
    interactive = table["interactive"]
    assert interactive.rejected > 0  # shedding is visible
    assert interactive.admitted_attainment >= 0.9, interactive
    assert table["all"].rejected < 0.2 * table["all"].jobs  # it refuses the excess, not the traffic


class VirtualTime:
    """A virtual clock for asyncio: ``sleep`` parks on a timer heap, ``drive`` fires the earliest."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._timers, (self.now + seconds, self._seq, fut))
        await fut

    async def drive(self, coros: list[Awaitable[Any]]) -> list[Any]:
        tasks = [asyncio.ensure_future(c) for c in coros]
        while not all(t.done() for t in tasks):
            for _ in range(8):  # let the woken task run to its next sleep
                await asyncio.sleep(0)
            if self._timers:
                self.now, _, fut = heapq.heappop(self._timers)
                fut.set_result(None)
        return [t.result() for t in tasks]


async def test_the_simulator_agrees_with_the_live_simulated_backend() -> None:
    """Same jobs, same arrival times, one H100 worker: identical first-token and finish times."""
    from workers.simulated import SimulatedBackend

    rng = SeededRandom(21)
    jobs: list[tuple[float, JobFeatures]] = []
    at = 0.0
    for i in range(30):
        at += rng.expovariate(40.0)
        model = "llama-3.3-70b" if i % 4 == 0 else "llama-3.1-8b"
        jobs.append((at, features(prompt=50 + int(rng.random() * 3000), out=1 + int(rng.random() * 300),
                                  model=model)))
    vt = VirtualTime()
    backend = SimulatedBackend("h100", clock=vt.time, sleep=vt.sleep)

    async def live(offset: float, f: JobFeatures) -> tuple[float, float]:
        await vt.sleep(offset)
        job = Job(id="j", model=f.model, kind="chat", max_tokens=f.max_tokens,
                  messages=[ChatMessage("user", "x" * (4 * f.prompt_tokens))])
        out = await backend.run(job)
        return out.first_token_at, out.finished_at

    got = await vt.drive([live(offset, f) for offset, f in jobs])
    sim = run(To("gpu"), arrivals(*jobs), fleet={"gpu": 1, "accel": 0})
    assert max(r.concurrency for r in sim.records) > 5  # the jobs overlap: concurrency matters
    for (first, finish), r in zip(got, sim.records, strict=True):
        assert r.first_token == pytest.approx(first, abs=1e-9)
        assert r.finish == pytest.approx(finish, abs=1e-9)


# --------------------------------------------------------------------------- routers in the loop


def test_the_router_sees_exact_pool_state_and_learns_from_every_job() -> None:
    router = To("gpu")
    result = run(router, arrivals(*((0.01 * i, features(out=200)) for i in range(10))))
    backlogs = [s.pools["gpu"].backlog for s in router.snapshots]
    assert backlogs == list(range(10))  # each job joins the ones still running
    assert all(s.pools["gpu"].capacity == 2 * 64 and s.pools["gpu"].workers == 2 for s in router.snapshots)
    assert len(router.observed) == 10
    obs, rec = router.observed[0], result.records[0]
    assert obs.concurrency == rec.concurrency == 1 and obs.output_tokens == 200
    assert obs.ttft_ms == pytest.approx(H100_8B.ttft(1000, 1))


def test_a_lagged_snapshot_is_refreshed_on_a_clock() -> None:
    router = To("gpu")
    # Decisions at 0.3 s and 0.55 s see the state of the ticks at 0.25 s and 0.5 s, not their own instants.
    run(router, arrivals((0.0, features(out=2000)), (0.3, features(out=2000)), (0.55, features(out=2000))),
        snapshot_interval_s=0.25)
    assert [s.now for s in router.snapshots] == [0.0, 0.25, 0.5]


def test_a_stale_snapshot_counts_its_own_routing_like_the_live_policy_worker() -> None:
    router = To("gpu")
    run(router, arrivals(*((0.01 * i, features(out=2000)) for i in range(10))), snapshot_interval_s=1.0)
    assert {s.now for s in router.snapshots} == {0.0}
    assert [s.pools["gpu"].backlog for s in router.snapshots] == list(range(10))


def test_observations_can_arrive_in_heartbeat_batches() -> None:
    class Counting(To):
        def decide(self, job: JobFeatures, slo: str, snapshot: Snapshot, rng: Any) -> Decision:
            seen.append(len(self.observed))
            return super().decide(job, slo, snapshot, rng)

    seen: list[int] = []
    jobs = arrivals(*((0.3 * i, features(prompt=100, out=2)) for i in range(8)))  # each done in ~10 ms
    run(Counting("gpu"), jobs)
    assert seen == list(range(8))
    seen.clear()
    router = Counting("gpu")
    run(router, jobs, observation_interval_s=1.0)
    assert seen == [0, 0, 0, 0, 4, 4, 4, 4]  # one batch, at the decision at 1.2 s (2.1 s is < 1 s later)
    assert len(router.observed) == 4


def test_the_simulator_hands_the_oracle_its_truth() -> None:
    router = OracleRouter(CONFIG)
    result = run(router, arrivals((0.5, features(prompt=2000, out=64))))
    assert router.truth is not None and result.records[0].status == "ok"


def test_oracle_truth_matches_what_then_happens() -> None:
    class Recorder(OracleRouter):
        def __init__(self, config: PolicyConfig) -> None:
            super().__init__(config)
            self.told: dict[str, Any] = {}

        def decide(self, job: JobFeatures, slo: str, snapshot: Snapshot, rng: Any) -> Decision:
            assert self.truth is not None
            self.told = {p: self.truth(job, p, snapshot) for p in ("gpu", "accel")}
            return Decision(pool="accel", reason="test")

    router = Recorder(CONFIG)
    jobs = [(0.001 * i, features(prompt=800, out=40)) for i in range(12)]
    result = run(router, arrivals(*jobs), fleet={"gpu": 1, "accel": 1})
    last = result.records[-1]
    told = router.told["accel"]
    assert told.queue_wait_ms == pytest.approx(((last.start or 0) - last.arrival) * 1000)
    assert told.ttft_ms == pytest.approx(((last.first_token or 0) - (last.start or 0)) * 1000)
    assert told.tpot_ms == pytest.approx(last.tpot_ms)
    assert router.told["gpu"].queue_wait_ms == 0


def test_the_oracles_look_ahead_leaves_the_run_untouched() -> None:
    """Asking for the truth on every pool, then routing like a plain router, changes nothing."""

    class Curious(OracleRouter):
        name = "curious"

        def decide(self, job: JobFeatures, slo: str, snapshot: Snapshot, rng: Any) -> Decision:
            assert self.truth is not None
            for pool in ("gpu", "accel"):
                self.truth(job, pool, snapshot)
            return Decision(pool="accel" if slo == "interactive" else "gpu", reason="test")

    class Plain:
        name = "curious"

        def decide(self, job: JobFeatures, slo: str, snapshot: Snapshot, rng: Any) -> Decision:
            return Decision(pool="accel" if slo == "interactive" else "gpu", reason="test")

        def observe(self, obs: Observation) -> None:
            return None

    small = {"gpu": 1, "accel": 1}  # both pools queue: the look-ahead starts queued jobs in its copy
    looked = run(Curious(CONFIG), WORKLOADS["chat"].scaled(2), fleet=small, duration=8.0, drain_s=2.0)
    plain = run(Plain(), WORKLOADS["chat"].scaled(2), fleet=small, duration=8.0, drain_s=2.0)
    assert looked.records == plain.records
    assert {r.status for r in plain.records} == {"ok", "unfinished"}


# --------------------------------------------------------------------------- metrics


def test_summary_costs_add_up_to_the_provisioned_fleet() -> None:
    result = run(ROUTERS["jsq"](CONFIG), WORKLOADS["mixed"], duration=10.0)
    table = summarize(result, CONFIG)
    assert set(table) == {"interactive", "standard", "batch", "all"}
    span_h = max(result.duration, result.end) / 3600
    fleet_cost = sum(u.workers * u.cost_per_hour for u in result.usage.values()) * span_h
    assert table["all"].cost_usd == pytest.approx(fleet_cost)
    assert sum(m.cost_usd for c, m in table.items() if c != "all") == pytest.approx(fleet_cost)
    busy = sum(u.busy_s * u.cost_per_hour / 3600 for u in result.usage.values())
    assert sum(r.cost_usd for r in result.records) == pytest.approx(busy)
    tokens = sum(r.output_tokens for r in result.records)
    assert table["all"].cost_per_mtok == pytest.approx(fleet_cost / tokens * 1e6)
    assert table["all"].jobs == len(result.records)
    assert 0 < table["interactive"].accel_share < 1


def test_attainment_counts_every_job_of_the_class() -> None:
    jobs = arrivals((0.1, features()), (0.2, features()))
    table = summarize(run(To("gpu", shed=True), jobs), CONFIG)
    assert table["interactive"].attainment == 0.0 and table["interactive"].rejected == 2
    table = summarize(run(To("gpu"), jobs), CONFIG)
    assert table["interactive"].attainment == 1.0 and table["interactive"].served == 2


def test_goodput_finds_the_rate_where_the_target_breaks() -> None:
    def factory() -> Any:
        return StaticRouter(CONFIG)

    g = goodput(CONFIG, factory, WORKLOADS["chat"], {"gpu": 1, "accel": 1}, 1, 10.0,
                multipliers=(0.25, 0.5, 1.0, 2.0), refine=2)
    passing = [p for p in g.points if p.attainment >= g.target]
    failing = [p for p in g.points if p.attainment < g.target]
    assert failing and not g.capped
    assert g.rate == pytest.approx(max(p.rate for p in passing if p.multiplier <= g.multiplier))
    assert all(p.multiplier > g.multiplier for p in failing)


def test_work_grows_linearly_with_jobs() -> None:
    """A performance sanity bound without a timer: events are bounded by the jobs' decode chunks."""
    result = run(ROUTERS["slo"](CONFIG), WORKLOADS["chat"], duration=30.0)
    served = [r for r in result.records if r.status == "ok"]
    bound = sum(1 + math.ceil(max(0, r.output_tokens - 1) / 32) for r in served)
    assert result.events == bound
    assert len(result.records) > 1000


def test_records_are_plain_data() -> None:
    result = run(To("gpu"), arrivals((0.1, features())))
    back = msgspec.json.decode(msgspec.json.encode(result), type=SimResult)
    assert back == result and isinstance(back.records[0], JobRecord)


# --------------------------------------------------------------------------- the command


def test_decode_granularity_matches_the_live_backend() -> None:
    from evaluation.options import DECODE_CHUNK
    from workers.simulated import DECODE_CHUNK as LIVE_CHUNK

    assert DECODE_CHUNK == LIVE_CHUNK


def test_simulate_command_prints_json_and_tables() -> None:
    from click.testing import CliRunner

    from cli.main import main

    def command(args: list[str], **kw: Any) -> Any:
        # Through the root group, as a user calls it: a subcommand invoked on its own caches
        # a help option without `-h`, which later tests of the CLI then miss.
        return CliRunner().invoke(main, ["simulate", *args], **kw)

    res = command(["--workload", "code", "--duration", "3", "--policy", "slo,jsq", "--json",
                                       "--fleet", "gpu=2,accel=1"])
    assert res.exit_code == 0, res.output
    runs = json.loads(res.output)
    assert [r["policy"] for r in runs] == ["slo", "jsq"]
    assert runs[0]["fleet"] == {"gpu": 2, "accel": 1} and runs[0]["rate"] == WORKLOADS["code"].rate
    assert {"interactive", "standard", "all"} <= set(runs[0]["classes"])
    res = command(["--duration", "2", "--policy", "gpu_only", "--rate", "10", "--goodput"], env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    assert "gpu_only" in res.output and "interactive" in res.output and "goodput" in res.output
    for bad in (["--fleet", "tpu=2"], ["--policy", "nope"], ["--workload", "nope"]):
        res = command(bad)
        assert res.exit_code == 2 and bad[0] in res.output
