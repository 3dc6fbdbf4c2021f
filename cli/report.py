"""``inference-broker report``: one self-contained HTML page about a run's results.

Results come from a result stream (every shard's, merged in time order) or from a file of
JSON lines (``results --export``, ``demo --json``). The page has the summary table (per
class and per pool, see :mod:`cli.runstats` for the definitions) and the figures of
:mod:`cli.plots`, embedded as base64 PNGs that are also written next to it.
"""

from __future__ import annotations

import asyncio
import base64
import html
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from broker.errors import BrokerError
from broker.wire import DECODE_ERRORS, Result, decode_result
from cli.runstats import STATUSES, results_of, span_text
from policies.config import PolicyConfig

if TYPE_CHECKING:
    pass

from cli.plots import FIGURES, draw
from cli.runstats import Report, build


def load_file(path: Path, text: bytes | None = None) -> list[Result]:
    """Results from a JSON-lines file; an error names the line and what is wrong."""
    try:
        data = path.read_bytes() if text is None else text
    except OSError as exc:
        raise BrokerError(f"cannot read {path}: {exc.strerror}") from None
    results = []
    for number, line in enumerate(data.splitlines(), 1):
        if line.strip():
            try:
                results.append(decode_result(line))
            except DECODE_ERRORS as exc:
                raise BrokerError(f"{path} line {number}: not a result ({exc}). Expected one Result JSON per "
                                  "line, as `inference-broker results --export FILE` writes.") from None
    return results


async def read_streams(client: aioredis.Redis, streams: Sequence[str], page: int = 1000) -> list[Result]:
    """Every result on ``streams`` (one per shard), oldest first (entries without a ``result`` field are skipped)."""

    async def entries_of(stream: str) -> list[tuple[bytes, Any]]:
        entries: list[tuple[bytes, Any]] = []
        start = "-"
        while True:
            got = await client.xrange(stream, start, "+", count=page)
            entries += got
            if len(got) < page:
                return entries
            start = "(" + got[-1][0].decode()

    shards = await asyncio.gather(*map(entries_of, streams))
    entries = [entry for found in shards for entry in found]
    if len(shards) > 1:  # each shard's are in order: the merge orders them by time
        entries.sort(key=lambda entry: tuple(map(int, entry[0].split(b"-"))))
    return results_of(entries)


# --------------------------------------------------------------------------- page

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1240px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 2em; }
.lead { color: #555; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { padding: 0.3em 0.8em; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; }
td:first-child, th:first-child, .pools td:last-child, .pools th:last-child { text-align: left; }
.miss { color: #b00020; font-weight: 600; } .met { color: #1b7a1b; font-weight: 600; }
figure { margin: 1.5em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.92em; }
"""


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}" if value < 1 else f"${value:.2f}"


def page(rep: Report, images: dict[str, Path]) -> str:
    """The HTML page: summary, tables and the figures inline."""
    e = html.escape
    total = len(rep.results)
    busy = sum(rep.costs.values())
    workers = {(r.pool, r.worker) for r in rep.results if r.pool in rep.config.pools and r.worker}
    provisioned = sum(rep.config.pools[p].cost_per_hour for p, _w in workers if p) * rep.span_s / 3600
    ok = sum(r.status == "ok" for r in rep.results)
    met = sum(r.slo_met is True for r in rep.results)
    default = rep.config.default_pool
    elsewhere = sum(r.pool is not None and r.pool != default for r in rep.results)
    lead = (f"{total} jobs over {rep.span_s:.1f} s ({total / rep.span_s if rep.span_s else 0:.1f} jobs/s); "
            f"{ok} ok; SLO met for {_pct(met / total if total else None)} of all jobs; "
            f"accelerator share {_pct(elsewhere / total if total else None)} (jobs on pools other than the "
            f"default, {default}); "
            f"busy cost {_money(busy)}; the {len(workers)} worker(s) seen cost {_money(provisioned)} over the run.")
    rows = []
    for c in rep.classes:
        goal = rep.config.classes[c.name].attainment if c.name in rep.config.classes else None
        verdict = "" if goal is None or c.attainment is None else ("met" if c.attainment >= goal else "miss")
        target = f" (goal {100 * goal:.0f}%)" if goal is not None else ""
        cells = [e(c.name), str(c.jobs), *(str(c.statuses[s]) for s in STATUSES),
                 *(_ms(v) for v in (c.ttft_p50_ms, c.ttft_p99_ms, c.e2e_p50_ms, c.e2e_p99_ms)),
                 f'<span class="{verdict}">{_pct(c.attainment)}</span>{target}',
                 _money(c.cost_per_mtok)]
        rows.append("<tr>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    class_head = ["class", "jobs", *STATUSES, "TTFT p50", "TTFT p99", "e2e p50", "e2e p99", "SLO attainment",
                  "$/M out tok"]
    pool_rows = []
    for p in rep.pools:
        per_class = ", ".join(f"{e(slo)} {100 * sum(c.jobs for c in cells if c.name == p.name) / cls.jobs:.0f}%"
                              for slo, cells in rep.cells.items() for cls in rep.classes if cls.name == slo
                              if any(c.name == p.name for c in cells))
        cells_p = [e(p.name), str(p.jobs), _pct(p.jobs / total if total else None),
                   span_text(p.ttft_p50_ms, p.ttft_p99_ms), span_text(p.e2e_p50_ms, p.e2e_p99_ms),
                   _money(p.cost_usd), per_class or "-"]
        pool_rows.append("<tr>" + "".join(f"<td>{x}</td>" for x in cells_p) + "</tr>")
    pool_head = ["pool", "jobs", "share", "TTFT p50/p99", "e2e p50/p99", "busy cost", "of each class's jobs"]
    figures = []
    for name, (heading, caption) in FIGURES.items():
        data = base64.b64encode(images[name].read_bytes()).decode()
        figures.append(f'<figure id="{name[:-4]}"><h2>{e(heading)}</h2><img alt="{e(heading)}" '
                       f'src="data:image/png;base64,{data}"><figcaption>{e(caption)} ({e(name)})</figcaption>'
                       "</figure>\n")
    note = (f"<p class=lead>{rep.untimed} job(s) without timings (not run: rejected, expired or failed before "
            "a worker took them) are counted in the tables but absent from the time plots.</p>"
            if rep.untimed else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(rep.title)}</title><style>{CSS}</style></head>
<body>
<h1>{e(rep.title)}</h1>
<p class="lead">{e(lead)}</p>
<h2 id="summary">Per SLO class</h2>
<table><tr>{"".join(f"<th>{h}</th>" for h in class_head)}</tr>
{"".join(rows)}
</table>
<h2 id="pools">Per pool</h2>
<table class="pools"><tr>{"".join(f"<th>{h}</th>" for h in pool_head)}</tr>
{"".join(pool_rows)}
</table>
{note}
<p class="lead">Latencies are measured from submission (queueing included); percentiles are over the jobs that
ran. Attainment counts every job of the class: failed, expired and rejected jobs count as misses. Busy cost splits
each worker's hourly price evenly over the jobs running on it at each instant.</p>
{"".join(figures)}
<p class="lead">Generated by inference-broker report at {time.strftime("%Y-%m-%d %H:%M:%S %Z")}.</p>
</body></html>
"""


def write(results: Sequence[Result], out: Path, config: PolicyConfig, title: str | None = None) -> Path:
    """Draw the figures and write ``out/index.html``; returns the page's path."""
    if not results:
        raise BrokerError("no results to report on: run some jobs first (`inference-broker demo`), or point "
                          "--reply-to / --input at the results of a run")
    rep = build(results, config, title or "inference-broker run")
    images = draw(rep, out)
    index = out / "index.html"
    index.write_text(page(rep, images), encoding="utf-8")
    return index

