"""The four figures of ``inference-broker report``, drawn from a :class:`~cli.runstats.Report`.

* ``latency_cdf.png``: TTFT and end-to-end CDFs per class and pool, with the TTFT targets;
* ``attainment.png``: SLO attainment over time per class, by submission time;
* ``routing_share.png``: each pool's share of the jobs over time;
* ``cost.png``: busy cost over time per pool, and dollars per million output tokens.

matplotlib is imported only here, when drawing: it is the ``report`` extra.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from broker.errors import BrokerError
from broker.wire import Result
from cli.runstats import Report, by_key

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


