"""The Lua scripts and their encoders: one encoder per script file, the layout each file
documents is the one its encoder builds, and every script does its move in a real Redis."""

from __future__ import annotations

import inspect
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from broker import calls
from broker.calls import CompleteTarget, Completion, FailedJob, RouteMove
from broker.scripts import LUA, SCRIPTS, ScriptCall, Scripts
from broker.streams import ensure_group
from broker.topology import POLICY_GROUP, WORKER_GROUP, Topology
from tests.conftest import ROOT

# Layout checks: each argument is its documented name, or a value that stands for it.
TOPO = Topology("p")
SPACE = TOPO.of_tenant("t")
"""A tenant's space of TOPO's shard: its `rel` names the space argument."""
NUMBERS = {"ttl_ms": 101, "idle_ms": 102, "delivery": 103, "count": 104, "suspects": 105, "since_ms": 106,
           "max_backlog": 107, "oldest": 108.5}
NAMES: dict[object, str] = {
    **{value: name for name, value in NUMBERS.items()},
    2: "lane",  # a lane's index in KEYS: the only lane of a sample
    0: "mark", 1: "mark",
    TOPO.base + ":": "base", WORKER_GROUP: "group", TOPO.dead: "dead", TOPO.jobs: "ingress", TOPO.replies: "replies",
    TOPO.done("job_id"): "done", TOPO.routed("job_id"): "routed", TOPO.reply("reply"): "reply_stream",
    SPACE.rel: "space", SPACE.jobs: "ingress",
}
N: Any = NUMBERS
MOVE = RouteMove(b"entry_id", "lane", "job_id", b"routed", "reply")
DONE = Completion(b"entry_id", SPACE.rel, "job_id", "reply", b"result")
FAILED = FailedJob("job_id", "reply", b"result", N["ttl_ms"])
SAMPLES: list[tuple[Callable[..., ScriptCall[object]], ScriptCall[object]]] = [
    (calls.route, calls.route("group", SPACE, N["ttl_ms"], [MOVE, MOVE])),
    (calls.complete, calls.complete(CompleteTarget("stream", "group", "consumer", TOPO, N["ttl_ms"], True),
                                    [DONE, DONE])),
    (calls.dead, calls.dead("stream", "group", b"entry_id", "consumer", b"letter", TOPO)),
    (calls.dead, calls.dead("stream", "group", b"entry_id", "consumer", b"letter", TOPO, FAILED)),
    (calls.dead, calls.dead("stream", "group", b"entry_id", "consumer", b"letter", TOPO, FAILED._replace(mark=True))),
    (calls.nack, calls.nack("stream", "group", b"entry_id", "consumer", "error_key", idle_ms=N["idle_ms"],
                            error="error", ttl_ms=N["ttl_ms"], delivery=N["delivery"])),
    (calls.renew, calls.renew("stream", "group", "consumer", [b"entry_id", b"entry_id"])),
    (calls.claim, calls.claim("stream", "group", "consumer", idle_ms=N["idle_ms"], cursor=b"cursor",
                              count=N["count"], suspects=N["suspects"], error_prefix="error_prefix",
                              crash_mark="crash_mark")),
    (calls.delconsumer, calls.delconsumer("stream", "group", "consumer")),
    (calls.expire_beats, calls.expire_beats(["heartbeats", "heartbeats"], N["oldest"])),
    (calls.dropgroup, calls.dropgroup("stream", "group", N["idle_ms"])),
    (calls.reap, calls.reap(TOPO, "reply", N["since_ms"])),
    (calls.submit, calls.submit("ingress", N["max_backlog"], [b"job", b"job"])),
    (calls.replay, calls.replay(TOPO, "entry_id", "job_id", b"job")),
    (calls.cancel, calls.cancel(TOPO, "job_id", "reply", b"result", N["ttl_ms"])),
]


def head(name: str) -> dict[str, str]:
    """The ``-- KEYS:`` and ``-- ARGV:`` lines of a script's head comment."""
    text = (LUA / f"{name}.lua").read_text()
    return dict(re.findall(r"^-- (KEYS|ARGV): (.*)$", text, re.MULTILINE))


def layout(doc: str) -> re.Pattern[str]:
    """A documented layout as a pattern over argument names, each followed by a comma:
    ``[...]`` is optional, ``{...}...`` a record repeated, ``name...`` a name repeated."""
    pattern = ""
    for token in re.findall(r"\{|\}\.\.\.|\[|\]|\w+(?:\.\.\.)?", doc):
        pattern += {"{": "(?:", "}...": ")*", "[": "(?:", "]": ")?"}.get(token) or (
            f"(?:{token[:-3]},)*" if token.endswith("...") else f"{token},")
    return re.compile(pattern)


def named(values: list[Any]) -> str:
    """The names of ``values``, each followed by a comma."""
    plain = [v.decode() if isinstance(v, bytes) else v for v in values]
    return "".join(f"{NAMES.get(v, v)}," for v in plain)


def encoders() -> dict[str, Callable[..., Any]]:
    """Every function of broker.calls that returns a ScriptCall."""
    return {name: f for name, f in inspect.getmembers(calls, inspect.isfunction)
            if f.__module__ == calls.__name__ and str(f.__annotations__["return"]).startswith("ScriptCall")}


def test_every_script_file_has_exactly_one_encoder_and_every_fragment_is_required() -> None:
    files = {path.stem for path in Path(str(LUA)).glob("*.lua")}
    assert set(SCRIPTS) == files  # every file is loaded, and nothing else
    assert {f.__name__ for f, _ in SAMPLES} == set(encoders())  # each encoder is checked below
    used = {name: {f.__name__ for f, call in SAMPLES if call.script.name == name} for name in files}
    assert all(len(users) == 1 for users in used.values()), used
    fragments = {path.stem for path in Path(str(LUA / "lib")).glob("*.lua")}
    required = {n.strip() for p in Path(str(LUA)).rglob("*.lua")
                for line in re.findall(r"^-- requires: (.+)$", p.read_text(), re.MULTILINE) for n in line.split(",")}
    assert required == fragments


def test_each_encoder_builds_the_layout_its_script_documents() -> None:
    for encoder, call in SAMPLES:
        doc = head(call.script.name)
        assert set(doc) == {"KEYS", "ARGV"}, f"{call.script.name}.lua documents no KEYS and ARGV"
        for what, values in (("KEYS", call.keys), ("ARGV", call.args)):
            assert layout(doc[what]).fullmatch(named(values)), (encoder.__name__, what, doc[what], named(values))
        # A record's stride in the Lua loop is the documented record's.
        record = re.search(r"^(.*)\{(.*)\}\.\.\.$", doc["ARGV"])
        if record:
            start, size = len(re.findall(r"\w+", record[1])) + 1, len(re.findall(r"\w+", record[2]))
            assert f"for i = {start}, #ARGV, {size} do" in call.script.source


def test_no_code_but_the_encoders_makes_a_script_call() -> None:
    # So no caller lays out a script's KEYS and ARGV itself.
    makes = re.compile(r"(?<!class )\bScriptCall\(")
    makers = [path.relative_to(ROOT) for folder in ("broker", "workers", "policies", "tests")
              for path in (ROOT / folder).rglob("*.py") if makes.search(path.read_text())]
    assert makers == [Path("broker/calls.py")]


def test_every_script_has_a_test_of_its_move_here() -> None:
    tests = [name for name, _ in inspect.getmembers(sys.modules[__name__], inspect.iscoroutinefunction)]
    assert all(any(t.startswith(f"test_{name}_") for t in tests) for name in SCRIPTS), tests


# Each script's move, through its encoder, in a real Redis.
async def taken(client: aioredis.Redis, stream: str, group: str, n: int, consumer: str = "w1") -> list[bytes]:
    """``n`` new entries of ``stream``, delivered to ``consumer`` of ``group``."""
    await ensure_group(client, stream, group)
    ids = [await client.xadd(stream, {"x": b"x"}) for _ in range(n)]
    await client.xreadgroup(group, consumer, {stream: ">"}, count=n)
    return ids


async def pending(client: aioredis.Redis, stream: str, group: str) -> dict[bytes, dict[str, Any]]:
    return {p["message_id"]: p for p in await client.xpending_range(stream, group, "-", "+", 100)}


async def test_route_moves_each_job_to_its_lane_once(client: aioredis.Redis, prefix: str) -> None:
    topo, scripts = Topology(prefix), Scripts(client)
    a, b, again = await taken(client, topo.jobs, POLICY_GROUP, 3, "p1")
    moves = [RouteMove(a, topo.pool("gpu"), "a", b"A", "results"), RouteMove(b, topo.pool("accel"), "b", b"B", "r")]
    assert await scripts.call(calls.route(POLICY_GROUP, topo, 60_000, moves)) == [1, 1]
    assert await scripts.call(calls.route(POLICY_GROUP, topo, 60_000, [moves[0]._replace(
        entry_id=again)])) == [0]  # job a again: only acked
    assert [f for _, f in await client.xrange(topo.pool("gpu"))] == [{b"routed": b"A"}]
    assert [f for _, f in await client.xrange(topo.pool("accel"))] == [{b"routed": b"B"}]
    assert await client.xlen(topo.jobs) == 0 and await pending(client, topo.jobs, POLICY_GROUP) == {}
    # Each marker names where its job's entry went (for CANCEL).
    [(gpu_entry, _)] = await client.xrange(topo.pool("gpu"))
    assert await client.get(topo.routed("a")) == b"pool:gpu " + gpu_entry
    assert await client.exists(topo.routed("b")) == 1


async def test_complete_publishes_results_and_marks_jobs_at_the_policy(client: aioredis.Redis, prefix: str) -> None:
    topo = Topology(prefix)
    entry, theirs = await taken(client, topo.jobs, POLICY_GROUP, 2, "p1")
    await client.xclaim(topo.jobs, POLICY_GROUP, "p2", 0, [theirs])
    policy = CompleteTarget(topo.jobs, POLICY_GROUP, "p1", topo, 60_000, mark=True)
    done = [Completion(entry, "", "j", "results", b"R"), Completion(theirs, "", "k", "results", b"K")]
    assert await Scripts(client).call(calls.complete(policy, done)) == [1, -1]  # k is p2's
    assert [f for _, f in await client.xrange(topo.reply("results"))] == [{b"result": b"R"}]
    assert await client.get(topo.done("j")) == b"R" and await client.exists(topo.routed("j"))
    assert await client.smembers(topo.replies) == {b"results"}
    assert list(await pending(client, topo.jobs, POLICY_GROUP)) == [theirs]


async def test_dead_letters_an_entry_and_makes_a_known_jobs_failure_its_outcome(
        client: aioredis.Redis, prefix: str) -> None:
    topo, scripts = Topology(prefix), Scripts(client)
    stream = topo.pool("gpu")
    known, unknown, theirs = await taken(client, stream, WORKER_GROUP, 3)
    failed = FailedJob("j", "results", b"F", 60_000, mark=True)
    assert await scripts.call(calls.dead(stream, WORKER_GROUP, theirs, "w2", b"L0", topo, failed)) == -1  # fenced
    assert await scripts.call(calls.dead(stream, WORKER_GROUP, known, "w1", b"L1", topo, failed)) == 1
    assert await scripts.call(calls.dead(stream, WORKER_GROUP, unknown, "", b"L2", topo)) == 1
    assert [f[b"dead"] for _, f in await client.xrange(topo.dead)] == [b"L1", b"L2"]
    assert await client.get(topo.done("j")) == b"F" and await client.exists(topo.routed("j"))
    assert [f for _, f in await client.xrange(topo.reply("results"))] == [{b"result": b"F"}]
    assert list(await pending(client, stream, WORKER_GROUP)) == [theirs]


async def test_nack_gives_an_entry_back_with_its_error(client: aioredis.Redis, prefix: str) -> None:
    stream, errors = Topology(prefix).pool("gpu"), f"{prefix}:err"
    (entry,) = await taken(client, stream, WORKER_GROUP, 1)
    nack = calls.nack(stream, WORKER_GROUP, entry, "w1", errors, idle_ms=50_000, error="E", ttl_ms=60_000, delivery=1)
    assert await Scripts(client).call(nack._replace(args=[WORKER_GROUP, entry, "w2", *nack.args[3:]])) == -1
    assert await Scripts(client).call(nack) == 1
    given = (await pending(client, stream, WORKER_GROUP))[entry]
    assert given["time_since_delivered"] >= 50_000 and given["times_delivered"] == 1
    assert await client.hgetall(errors) == {b"error": b"E", b"delivery": b"1"}


async def test_renew_resets_the_idle_time_of_owned_entries(client: aioredis.Redis, prefix: str) -> None:
    stream = Topology(prefix).pool("gpu")
    mine, theirs = await taken(client, stream, WORKER_GROUP, 2)
    await client.xclaim(stream, WORKER_GROUP, "w2", 0, [theirs], idle=60_000)
    await client.xclaim(stream, WORKER_GROUP, "w1", 0, [mine], idle=60_000, justid=True)
    assert await Scripts(client).call(calls.renew(stream, WORKER_GROUP, "w1", [mine, theirs])) == [theirs]
    assert (await pending(client, stream, WORKER_GROUP))[mine]["time_since_delivered"] < 60_000


async def test_claim_takes_over_idle_entries_and_counts_a_delivery(client: aioredis.Redis, prefix: str) -> None:
    stream = Topology(prefix).pool("gpu")
    (entry,) = await taken(client, stream, WORKER_GROUP, 1)
    claim = calls.claim(stream, WORKER_GROUP, "w2", idle_ms=0, cursor=b"0-0", count=10, suspects=0,
                        error_prefix="", crash_mark="")
    cursor, entries, suspects, deleted, counts, _, given_back = await Scripts(client).call(claim)
    assert [e[0] for e in entries] == [entry] and counts == [2] and (suspects, deleted, given_back) == ([], [], 0)
    assert (await pending(client, stream, WORKER_GROUP))[entry]["consumer"] == b"w2"


async def test_delconsumer_removes_only_a_consumer_that_holds_nothing(client: aioredis.Redis, prefix: str) -> None:
    stream = Topology(prefix).pool("gpu")
    await taken(client, stream, WORKER_GROUP, 1)
    await client.xreadgroup(WORKER_GROUP, "idle", {stream: ">"})
    scripts = Scripts(client)
    assert await scripts.call(calls.delconsumer(stream, WORKER_GROUP, "w1")) == -1
    assert await scripts.call(calls.delconsumer(stream, WORKER_GROUP, "idle")) == 0  # it held 0 entries
    assert [c["name"] for c in await client.xinfo_consumers(stream, WORKER_GROUP)] == [b"w1"]


async def test_expire_beats_deletes_old_and_broken_beats(client: aioredis.Redis, prefix: str) -> None:
    beats = f"{prefix}:hb"
    now = time.time()
    await client.hset(beats, mapping={"fresh": f'{{"ts": {now}}}', "old": f'{{"ts": {now - 100}}}', "junk": "x"})
    assert await Scripts(client).call(calls.expire_beats([beats], now - 10)) == 2
    assert list(await client.hgetall(beats)) == [b"fresh"]


async def test_dropgroup_destroys_only_a_group_unread_for_long(client: aioredis.Redis, prefix: str) -> None:
    stream = Topology(prefix).reply("results")
    await taken(client, stream, "reader", 1)
    scripts = Scripts(client)
    assert await scripts.call(calls.dropgroup(stream, "reader", 60_000)) == 0
    assert await scripts.call(calls.dropgroup(stream, "reader", 0)) == 1
    assert await client.xinfo_groups(stream) == []


async def test_reap_deletes_an_empty_reply_stream_and_forgets_its_name(client: aioredis.Redis, prefix: str) -> None:
    topo, scripts = Topology(prefix), Scripts(client)
    entry = await client.xadd(topo.reply("r"), {"result": b"x"})
    await client.sadd(topo.replies, "r")
    later = int(time.time() * 1000) + 60_000
    assert await scripts.call(calls.reap(topo, "r", later)) == 0  # it holds a result
    await client.xdel(topo.reply("r"), entry)
    assert await scripts.call(calls.reap(topo, "r", 0)) == 0  # written to since
    assert await scripts.call(calls.reap(topo, "r", later)) == 1
    assert not await client.exists(topo.reply("r"), topo.replies)


async def test_submit_adds_jobs_while_the_backlog_has_room(client: aioredis.Redis, prefix: str) -> None:
    topo = Topology(prefix)
    ids, backlog = await Scripts(client).call(calls.submit(topo.jobs, 2, [b"a", b"b", b"c"]))
    assert len(ids) == 2 and backlog == 2
    assert [f[b"job"] for _, f in await client.xrange(topo.jobs)] == [b"a", b"b"]


async def test_replay_puts_a_dead_job_back_and_forgets_its_outcome(client: aioredis.Redis, prefix: str) -> None:
    topo, scripts = Topology(prefix), Scripts(client)
    letter = await client.xadd(topo.dead, {"dead": b"L"})
    await client.set(topo.done("j"), b"failed")
    await client.set(topo.routed("j"), b"1")
    assert await scripts.call(calls.replay(topo, letter.decode(), "j", b"J")) == 1
    assert await scripts.call(calls.replay(topo, letter.decode(), "j", b"J")) == 0  # gone already
    assert [f[b"job"] for _, f in await client.xrange(topo.jobs)] == [b"J"]
    assert await client.xlen(topo.dead) == 0 and not await client.exists(topo.done("j"), topo.routed("j"))


async def test_cancel_ends_a_job_not_taken_by_a_worker_once(client: aioredis.Redis, prefix: str) -> None:
    topo, scripts = Topology(prefix), Scripts(client)

    def cancel(job_id: str) -> ScriptCall[int]:
        return calls.cancel(topo, job_id, "results", b"C-" + job_id.encode(), 60_000)

    # On the ingress (no marker yet): ended, and its marker set so ROUTE only acks it.
    assert await scripts.call(cancel("queued")) == 1
    assert await scripts.call(cancel("queued")) == 0  # it has its outcome
    assert await client.get(topo.routed("queued")) == b"1"
    (entry,) = await taken(client, topo.jobs, POLICY_GROUP, 1, "p1")
    move = RouteMove(entry, topo.pool("gpu"), "queued", b"Q", "results")
    assert await scripts.call(calls.route(POLICY_GROUP, topo, 60_000, [move])) == [0]
    # Routed, on its lane: its entry is deleted before any worker sees it.
    waiting, running = await taken(client, topo.jobs, POLICY_GROUP, 2, "p1")
    moves = [RouteMove(waiting, topo.pool("gpu"), "waiting", b"W", "results"),
             RouteMove(running, topo.pool("gpu"), "running", b"R", "results")]
    assert await scripts.call(calls.route(POLICY_GROUP, topo, 60_000, moves)) == [1, 1]
    await ensure_group(client, topo.pool("gpu"), WORKER_GROUP)
    await client.xreadgroup(WORKER_GROUP, "w1", {topo.pool("gpu"): ">"}, count=1)  # a worker takes `waiting`'s
    assert await scripts.call(cancel("running")) == 1  # not taken yet: the first entry was `waiting`'s
    assert await scripts.call(cancel("waiting")) == 0  # taken: it has started
    assert [f for _, f in await client.xrange(topo.pool("gpu"))] == [{b"routed": b"W"}]
    assert await client.xreadgroup(WORKER_GROUP, "w2", {topo.pool("gpu"): ">"}) == []
    assert [f for _, f in await client.xrange(topo.reply("results"))] == [{b"result": b"C-queued"},
                                                                         {b"result": b"C-running"}]
    assert await client.get(topo.done("running")) == b"C-running" and not await client.exists(topo.done("waiting"))
    assert await client.smembers(topo.replies) == {b"results"}
    # Ended at the policy (a marker naming no entry) and not cancelled: left alone.
    await client.set(topo.routed("old"), b"1")
    assert await scripts.call(cancel("old")) == 0 and not await client.exists(topo.done("old"))
