"""The demo: a mixed workload through a live stack, then a table per SLO class and pool.

The workload mixes interactive chat (short prompts), standard completions, long batch
generations and embeddings across two models, with Poisson arrivals from a seeded
generator, so a run is repeatable.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from broker.client import Client
from broker.wire import ChatMessage, Job, Result

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
