"""bench/gateway.py's measurements as the "Gateway" section of bench/RESULTS.md."""

from __future__ import annotations

import argparse
import os
import time
from importlib import metadata
from typing import TYPE_CHECKING

from bench.harness import percentile
from bench.throughput import command_line

if TYPE_CHECKING:
    from bench.gateway import Level, Offered

PACKAGES = ("uvicorn", "starlette", "httptools", "uvloop", "redis", "hiredis", "msgspec", "aiohttp")


def _versions() -> str:
    out = []
    for name in PACKAGES:
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name} (not installed)")
    return ", ".join(out)


def _pcts(values: list[float]) -> str:
    return " / ".join(f"{percentile(values, q):.2f}" for q in (50, 99, 99.9)) if values else "-"


def latency_table(args: argparse.Namespace, lat: dict[str, Offered], cpu_ms: float) -> list[str]:
    sdk, gw = lat["sdk"], lat["gateway"]
    added = " / ".join(f"{percentile(gw.latencies_ms, q) - percentile(sdk.latencies_ms, q):+.2f}"
                       for q in (50, 99, 99.9))
    return [
        f"### Added latency at {args.rate:g} requests/s",
        "",
        f"Chat, `max_tokens` 1, model `noop` on the instant device; {args.repeats} round(s) of "
        f"{args.seconds:g} s per path, alternating, after a warm-up.",
        "",
        "| path | requests | errors | p50 / p99 / p99.9 ms | sender behind schedule (max ms) |",
        "|---|---:|---:|---:|---:|",
        f"| SDK: `Client.run` | {len(sdk.latencies_ms):,} | {sdk.errors} | {_pcts(sdk.latencies_ms)} | "
        f"{sdk.behind_ms:.1f} |",
        f"| gateway: `POST /v1/chat/completions` | {len(gw.latencies_ms):,} | {gw.errors} | "
        f"{_pcts(gw.latencies_ms)} | {gw.behind_ms:.1f} |",
        f"| **added by the gateway** | | | **{added}** | |",
        "",
        f"The gateway process spent {cpu_ms:.2f} ms of CPU per request.",
    ]


def streams_table(args: argparse.Namespace, levels: list[Level]) -> list[str]:
    lines = [
        "### Concurrent streams",
        "",
        f"N streaming chats (`{args.max_tokens}` tokens each, `stream_options.include_usage`) opened at once "
        f"on simulated H100s (bench/gateway_streams.toml). A level holds when every stream ends with all "
        f"its tokens and the p99 relay lag is at most {args.lag_bound_ms:g} ms.",
        "",
        "| streams | complete | first token at client p50 / p99 ms | relay lag p50 / p99 ms | level s | "
        "gateway CPU s | gateway RSS MB | holds |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for lv in levels:
        ttft = f"{percentile(lv.ttft_ms, 50):.0f} / {percentile(lv.ttft_ms, 99):.0f}" if lv.ttft_ms else "-"
        lag = f"{percentile(lv.lag_ms, 50):.0f} / {percentile(lv.lag_ms, 99):.0f}" if lv.lag_ms else "-"
        lines.append(f"| {lv.streams:,} | {lv.complete:,} | {ttft} | {lag} | {lv.seconds:.1f} | "
                     f"{lv.gateway_cpu_s:.1f} | {lv.gateway_rss_mb:.0f} | "
                     f"{'yes' if lv.holds(args.lag_bound_ms) else 'no'} |")
    held = [lv.streams for lv in levels if lv.holds(args.lag_bound_ms)]
    broke = next((lv for lv in levels if not lv.holds(args.lag_bound_ms)), None)
    lines.append("")
    verdict = f"One gateway process held {max(held):,} concurrent streams" if held else "No level held"
    if broke is not None:
        lines.append(f"{verdict}; {broke.streams:,} broke the bound"
                     + (f" ({'; '.join(broke.errors)})." if broke.errors else "."))
    else:
        lines.append(f"{verdict} and did not break the bound up to the ramp's limit "
                     f"({levels[-1].streams if levels else 0:,} streams, or its time budget).")
    return lines


def report(args: argparse.Namespace, box: dict[str, str], lat: dict[str, Offered], cpu_ms: float,
           levels: list[Level]) -> str:
    load = os.getloadavg()
    head = [
        "## Gateway",
        "",
        f"Produced by `{f'python -m bench.gateway {command_line()}'.strip()}` on "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC ({{elapsed}} s). Method: the docstring of "
        "`bench/gateway.py`: a policy worker, one pool worker and one gateway process on a private "
        "redis-server, load from one aiohttp client process (the SDK path from the same process).",
        "",
        f"- machine: {box['cpu']}, {box['cores']} cores, {box['memory']}, shared with other work "
        f"(load average {box['load average at start']} at start, {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        "at the end)",
        f"- python {box['python']}; {_versions()}",
        "",
    ]
    return "\n".join([*head, *latency_table(args, lat, cpu_ms), "", *streams_table(args, levels)]) + "\n"
