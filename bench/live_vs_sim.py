"""Live stack vs simulator: the same seeded workload through both, attainment side by side.

::

    .venv/bin/python -m bench.live_vs_sim --workload chat --rate 38,40 --duration 25 --seed 1 \\
        --fleet gpu=1,accel=1 --policy slo --repeat 5

The workload's arrivals are generated from the seed (:func:`evaluation.workloads.generate`);
each becomes a live :class:`~broker.wire.Job` whose prompt is exactly ``4 x prompt_tokens``
characters (the broker estimates prompt tokens as ``chars // 4``), whose ``max_tokens`` is the
arrival's output length (the simulated device produces exactly that many) and whose ``slo``
hint is the arrival's class. A :class:`~cli.stack.Stack` (embedded Redis, one policy worker
process, ``fleet[pool]`` worker processes per pool on simulated devices) runs them, each
submitted at its arrival time; the policy worker routes with ``[routing] policy`` set in a
temporary copy of the built-in configuration. The live results become simulator
:class:`~evaluation.records.JobRecord` values (times relative to the start of the schedule,
``slo_met`` by :func:`evaluation.records.meets`) so that :func:`evaluation.metrics.summarize`
computes both sides' metrics the same way: attainment is the share of *all* a class's jobs
that met every target, TTFT from submission.

The simulator then runs the same arrivals, config and fleet twice: with the live policy
worker's information lags (``snapshot_interval_s`` = the live ``snapshot_s``,
``observation_interval_s`` = the live ``heartbeat_s``: the comparison that counts) and with
exact information (the ``inference-broker simulate`` default), for reference.

Near the knee a fleet is chaotic: a few milliseconds moved anywhere flip a routing decision,
and the runs part ways from there. So that the report shows how far apart two runs of the
*same* system land, the simulator also runs ``--ensemble`` times with the live system's own
timing freedoms drawn at random (:func:`perturbed`): each arrival moved by up to the broker's
measured submission overhead, the snapshot period stretched by up to the time a refresh takes,
the observation period by up to one snapshot period (a heartbeat waits for the policy's next
refresh). The live runs should fall inside that spread, give or take.

With ``--repeat N`` the live side runs N times (the simulator is deterministic) and the report
shows each run and the spread. ``--out`` (default ``bench/LIVE_VS_SIM.md``) receives the
report; ``--no-write`` only prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import os
import platform
import random
import shlex
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine, Sequence
from pathlib import Path
from statistics import median
from typing import Any

import msgspec

from broker.client import Client
from broker.config import default_config_text, load_config
from broker.errors import ResultTimeout
from broker.settings import Settings
from broker.wire import ChatMessage, Job, Result
from cli.stack import Stack
from evaluation.baselines import ROUTERS
from evaluation.metrics import ClassMetrics, percentile, summarize
from evaluation.options import SimOptions
from evaluation.records import JobRecord, PoolUsage, SimResult, meets
from evaluation.simulator import simulate
from evaluation.workloads import WORKLOADS, Arrival, generate
from policies.classify import classify
from policies.config import LIVE_ROUTERS, ConfigError, PolicyConfig, pool_counts
from policies.profiles import PROFILES

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "LIVE_VS_SIM.md"
OVERHEAD_S = 0.003
"""Largest arrival shift of the ensemble: the live submission-to-start overhead (p50 about 2 ms here)."""
REFRESH_S = 0.01
"""Largest stretch of the ensemble's snapshot period: what one live refresh (XINFO + HGETALL per pool) takes."""
FILLER = "abcd"
"""Prompt text: ``4 x prompt_tokens`` characters, so the broker's ``chars // 4`` estimate is exact."""


# --------------------------------------------------------------------------- the jobs


def prompt_text(tokens: int) -> str:
    """Text the broker estimates at exactly ``tokens`` prompt tokens (``len // 4``)."""
    return FILLER * max(1, tokens)


def to_job(arrival: Arrival, job_id: str) -> Job:
    """The live job of one arrival: same model, kind, tenant, prompt size, output length and class hint."""
    f = arrival.job
    common: dict[str, object] = {"id": job_id, "model": f.model, "kind": f.kind, "tenant": f.tenant,
                                 "max_tokens": f.max_tokens, "slo": arrival.hint}
    text = prompt_text(f.prompt_tokens)
    if f.kind == "chat":
        return Job(messages=[ChatMessage("user", text)], **common)  # type: ignore[arg-type]
    if f.kind == "embedding":
        return Job(texts=[text], **common)  # type: ignore[arg-type]
    return Job(prompt=text, **common)  # type: ignore[arg-type]


def policy_toml(policy: str) -> str:
    """The built-in configuration with ``[routing] policy`` set."""
    return default_config_text() + f'\n[routing]\npolicy = "{policy}"\n'


def parse_fleet(text: str, config: PolicyConfig) -> dict[str, int]:
    """``gpu=1,accel=1``: every pool of the config, 0 workers unless named."""
    try:
        return pool_counts(config, [text], {})
    except ConfigError as exc:
        raise SystemExit(f"--fleet: {exc}") from None


# --------------------------------------------------------------------------- the live run


class LiveRun(msgspec.Struct, kw_only=True):
    """One live run: results in arrival order, and how far the driver drifted from the schedule."""

    results: list[Result | None]
    """``None``: no result before the run's deadline."""
    t0: float
    """Wall-clock time (epoch s) of offset 0 of the schedule."""
    planned: list[float]
    submitted: list[float]
    """Epoch s at which each job was actually submitted."""
    wall_s: float


async def drive(url: str, prefix: str, arrivals: Sequence[Arrival], jobs: Sequence[Job], *,
                timeout: float) -> LiveRun:
    """Submit each job at its arrival offset (as ``cli.demo.drive``) and gather the results."""
    loop = asyncio.get_running_loop()
    results: list[Result | None] = [None] * len(jobs)
    submitted = [math.nan] * len(jobs)
    async with Client(url, prefix=prefix) as client:
        start = loop.time() + 0.2
        t0 = time.time() + 0.2

        async def one(i: int, at: float, job: Job) -> None:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            submitted[i] = time.time()
            await client.submit(job)
            deadline = start + timeout - loop.time()
            try:
                results[i] = await client.result(job.id, timeout=max(0.1, deadline))
            except ResultTimeout:
                results[i] = None

        began = time.monotonic()
        await asyncio.gather(*(one(i, a.at, j) for i, (a, j) in enumerate(zip(arrivals, jobs, strict=True))))
        wall = time.monotonic() - began
    return LiveRun(results=results, t0=t0, planned=[a.at for a in arrivals], submitted=submitted, wall_s=wall)


def run_live(config_path: Path, fleet: dict[str, int], arrivals: Sequence[Arrival], *, snapshot_s: float,
             heartbeat_s: float, drain_s: float, redis_url: str | None = None, log_path: Path | None = None) -> LiveRun:
    """Start a stack on ``fleet`` with the policy file, drive the arrivals through it, stop it."""
    run = uuid.uuid4().hex[:8]
    prefix = f"lvs{run}"
    settings = Settings(redis_url=redis_url, prefix=prefix, config=config_path, snapshot_s=snapshot_s,
                        heartbeat_s=heartbeat_s, grace_s=5.0)
    env = {"IB_SNAPSHOT_S": str(snapshot_s), "IB_HEARTBEAT_S": str(heartbeat_s), "IB_GRACE_S": "5"}
    jobs = [to_job(a, f"lvs-{run}-{i}") for i, a in enumerate(arrivals)]
    horizon = (arrivals[-1].at if arrivals else 0.0) + drain_s
    with open(log_path or os.devnull, "wb") as log:
        stack = Stack(settings, workers={p: n for p, n in fleet.items() if n > 0}, log=log, extra_env=env)
        try:
            stack.start()
            stack.wait_ready(timeout=60)
            # Let the policy worker's first snapshot see every worker's heartbeat.
            time.sleep(max(2 * snapshot_s, 0.3))
            live = _run_loop(drive(stack.url, prefix, arrivals, jobs, timeout=horizon))
            stack.check_alive()
        finally:
            stack.stop(grace=10)
    return live


def _run_loop(coro: Coroutine[Any, Any, LiveRun]) -> LiveRun:
    try:
        import uvloop  # the roles run on uvloop; so does the driver when it is there
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def live_result(live: LiveRun, arrivals: Sequence[Arrival], config: PolicyConfig, fleet: dict[str, int], *,
                policy: str, workload: str, seed: int, duration: float) -> SimResult:
    """The live run as simulator records (times in s from the schedule's start), for :func:`summarize`."""
    records: list[JobRecord] = []
    end = 0.0
    for i, (arrival, result) in enumerate(zip(arrivals, live.results, strict=True)):
        f = arrival.job
        cls, _ = classify(arrival.features, config)
        sent = live.submitted[i] - live.t0 if not math.isnan(live.submitted[i]) else arrival.at
        rec = JobRecord(id=i, cls=cls, tenant=f.tenant, model=f.model, kind=f.kind, prompt_tokens=f.prompt_tokens,
                        max_tokens=f.max_tokens, arrival=sent, status="unfinished",
                        reason="no result before the deadline")
        if result is not None and result.status == "ok" and result.timing is not None:
            t = result.timing
            rec = msgspec.structs.replace(
                rec, arrival=t.created_at - live.t0, status="ok", reason="", pool=result.pool,
                start=t.started_at - live.t0, first_token=t.first_token_at - live.t0, finish=t.finished_at - live.t0,
                output_tokens=result.usage.completion_tokens if result.usage else 0)
            end = max(end, t.finished_at - live.t0)
        elif result is not None:
            rec = msgspec.structs.replace(rec, status="rejected" if result.status == "rejected" else "failed",
                                          reason=result.error or result.status, pool=result.pool)
        records.append(msgspec.structs.replace(rec, slo_met=meets(config.classes[cls], rec)))
    usage = {}
    for name, spec in config.pools.items():
        cap = PROFILES[spec.profile].max_concurrency
        usage[name] = PoolUsage(workers=fleet.get(name, 0), slots=spec.concurrency if cap is None else
                                min(spec.concurrency, cap), cost_per_hour=spec.cost_per_hour, busy_s=0.0,
                                busy_cost={}, max_in_flight=0)
    return SimResult(policy=policy, workload=workload, seed=seed, duration=duration, end=end, fleet=dict(fleet),
                     usage=usage, events=0, records=records)


# --------------------------------------------------------------------------- the comparison


class Diagnostics(msgspec.Struct, frozen=True, kw_only=True):
    """Where live and simulated runs part, job by job (live vs the lagged simulation)."""

    submit_lag_p99_ms: float
    """Driver's lateness against the schedule."""
    overhead_p50_ms: float
    overhead_p99_ms: float
    """Live queue time (submission to start of inference) of jobs on the same pool live and simulated
    that started at once in simulation: mostly the broker's own overhead (submit, route, pool read)."""
    same_pool: float
    """Share of jobs routed to the same pool live and in simulation."""
    ttft_ratio: float | None
    """Median live/sim service TTFT (start to first token) of jobs on the same pool."""
    tpot_ratio: float | None
    """Median live/sim time per output token of jobs on the same pool."""
    slo_met_mismatch: int
    """Live jobs whose worker-reported ``slo_met`` disagrees with :func:`evaluation.records.meets`."""
    unfinished: int


class Comparison(msgspec.Struct, kw_only=True):
    workload: str
    rate: float
    duration: float
    seed: int
    fleet: dict[str, int]
    policy: str
    snapshot_s: float
    heartbeat_s: float
    jobs: int
    live: list[dict[str, ClassMetrics]]
    """One per repeat."""
    sim: dict[str, ClassMetrics]
    """The simulator with the live worker's snapshot and telemetry lags."""
    sim_exact: dict[str, ClassMetrics]
    """The simulator with exact pool state and observations (``inference-broker simulate``'s default)."""
    ensemble: list[dict[str, float]]
    """Attainment by class of each perturbed simulation (:func:`perturbed`)."""
    diagnostics: list[Diagnostics]
    wall_s: list[float]

    def diffs(self, cls: str) -> list[float]:
        """Live minus lagged-simulation attainment, in points, per repeat."""
        return [100 * (run[cls].attainment - self.sim[cls].attainment) for run in self.live if cls in run]


def diagnose(live: LiveRun, live_res: SimResult, sim: SimResult) -> Diagnostics:
    lag = [(s - live.t0 - p) * 1000 for s, p in zip(live.submitted, live.planned, strict=True) if not math.isnan(s)]
    overhead: list[float] = []
    ttft_ratio: list[float] = []
    tpot_ratio: list[float] = []
    same = 0
    mismatch = 0
    for lr, sr, res in zip(live_res.records, sim.records, live.results, strict=True):
        if lr.pool is not None and lr.pool == sr.pool:
            same += 1
        if lr.status != "ok" or sr.status != "ok":
            continue
        if res is not None and res.slo_met is not None and res.slo_met != lr.slo_met:
            mismatch += 1
        assert lr.start is not None and sr.start is not None and lr.first_token is not None
        assert sr.first_token is not None
        if lr.pool != sr.pool:
            continue
        if sr.start - sr.arrival < 1e-9:
            overhead.append((lr.start - lr.arrival) * 1000)
        s_ttft = sr.first_token - sr.start
        if s_ttft > 0:
            ttft_ratio.append((lr.first_token - lr.start) / s_ttft)
        if lr.tpot_ms is not None and sr.tpot_ms:
            tpot_ratio.append(lr.tpot_ms / sr.tpot_ms)
    return Diagnostics(
        submit_lag_p99_ms=percentile(lag, 0.99) or 0.0,
        overhead_p50_ms=percentile(overhead, 0.5) or 0.0, overhead_p99_ms=percentile(overhead, 0.99) or 0.0,
        same_pool=same / len(sim.records) if sim.records else 1.0,
        ttft_ratio=median(ttft_ratio) if ttft_ratio else None, tpot_ratio=median(tpot_ratio) if tpot_ratio else None,
        slo_met_mismatch=mismatch, unfinished=sum(r.status == "unfinished" for r in live_res.records))


def perturbed(arrivals: Sequence[Arrival], snapshot_s: float, heartbeat_s: float,
              rng: random.Random) -> tuple[list[Arrival], SimOptions]:
    """The same jobs and lags with the timing freedoms of a live run drawn at random (see the module docs)."""
    moved = sorted((Arrival(a.at + rng.uniform(0.0, OVERHEAD_S), a.job, a.hint) for a in arrivals),
                   key=lambda a: a.at)
    return moved, SimOptions(snapshot_interval_s=snapshot_s + rng.uniform(0.0, REFRESH_S),
                             observation_interval_s=heartbeat_s + rng.uniform(0.0, snapshot_s))


def compare(workload: str = "chat", *, rate: float | None = None, duration: float = 25.0, seed: int = 1,
            fleet: str | dict[str, int] = "gpu=1,accel=1", policy: str = "slo", repeat: int = 1,
            snapshot_s: float = 0.25, heartbeat_s: float = 1.0, drain_s: float = 120.0, ensemble: int = 10,
            redis_url: str | None = None, log_dir: Path | None = None, progress: bool = False) -> Comparison:
    """Run the workload live ``repeat`` times and in the simulator; per-class metrics of both."""
    if policy not in LIVE_ROUTERS:
        raise SystemExit(f"--policy: {policy!r} is not a live router ({', '.join(LIVE_ROUTERS)})")
    work = WORKLOADS[workload] if rate is None else WORKLOADS[workload].at_rate(rate)
    with tempfile.TemporaryDirectory(prefix="live-vs-sim-") as tmp:
        config_path = Path(tmp) / "policy.toml"
        config_path.write_text(policy_toml(policy), encoding="utf-8")
        config = load_config(config_path)
        sizes = parse_fleet(fleet, config) if isinstance(fleet, str) else {**dict.fromkeys(config.pools, 0), **fleet}
        arrivals = generate(work, seed, duration)
        lagged = SimOptions(snapshot_interval_s=snapshot_s, observation_interval_s=heartbeat_s)
        sim = simulate(config, ROUTERS[policy](config), arrivals, sizes, seed, duration, options=lagged)
        exact = simulate(config, ROUTERS[policy](config), arrivals, sizes, seed, duration)
        sim_sum, exact_sum = summarize(sim, config), summarize(exact, config)
        rng = random.Random(seed)
        spread: list[dict[str, float]] = []
        for _ in range(ensemble):
            moved, options = perturbed(arrivals, snapshot_s, heartbeat_s, rng)
            one = summarize(simulate(config, ROUTERS[policy](config), moved, sizes, seed, duration, options=options),
                            config)
            spread.append({k: m.attainment for k, m in one.items()})
        lives: list[dict[str, ClassMetrics]] = []
        diags: list[Diagnostics] = []
        walls: list[float] = []
        for k in range(repeat):
            log = (log_dir or Path(tmp)) / f"stack-{k}.log"
            live = run_live(config_path, sizes, arrivals, snapshot_s=snapshot_s, heartbeat_s=heartbeat_s,
                            drain_s=drain_s, redis_url=redis_url, log_path=log)
            res = live_result(live, arrivals, config, sizes, policy=policy, workload=workload, seed=seed,
                              duration=duration)
            lives.append(summarize(res, config))
            diags.append(diagnose(live, res, sim))
            walls.append(live.wall_s)
            if progress:
                got = ", ".join(f"{name} {100 * m.attainment:.1f}% (sim {100 * sim_sum[name].attainment:.1f}%)"
                                for name, m in lives[-1].items() if name != "all")
                print(f"run {k + 1}/{repeat}: {got}; {live.wall_s:.1f} s", file=sys.stderr, flush=True)
    return Comparison(workload=workload, rate=work.rate, duration=duration, seed=seed, fleet=sizes, policy=policy,
                      snapshot_s=snapshot_s, heartbeat_s=heartbeat_s, jobs=len(arrivals), live=lives,
                      sim=sim_sum, sim_exact=exact_sum, ensemble=spread, diagnostics=diags,
                      wall_s=walls)


# --------------------------------------------------------------------------- the report


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _intro(c: Comparison, command: str) -> list[str]:
    cpu = os.cpu_count()
    return [
        "# Live stack vs simulator",
        "",
        "Generated by `python -m bench.live_vs_sim` (do not edit by hand; rerun). The same seeded arrivals go "
        "through the live stack (Redis, one policy worker process and the pools' worker processes on simulated "
        "devices, each job submitted at its arrival time) and through `evaluation.simulator` with the same config "
        "and fleet. Attainment: share of *all* the class's jobs whose TTFT from submission, time per output token "
        "and end-to-end time met the class targets (`evaluation.records.meets` and `summarize` on both sides); "
        "rejected and unfinished jobs are misses. Each live job has a prompt of exactly 4 characters per prompt "
        "token (the broker's estimate is `chars // 4`), `max_tokens` = the arrival's output tokens and the "
        "arrival's class as its `slo` hint.",
        "",
        f"- Machine: {cpu}-core python-svc ({platform.machine()}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}); Redis, the policy worker, the worker processes and the "
        "driver share it.",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{command}`",
        f"- Policy `{c.policy}`: the built-in `broker/default.toml` + `[routing] policy = \"{c.policy}\"`, "
        "admission on (every class `on_unattainable = \"shed\"`, the default: a shed job is a miss). Live "
        f"policy worker: snapshot every {c.snapshot_s:g} s (`IB_SNAPSHOT_S`), worker heartbeats carrying job "
        f"timings every {c.heartbeat_s:g} s (`IB_HEARTBEAT_S`).",
        f"- **sim**: the simulator with these lags (`SimOptions(snapshot_interval_s={c.snapshot_s:g}, "
        f"observation_interval_s={c.heartbeat_s:g})`): the comparison that counts. **sim spread**: mean "
        f"(lowest..highest) of {len(c.ensemble)} simulations of the same jobs with the live run's timing freedoms "
        f"drawn at random (arrivals moved by up to {OVERHEAD_S * 1000:g} ms, snapshot period + up to "
        f"{REFRESH_S * 1000:g} ms, observation period + up to one snapshot period): how far two runs of the same "
        "system land apart near the knee, where one flipped decision changes the rest of the run. **sim exact**: "
        "the `inference-broker simulate` default (exact pool state, each job observed as it finishes).",
        "",
    ]


def _section(c: Comparison) -> list[str]:
    classes = [k for k in c.sim if k != "all"] + ["all"]
    fleet = ", ".join(f"{p}={n}" for p, n in c.fleet.items())
    n = len(c.live)
    lines = [
        f"## {c.workload} at {c.rate:g} jobs/s, {c.duration:g} s, seed {c.seed}, fleet {fleet}",
        "",
        f"{c.jobs} jobs; {n} live run{'s' if n > 1 else ''} (latencies, accelerator shares and jobs shed: run 1).",
        "",
        "| class | jobs | live mean (lowest..highest) | sim | live - sim (points) | sim spread | sim exact "
        "| TTFT p50/p99 live (ms) | TTFT p50/p99 sim (ms) | accel share live / sim | shed live / sim |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    first = c.live[0]
    for k in classes:
        lv, sm, ex = first[k], c.sim[k], c.sim_exact[k]
        runs = [run[k].attainment for run in c.live]
        mean = sum(runs) / len(runs)
        ens = [e[k] for e in c.ensemble if k in e]
        spread = f"{_pct(sum(ens) / len(ens))} ({_pct(min(ens))}..{_pct(max(ens))})" if ens else "-"
        live_cell = _pct(mean) if n == 1 else f"{_pct(mean)} ({_pct(min(runs))}..{_pct(max(runs))})"
        lines.append(f"| {k} | {sm.jobs} | {live_cell} | {_pct(sm.attainment)} | "
                     f"{100 * (mean - sm.attainment):+.1f} | {spread} | {_pct(ex.attainment)} | "
                     f"{_ms(lv.ttft_p50_ms)} / {_ms(lv.ttft_p99_ms)} | {_ms(sm.ttft_p50_ms)} / {_ms(sm.ttft_p99_ms)} | "
                     f"{lv.accel_share:.0%} / {sm.accel_share:.0%} | {lv.rejected} / {sm.rejected} |")
    lines += ["", "| run | " + " | ".join(f"{k}: live (live - sim)" for k in classes) +
              " | driver lag p99 | broker overhead p50/p99 | same pool | service TTFT / TPOT live/sim "
              "| slo_met mismatches | unfinished | wall s |",
              "|---|" + "---|" * len(classes) + "---|---|---|---|---|---|---|"]
    for i, (run, g) in enumerate(zip(c.live, c.diagnostics, strict=True)):
        cells = [f"{_pct(run[k].attainment)} ({100 * (run[k].attainment - c.sim[k].attainment):+.1f})"
                 for k in classes]
        ratio = "-" if g.ttft_ratio is None else f"{g.ttft_ratio:.3f}"
        tpot = "-" if g.tpot_ratio is None else f"{g.tpot_ratio:.3f}"
        lines.append(f"| {i + 1} | " + " | ".join(cells) + f" | {g.submit_lag_p99_ms:.1f} ms | "
                     f"{g.overhead_p50_ms:.1f} / {g.overhead_p99_ms:.0f} ms | {g.same_pool:.1%} | {ratio} / {tpot} | "
                     f"{g.slo_met_mismatch} | {g.unfinished} | {c.wall_s[i]:.1f} |")
    if n > 1:
        ranges = []
        for k in classes:
            diffs = c.diffs(k)
            ranges.append(f"{min(diffs):+.1f} .. {max(diffs):+.1f} (mean {sum(diffs) / len(diffs):+.1f})")
        lines.append("| live - sim, points | " + " | ".join(ranges) + " | | | | | | | |")
    lines.append("")
    return lines


NOTES = [
    "Per-run columns: *driver lag*, how late the driver submitted against the schedule; *broker overhead*, the "
    "live queue time (submission to start of inference) of jobs on the same pool that started at once in "
    "simulation (a live pool whose load has drifted from the simulated one makes a few of them wait: the p99); "
    "*same pool*, share of jobs the live policy worker sent where the simulated router did; *service TTFT / "
    "TPOT*, median per-job ratio live/sim over jobs on the same pool (1.000: the simulated device follows its "
    "profile as the simulator does); *slo_met mismatches*, the worker's own `slo_met` against "
    "`evaluation.records.meets` on the same timings.",
    "",
    "Both sides take lagged snapshots on a clock (the simulator an event every `snapshot_interval_s`, the live "
    "policy worker a refresh every `snapshot_s`), and both order a pool's waiting jobs by class priority (the "
    "simulator's priority queues, the workers' priority lanes). What remains: the live clock's phase and "
    "jitter, the driver's lag, and Python's scheduling; near the knee one flipped decision changes the rest "
    "of a run, which the *sim spread* rows show.",
    "",
]


def report(comparisons: Sequence[Comparison], command: str) -> str:
    """The comparisons as Markdown: setup, then per workload/rate a per-class table and every run."""
    lines = _intro(comparisons[0], command)
    for c in comparisons:
        lines += _section(c)
    return "\n".join(lines + NOTES)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.live_vs_sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="chat")
    parser.add_argument("--rate", default="38", help="mean arrivals per second; several: 38,40 (default: 38)")
    parser.add_argument("--duration", type=float, default=25.0, help="seconds of arrivals (default: 25)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fleet", default="gpu=1,accel=1",
                        help="workers per pool, POOL=N,... (default: gpu=1,accel=1)")
    parser.add_argument("--policy", default="slo", choices=LIVE_ROUTERS,
                        help="live router (default: slo)")
    parser.add_argument("--repeat", type=int, default=1, help="live runs per rate (the simulator is deterministic)")
    parser.add_argument("--snapshot-s", type=float, default=0.25, help="live policy snapshot period (IB_SNAPSHOT_S)")
    parser.add_argument("--heartbeat-s", type=float, default=1.0, help="live heartbeat period (IB_HEARTBEAT_S)")
    parser.add_argument("--drain-s", type=float, default=120.0, help="wait this long after the last arrival")
    parser.add_argument("--ensemble", type=int, default=10, help="perturbed simulations for the sim spread")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown report (default: bench/LIVE_VS_SIM.md)")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    args = parser.parse_args(argv)
    try:
        rates = [float(r) for r in args.rate.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rate: {args.rate!r} is not a number or a comma-separated list of numbers")
    comparisons = []
    for rate in rates:
        print(f"{args.workload} at {rate:g} jobs/s:", file=sys.stderr, flush=True)
        comparisons.append(compare(args.workload, rate=rate, duration=args.duration, seed=args.seed,
                                   fleet=args.fleet, policy=args.policy, repeat=args.repeat,
                                   snapshot_s=args.snapshot_s, heartbeat_s=args.heartbeat_s, drain_s=args.drain_s,
                                   ensemble=args.ensemble, progress=True))
    command = "python -m bench.live_vs_sim " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    text = report(comparisons, command.strip())
    print(text)
    if not args.no_write:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
