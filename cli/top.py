"""``inference-broker top``: a live view of a running stack, from Redis alone.

:class:`Collector` reads one frame's worth of state (:class:`TopState`) and :func:`render`
turns it into a rich renderable; only the collector does I/O, so a frame can be tested and
captured from plain data. What each part comes from:

* **pools**: the workers' heartbeat hashes ``hb:pool:<pool>`` (``in_flight``, ``capacity``,
  ``ts``); a beat older than ``stale_s`` counts as a gone worker;
* **streams**: the ingress and every pool stream (found with ``SCAN``, lanes included):
  length, and per consumer group ``lag`` (Redis 7.0+), pending entries and the age of the
  oldest pending one (``XPENDING``);
* **classes**: the result stream's entries of the last ``window_s`` seconds (``XREVRANGE``):
  throughput, p50/p99 TTFT and end-to-end, attainment (see :mod:`cli.runstats`), and
  each pool's share;
* **dead letters**: the length of the dead-letter stream.

A deployment of several shards has each of these streams once per shard: a row of the
streams table sums a stream's shards (length, lag, pending; the oldest pending entry of any
shard, the most consumers of any shard), and the classes cover every shard's results. With
tenants (``[tenants.<name>]``), each tenant's ingress is a row of its own (``~<tenant>:jobs``)
and the classes cover every tenant's results too: an operator's (or the metrics reader's)
view of the whole deployment.
"""

from __future__ import annotations

import time

import msgspec
import redis.asyncio as aioredis
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from broker.connection import RETRYABLE, redacted, unreachable
from broker.heartbeats import fresh, read_beats
from broker.settings import Settings
from broker.topology import Topology
from broker.wire import decode_heartbeat, decode_policy_heartbeat
from cli.runstats import GroupStats, by_key, group_stats, results_of, span_text
from policies.config import PolicyConfig

NOW_S = 10.0
"""The "now" throughput covers the last this many seconds (the window's average lags a burst)."""
RESCAN_S = 10.0
"""How often the list of pool streams is refreshed (SCAN walks the whole keyspace)."""
MAX_RESULTS = 20_000
"""Most recent results one frame reads."""


class WorkerView(msgspec.Struct, frozen=True):
    name: str
    in_flight: int
    capacity: int
    age_s: float


class PoolView(msgspec.Struct, frozen=True):
    name: str
    workers: list[WorkerView]
    """Workers with a fresh heartbeat."""
    stale: int
    """Heartbeats too old to count (a killed worker leaves its entry behind), or not heartbeats at all."""


class StreamView(msgspec.Struct, frozen=True):
    name: str
    """The key without its shard's ``<prefix>:{<tag>}:``."""
    length: int
    group: str | None
    lag: int | None
    """Entries not yet delivered to the group (None: Redis < 7.0, or unknown)."""
    pending: int
    oldest_pending_s: float | None
    consumers: int
    """Consumers of the group (with several shards: the most on any one shard)."""


def _combine(views: list[StreamView]) -> StreamView:
    """One stream's views over its shards as one: counts summed, the oldest pending, the most consumers."""
    first = views[0]
    lags = [v.lag for v in views]
    ages = [v.oldest_pending_s for v in views if v.oldest_pending_s is not None]
    return StreamView(first.name, sum(v.length for v in views), first.group,
                      None if None in lags else sum(lag or 0 for lag in lags), sum(v.pending for v in views),
                      max(ages) if ages else None, max(v.consumers for v in views))


class TopState(msgspec.Struct, frozen=True, kw_only=True):
    """One frame: everything :func:`render` shows."""

    at: float
    where: str
    """Redis URL (without its password) and prefix."""
    window_s: float
    span_s: float
    """Seconds the window's results cover (shorter than ``window_s`` on a young stream)."""
    recent: int = 0
    """Results of the last ``recent_s`` seconds."""
    recent_s: float = NOW_S
    pools: list[PoolView] = []
    streams: list[StreamView] = []
    classes: list[GroupStats] = []
    pool_share: dict[str, int] = {}
    """Jobs per pool in the window (a job that ran nowhere is under its status)."""
    goals: dict[str, float] = {}
    """Attainment goal per class, from the policy config."""
    default_pool: str = "gpu"
    dead: int = 0
    policies: int = 0
    """Policy workers with a fresh heartbeat."""
    error: str | None = None


class Collector:
    """Reads :class:`TopState` frames from one deployment."""

    def __init__(self, client: aioredis.Redis, settings: Settings, config: PolicyConfig, *, reply_to: str = "results",
                 window_s: float = 60.0, stale_s: float = 5.0) -> None:
        self.client = client
        self.topo = settings.topology
        self.shards = self.topo.every_shard
        self.url = settings.redis_url or ""
        self.where = f"{redacted(self.url)}  prefix {settings.prefix}"
        self.config = config
        self.spaces = [shard.of_tenant(tenant) for tenant in ("", *config.tenants) for shard in self.shards]
        """Every space of every shard: the default space's, then each tenant's."""
        self.results = [space.reply(reply_to) for space in self.spaces]
        self.window_s = window_s
        self.stale_s = stale_s
        self._streams: list[tuple[Topology, str]] = []
        self._scanned_at = -RESCAN_S
        lanes: dict[int, list[str]] = {}
        for slo in config.classes:
            lanes.setdefault(config.lane(slo), []).append(slo)
        self.labels = {shard.pool(pool, lane): f" ({', '.join(names)})" for shard in self.shards
                       for pool in config.pools for lane, names in lanes.items() if config.lanes > 1}
        """Pool stream key to the classes of its lane, for the streams table."""

    async def _stream_keys(self, now: float) -> list[tuple[Topology, str]]:
        """Each shard's ingress and pool streams, with their shard."""
        if now - self._scanned_at >= RESCAN_S:
            # One SCAN for every shard; the pattern may match other deployments' keys too
            # (a prefix may contain dots), so a key counts only under one of our shards' bases.
            tags = self.topo.prefix if self.topo.shards == 1 else f"{self.topo.prefix}.*"
            match = f"{self.topo.prefix}:{{{tags}}}:pool:*"
            bases = {f"{shard.base}:pool:": shard for shard in self.shards}
            pools = []
            async for raw in self.client.scan_iter(match=match, count=1000, _type="STREAM"):
                key = raw.decode()
                shard = bases.get(key[: key.index(":pool:") + 6])
                if shard is not None:
                    pools.append((shard, key))
            ingresses = [(space.of_tenant(""), space.jobs) for space in self.spaces]
            self._streams = [*ingresses, *sorted(pools, key=lambda p: p[1])]
            self._scanned_at = now
        return self._streams

    async def frame(self) -> TopState:
        """One frame; raises when Redis is away."""
        return await self._collect(time.time())

    async def collect(self) -> TopState:
        """One frame; Redis being away is reported in the frame, not raised (the live view retries)."""
        now = time.time()
        try:
            return await self._collect(now)
        except RETRYABLE as exc:
            return TopState(at=now, where=self.where, window_s=self.window_s, span_s=0.0,
                            error=f"retrying: {unreachable(self.url, exc)}")

    async def _collect(self, now: float) -> TopState:
        streams = await self._stream_keys(now)
        pools = list(self.config.pools)
        pipe = self.client.pipeline(transaction=False)
        for pool in pools:
            pipe.hgetall(self.topo.heartbeats(pool))
        pipe.hgetall(self.topo.policy_heartbeats)
        for shard in self.shards:
            pipe.xlen(shard.dead)
        for _shard, key in streams:
            pipe.xlen(key)
            pipe.xinfo_groups(key)
        start_ms = int((now - self.window_s) * 1000)
        for stream in self.results:
            pipe.xrevrange(stream, "+", str(start_ms), count=MAX_RESULTS)
            pipe.xrange(stream, "-", "+", count=1)
        replies = iter(await pipe.execute(raise_on_error=False))
        beats = [next(replies) for _pool in pools]
        policy_beats = next(replies)
        dead = sum(n for n in (next(replies) for _shard in self.shards) if isinstance(n, int))
        views = [self._pool(name, beats[i], now) for i, name in enumerate(pools)]
        policies = fresh(read_beats(_hash(policy_beats), decode_policy_heartbeat, self.topo.policy_heartbeats),
                         now, self.stale_s)
        groups: list[tuple[Topology, str, int, dict[str, object] | None]] = []
        for shard, key in streams:
            length, info = next(replies), next(replies)
            length = length if isinstance(length, int) else 0
            found = [g for g in info if isinstance(g, dict)] if isinstance(info, list) else []
            groups += [(shard, key, length, g) for g in found] or [(shard, key, length, None)]
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        firsts: list[int] = []
        for _stream in self.results:
            recent, first = next(replies), next(replies)
            entries += recent if isinstance(recent, list) else []
            firsts += [_entry_ms(first[0][0])] if isinstance(first, list) and first else []
        if len(self.results) > 1:
            entries = sorted(entries, key=lambda entry: _entry_order(entry[0]), reverse=True)[:MAX_RESULTS]
        pending = self.client.pipeline(transaction=False)
        for _shard, key, _length, group in groups:
            if group is not None:
                pending.xpending(key, _text(group["name"]))
        summaries = iter(await pending.execute(raise_on_error=False))
        by_row: dict[tuple[str, str | None], list[StreamView]] = {}
        for shard, key, length, group in groups:
            view = self._stream(shard, key, length, group, next(summaries) if group is not None else None, now)
            by_row.setdefault((view.name, view.group), []).append(view)
        stream_views = [_combine(views) for views in by_row.values()]
        results = results_of(entries)
        now_ms = int((now - NOW_S) * 1000)
        first_ms = min(firsts, default=None)
        span = min(self.window_s, now - first_ms / 1000) if first_ms is not None else self.window_s
        classes = [group_stats(name, rows) for name, rows in by_key(results, "slo").items()]
        return TopState(
            at=now, where=self.where, window_s=self.window_s, span_s=max(span, 1.0), pools=views,
            recent=sum(_entry_ms(entry_id) >= now_ms for entry_id, _f in entries),
            recent_s=min(NOW_S, max(span, 1.0)),
            streams=stream_views, classes=classes,
            pool_share={name: len(rows) for name, rows in by_key(results, "pool").items()},
            goals={name: cls.attainment for name, cls in self.config.classes.items()},
            default_pool=self.config.default_pool, dead=dead, policies=policies)

    def _pool(self, name: str, raw: object, now: float) -> PoolView:
        fields = _hash(raw)
        beats = read_beats(fields, decode_heartbeat, self.topo.heartbeats(name))
        views = [WorkerView(worker.decode(errors="replace"), beat.in_flight, beat.capacity, now - beat.ts)
                 for worker, beat in sorted(beats.items())]
        live = [view for view in views if view.age_s < self.stale_s]
        return PoolView(name, live, len(fields) - len(live))

    def _stream(self, shard: Topology, key: str, length: int, group: dict[str, object] | None, summary: object,
                now: float) -> StreamView:
        name = key.removeprefix(shard.base + ":") + self.labels.get(key, "")
        if group is None:
            return StreamView(name, length, None, None, 0, None, 0)
        oldest = summary.get("min") if isinstance(summary, dict) else None
        lag = group.get("lag")
        return StreamView(
            name, length, _text(group["name"]), int(lag) if isinstance(lag, int) else None,
            int(group.get("pending") or 0),  # type: ignore[call-overload]
            now - _entry_ms(oldest) / 1000 if oldest else None, int(group.get("consumers") or 0))  # type: ignore[call-overload]


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _hash(raw: object) -> dict[bytes, bytes]:
    return raw if isinstance(raw, dict) else {}


def _entry_ms(entry_id: object) -> int:
    return int(_text(entry_id).split("-", 1)[0])


def _entry_order(entry_id: object) -> tuple[int, int]:
    ms, seq = _text(entry_id).split("-", 1)
    return int(ms), int(seq)


# --------------------------------------------------------------------------- rendering


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _bar(used: int, total: int, width: int = 16) -> Text:
    share = used / total if total else 0.0
    filled = round(share * width)
    colour = "green" if share < 0.7 else "yellow" if share < 0.95 else "red"
    return Text("█" * filled, style=colour) + Text("░" * (width - filled), style="dim") + Text(f" {share:4.0%}")


def render(state: TopState) -> RenderableType:
    """One frame of the dashboard."""
    header = Text.assemble(("inference-broker top", "bold"), "  ", state.where, "  ",
                           (time.strftime("%H:%M:%S", time.localtime(state.at)), "dim"))
    if state.error:
        return Group(header, Text(state.error, style="bold red"))
    total = sum(state.pool_share.values())
    rate = total / state.span_s if state.span_s else 0.0
    met = sum(c.met for c in state.classes)
    off_default = sum(n for p, n in state.pool_share.items() if p != state.default_pool and p in
                      {v.name for v in state.pools})
    summary = Text.assemble(
        ("throughput ", "dim"), (f"{state.recent / state.recent_s:.1f} jobs/s", "bold"),
        (f" last {state.recent_s:.0f} s, {rate:.1f} over {state.span_s:.0f} s", "dim"), ("  SLO met ", "dim"),
        (f"{100 * met / total:.1f}%" if total else "-", "bold"), ("  accelerator share ", "dim"),
        (f"{100 * off_default / total:.0f}%" if total else "-", "bold magenta"),
        ("  policy workers ", "dim"), (str(state.policies), "bold" if state.policies else "bold red"),
        ("  dead letters ", "dim"), (str(state.dead), "bold red" if state.dead else "bold"))

    pools = Table(title=f"Pools (jobs: last {state.span_s:.0f} s)", title_justify="left", header_style="bold")
    for col in ("pool", "workers", "in flight / capacity", "jobs", "share"):
        pools.add_column(col, justify="left" if col == "pool" else "right", no_wrap=True)
    for p in state.pools:
        in_flight = sum(w.in_flight for w in p.workers)
        capacity = sum(w.capacity for w in p.workers)
        jobs = state.pool_share.get(p.name, 0)
        workers = f"{len(p.workers)}" + (f" (+{p.stale} stale)" if p.stale else "")
        pools.add_row(p.name, Text(workers, style="" if p.workers else "bold red"),
                      Text(f"{in_flight}/{capacity} ") + _bar(in_flight, capacity), str(jobs),
                      f"{100 * jobs / total:.0f}%" if total else "-",
                      style="magenta" if p.name != state.default_pool else None)
    for name, jobs in state.pool_share.items():
        if name not in {p.name for p in state.pools}:  # ran nowhere: rejected, expired, failed
            pools.add_row(Text(f"({name})", style="dim"), "", "", str(jobs), f"{100 * jobs / total:.0f}%")

    streams = Table(title="Streams", title_justify="left", header_style="bold")
    for col in ("stream", "group", "length", "lag", "pending", "oldest pending", "consumers"):
        streams.add_column(col, justify="left" if col in ("stream", "group") else "right", no_wrap=True)
    for s in state.streams:
        backlog = (s.lag or 0) + s.pending
        streams.add_row(s.name, s.group or "-", str(s.length), "-" if s.lag is None else str(s.lag), str(s.pending),
                        _age(s.oldest_pending_s), str(s.consumers), style="yellow" if backlog > 100 else None)
    if not state.streams:
        streams.add_row("(none yet)", "", "", "", "", "", "")

    classes = Table(title=f"SLO classes: results of the last {state.span_s:.0f} s", title_justify="left",
                    header_style="bold")
    # Cancelled jobs (their producers gave up before they started) get a column only when there are some.
    ended = ("failed", "expired", "rejected") + (("cancelled",) if any(c.statuses["cancelled"]
                                                                        for c in state.classes) else ())
    for col in ("class", "jobs", "jobs/s", "ok", *ended, "TTFT p50/p99", "e2e p50/p99", "SLO met"):
        classes.add_column(col, justify="left" if col == "class" else "right", no_wrap=True)
    for c in state.classes:
        goal = state.goals.get(c.name)
        att = c.attainment
        style = "" if att is None or goal is None else "green" if att >= goal else "bold red"
        classes.add_row(c.name, str(c.jobs), f"{c.jobs / state.span_s:.1f}", str(c.statuses["ok"]),
                        *(Text(str(c.statuses[s]), style="red" if c.statuses[s] else "") for s in ended),
                        span_text(c.ttft_p50_ms, c.ttft_p99_ms), span_text(c.e2e_p50_ms, c.e2e_p99_ms),
                        Text(f"{100 * att:.1f}%" if att is not None else "-", style=style) +
                        Text(f" / {100 * goal:.0f}%" if goal is not None else "", style="dim"))
    if not state.classes:
        classes.add_row("(no results yet)", *[""] * (5 + len(ended)))
    return Group(header, summary, Text(""), pools, streams, classes, Text("Ctrl-C quits", style="dim"))
