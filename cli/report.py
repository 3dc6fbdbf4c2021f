"""``inference-broker report``: plots and one self-contained HTML page about a run's results.

Results come from a result stream or from a file of JSON lines (``results --export``,
``demo --json``). The page has the summary table (per class and per pool, see
:mod:`cli.runstats` for the definitions) and four figures, embedded as base64 PNGs that
are also written next to it:

* ``latency_cdf.png``: TTFT and end-to-end CDFs per class and pool, with the TTFT targets;
* ``attainment.png``: SLO attainment over time per class, by submission time;
* ``routing_share.png``: each pool's share of the jobs over time;
* ``cost.png``: busy cost over time per pool, and dollars per million output tokens.

matplotlib is imported only here, when drawing: it is the ``report`` extra.
"""

from __future__ import annotations

import base64
import html
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import redis.asyncio as aioredis

from broker.errors import BrokerError
from broker.wire import DECODE_ERRORS, Result, decode_result
from cli.runstats import STATUSES, GroupStats, busy_costs, by_key, group_stats, results_of, span_text
from policies.config import PolicyConfig

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FIGURES = {
    "latency_cdf.png": ("Latency CDF per class and pool",
                        "Share of each class's jobs on each pool (line style) at or below a latency; dotted "
                        "verticals: the classes' TTFT targets."),
    "attainment.png": ("SLO attainment over time per class",
                       "Share of the jobs submitted in each interval that met their class's target; dashed: "
                       "the classes' attainment goals."),
    "routing_share.png": ("Routing share over time per pool",
                          "Where the jobs submitted in each interval went (a job that ran nowhere is under its "
                          "status)."),
    "cost.png": ("Cost",
                 "Busy cost as results came in, per pool, and busy dollars per million output tokens per class "
                 "and pool."),
}
NICE_BINS = (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)
LINESTYLES = ("-", "--", ":", "-.")
# matplotlib reads text between two `$` as mathtext: every dollar sign in a label is escaped.
MARKERS = ("o", "s", "^", "D", "v", "P")


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


async def read_stream(client: aioredis.Redis, stream: str, page: int = 1000) -> list[Result]:
    """Every result on ``stream``, oldest first (entries without a ``result`` field are skipped)."""
    results: list[Result] = []
    start = "-"
    while True:
        entries = await client.xrange(stream, start, "+", count=page)
        results += results_of(entries)
        if len(entries) < page:
            return results
        start = "(" + entries[-1][0].decode()


class Report(msgspec.Struct, kw_only=True):
    """Everything the page shows, computed once."""

    title: str
    results: list[Result]
    config: PolicyConfig
    classes: list[GroupStats]
    pools: list[GroupStats]
    cells: dict[str, list[GroupStats]]
    """Per class: one entry per pool it ran on."""
    costs: dict[str, float]
    start: float | None
    """Earliest submission among the results with timings (the time axis' zero)."""
    span_s: float
    """First submission to last finish."""
    submit_span_s: float
    """First to last submission: the range of the time-binned figures."""
    untimed: int
    """Results without timings (not run): counted in the tables, absent from the time plots."""


def build(results: Sequence[Result], config: PolicyConfig, title: str = "inference-broker run") -> Report:
    """Summaries of ``results`` for the tables and figures."""
    prices = {name: pool.cost_per_hour for name, pool in config.pools.items()}
    costs = busy_costs(results, prices)
    timed = [r for r in results if r.timing is not None]
    start = min((r.timing.created_at for r in timed if r.timing), default=None)
    end = max((r.timing.finished_at for r in timed if r.timing), default=None)
    last = max((r.timing.created_at for r in timed if r.timing), default=None)
    classes = by_key(results, "slo")
    return Report(
        title=title, results=list(results), config=config, costs=costs,
        classes=[group_stats(name, rows, costs) for name, rows in classes.items()],
        pools=[group_stats(name, rows, costs) for name, rows in by_key(results, "pool").items()],
        cells={name: [group_stats(pool, cell, costs) for pool, cell in by_key(rows, "pool").items()]
               for name, rows in classes.items()},
        start=start, span_s=(end - start) if start is not None and end is not None else 0.0,
        submit_span_s=(last - start) if start is not None and last is not None else 0.0,
        untimed=len(results) - len(timed))


# --------------------------------------------------------------------------- figures


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BrokerError("`inference-broker report` draws with matplotlib, which is not installed: "
                          "pip install 'inference-broker[report]'") from None
    return Figure


def _colours(names: Sequence[str]) -> dict[str, str]:
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f")
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _bin_width(span_s: float) -> float:
    return next((w for w in NICE_BINS if span_s / w <= 20), NICE_BINS[-1])


def _bins(rep: Report, rows: Sequence[Result]) -> tuple[list[float], list[list[Result]]]:
    """Jobs with timings by submission time: bin centres (s since the start) and each bin's jobs."""
    width = _bin_width(rep.submit_span_s)
    count = max(1, math.ceil(rep.submit_span_s / width))
    bins: list[list[Result]] = [[] for _ in range(count)]
    for r in rows:
        if r.timing is not None and rep.start is not None:
            bins[min(count - 1, int((r.timing.created_at - rep.start) / width))].append(r)
    return [(i + 0.5) * width for i in range(count)], bins


def _style(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _latency(rep: Report, fig: Figure, class_colour: dict[str, str], pool_style: dict[str, str]) -> None:
    axes = fig.subplots(1, 2, sharey=True)
    for ax, field, label in ((axes[0], "time_to_first_token_ms", "TTFT"), (axes[1], "e2e_latency_ms", "end-to-end")):
        for slo, rows in by_key(rep.results, "slo").items():
            for pool, cell in by_key(rows, "pool").items():
                values = sorted(getattr(r.metrics, field) for r in cell if r.metrics is not None)
                if values:
                    ys = [(i + 1) / len(values) for i in range(len(values))]
                    ax.step(values, ys, where="post", color=class_colour[slo], linestyle=pool_style[pool],
                            linewidth=1.6, label=f"{slo} on {pool} ({len(values)})")
        if field == "time_to_first_token_ms":
            for slo, cls in rep.config.classes.items():
                if slo in class_colour:
                    ax.axvline(cls.ttft_ms, color=class_colour[slo], linewidth=0.9, alpha=0.6, linestyle=(0, (2, 2)))
                    ax.annotate(f"{slo} target", (cls.ttft_ms, 0.02), rotation=90, fontsize=7,
                                color=class_colour[slo], ha="right", va="bottom")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        _style(ax, f"{label} (from submission)", "milliseconds (log scale)", "share of jobs at or below" if
               ax is axes[0] else "")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, max(1, len(labels))), fontsize=9,
               frameon=False)


def _attainment(rep: Report, fig: Figure, class_colour: dict[str, str]) -> None:
    ax = fig.subplots()
    lowest = 100.0
    groups = by_key(rep.results, "slo")
    goals: dict[float, list[str]] = {}
    for i, (slo, rows) in enumerate(groups.items()):
        centres, bins = _bins(rep, rows)
        points = [(c, 100 * sum(r.slo_met is True for r in b) / len(b)) for c, b in zip(centres, bins, strict=True)
                  if b]
        if points:
            # Wider lines first: classes that overlap (all at 100%) stay visible under each other.
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=MARKERS[i % len(MARKERS)],
                    markersize=5, linewidth=1.2 + 2.0 * (len(groups) - 1 - i) / max(1, len(groups) - 1),
                    color=class_colour[slo], alpha=0.85, label=f"{slo} ({len(rows)} jobs)")
            lowest = min(lowest, *(p[1] for p in points))
        cls = rep.config.classes.get(slo)
        if cls is not None:
            goals.setdefault(100 * cls.attainment, []).append(slo)
    for n, (goal, names) in enumerate(goals.items()):
        ax.axhline(goal, color="#555", linewidth=0.9, linestyle=LINESTYLES[1 + n % 3],
                   label=f"goal {goal:g}%: {', '.join(names)}")
        lowest = min(lowest, goal)
    ax.set_ylim(max(0.0, math.floor(lowest / 10) * 10 - 10), 101.5)
    ax.set_xlim(0, max(_bin_width(rep.submit_span_s), rep.submit_span_s))
    _style(ax, f"Share of each class's jobs that met its target, per {_bin_width(rep.submit_span_s):g} s of "
               "submissions", "seconds since the first submission", "SLO met (%)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


def _routing(rep: Report, fig: Figure, pool_colour: dict[str, str]) -> None:
    ax = fig.subplots()
    centres, bins = _bins(rep, rep.results)
    pools = list(pool_colour)
    shares = [[100 * sum((r.pool or r.status) == pool for r in b) / len(b) if b else 0.0 for b in bins]
              for pool in pools]
    width = _bin_width(rep.submit_span_s)
    bottom = [0.0] * len(centres)
    for pool, row in zip(pools, shares, strict=True):
        ax.bar(centres, row, width=width * 0.92, bottom=bottom, color=pool_colour[pool], label=pool)
        bottom = [b + v for b, v in zip(bottom, row, strict=True)]
    ax.set_ylim(0, 100)
    ax.set_xlim(0, len(centres) * width)
    _style(ax, f"Where jobs went, per {width:g} s of submissions", "seconds since the first submission",
           "share of jobs (%)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


def _cost(rep: Report, fig: Figure, pool_colour: dict[str, str]) -> None:
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    for pool in pool_colour:
        done = sorted((r.timing.finished_at - (rep.start or 0.0), rep.costs[r.id]) for r in rep.results
                      if r.pool == pool and r.timing is not None and r.id in rep.costs)
        if done:
            total, xs, ys = 0.0, [0.0], [0.0]
            for at, cost in done:
                total += cost
                xs.append(at)
                ys.append(total)
            left.step(xs, ys, where="post", color=pool_colour[pool], linewidth=1.8,
                      label=f"{pool}: \\${total:.4f} (\\${rep.config.pools[pool].cost_per_hour:g}/h per worker)")
    _style(left, "Busy cost so far (each worker's price split over its running jobs)",
           "seconds since the first submission", "dollars")
    left.legend(fontsize=8, loc="best", frameon=False)
    labels, values, colours = [], [], []
    for slo, cells in rep.cells.items():
        for cell in cells:
            if cell.cost_per_mtok is not None:
                labels.append(f"{slo}\n{cell.name}")
                values.append(cell.cost_per_mtok)
                colours.append(pool_colour.get(cell.name, "#7f7f7f"))
    right.bar(range(len(values)), values, color=colours)
    right.set_xticks(range(len(values)), labels, fontsize=8)
    for i, v in enumerate(values):
        right.annotate(f"\\${v:.2f}", (i, v), ha="center", va="bottom", fontsize=8)
    _style(right, "Busy \\$ per million output tokens", "", "dollars")


def draw(rep: Report, out: Path) -> dict[str, Path]:
    """Write the four PNGs into ``out``; returns file name to path."""
    figure = _figure_class()
    classes = list(by_key(rep.results, "slo"))
    pools = [p for p in rep.config.pools if any(r.pool == p for r in rep.results)]
    pools += [p.name for p in rep.pools if p.name not in pools]  # not run: by status
    class_colour = _colours(classes)
    pool_colour = _colours(pools)
    pool_style = {p: LINESTYLES[i % len(LINESTYLES)] for i, p in enumerate(pools)}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    drawers: list[tuple[str, tuple[float, float], Callable[[Figure], None]]] = [
        ("latency_cdf.png", (12, 4.8), lambda f: _latency(rep, f, class_colour, pool_style)),
        ("attainment.png", (12, 4.2), lambda f: _attainment(rep, f, class_colour)),
        ("routing_share.png", (12, 4.2), lambda f: _routing(rep, f, pool_colour)),
        ("cost.png", (12, 4.5), lambda f: _cost(rep, f, pool_colour)),
    ]
    for name, size, draw_one in drawers:
        fig = figure(figsize=size, dpi=100, layout="constrained")
        draw_one(fig)
        paths[name] = out / name
        fig.savefig(paths[name], format="png")
    return paths


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

