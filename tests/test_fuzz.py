"""Malformed and oversized entries thrown at a live stack's ingress and pool streams.

Property (Hypothesis): whatever a producer, or anything else with write access, XADDs to
the ingress stream or straight onto a pool stream, each bad entry becomes exactly one dead
letter with a reason on its first delivery, no role process dies, nothing stays pending,
and good jobs interleaved with the bad ones still get their results.

One stack (policy + gpu worker, FAST_ENV, a 4 KiB job limit) serves every example of the
property: the ``@given`` function is defined inside the test, so it can use the ordinary
function-scoped fixtures, and each example drives the live stack with ``asyncio.run``.
Every example gets fresh job ids: a bad job whose id already has an outcome is only acked
(one outcome per job id), so a repeated id would be a different property.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker.topology import POLICY_GROUP, WORKER_GROUP, Topology
from broker.wire import DeadLetter, Job, decode_dead, decode_result
from tests.conftest import FAST_ENV, ROOT, Roles
from tests.helpers import eventually, lanes

LIMIT = 4096
"""IB_MAX_JOB_BYTES of the roles under test: small, so oversized entries stay cheap."""
POOL_LIMIT = LIMIT + 65536
"""A pool worker refuses, unread, routed entries larger than this (job limit + route headroom)."""
ENV = {**FAST_ENV, "IB_MAX_JOB_BYTES": str(LIMIT)}
FASTSTREAM_MAGIC = b"\x89BIN\r\n\x1a\n"

UID = "\x00uid\x00"
"""Placeholder for a fresh, valid job id, filled in when the entry is added."""
INGRESS_REASONS = frozenset({"decode_error", "invalid_job"})
UNANSWERED = frozenset({"decode_error", "too_large"})
"""Dead-letter reasons of entries whose bytes were never read as a job: no result, even if an id is in them."""
_runs = itertools.count()


# ---------------------------------------------------------------------------------------
# Entries as data: readable in Hypothesis' falsifying examples, encoded only when added.


@dataclass(frozen=True)
class Doc:
    """A document to encode as JSON or msgpack, with :data:`UID` where a fresh id goes."""

    value: Any
    fmt: str = "json"

    def encode(self, uid: str) -> bytes:
        value = _fill(self.value, uid)
        if self.fmt == "json":
            return json.dumps(value).encode()
        return msgspec.msgpack.encode(value)


@dataclass(frozen=True)
class Big:
    """``size`` bytes of filler, made when needed (Hypothesis draws only the size)."""

    size: int
    byte: bytes = b"x"

    def encode(self, uid: str) -> bytes:
        return self.byte * self.size


def bad_utf8_job(uid: str) -> bytes:
    """A job whose id and schema are fine but whose JSON is not UTF-8 (a Latin-1 prompt)."""
    return json.dumps(good_job(id=uid)).encode().replace(b'"p"', b'"\xff"')


@dataclass(frozen=True)
class BadUtf8:
    """:func:`bad_utf8_job` with the entry's fresh id."""

    def encode(self, uid: str) -> bytes:
        return bad_utf8_job(uid)


def envelope(body: bytes, headers: dict[bytes, bytes], *, version: int = 1, count: int | None = None,
             headers_start: int | None = None, body_start: int | None = None) -> bytes:
    """FastStream's binary envelope (v1) around ``body``; the keyword arguments break it."""
    table = b"".join(len(x).to_bytes(2, "big") + x for kv in headers.items() for x in kv)
    start = len(FASTSTREAM_MAGIC) + 10 if headers_start is None else headers_start
    data_start = len(FASTSTREAM_MAGIC) + 12 + len(table) if body_start is None else body_start
    return (FASTSTREAM_MAGIC + version.to_bytes(2, "big") + start.to_bytes(4, "big") + data_start.to_bytes(4, "big")
            + (len(headers) if count is None else count).to_bytes(2, "big") + table + body)


BROKEN_ENVELOPES: dict[str, dict[str, int]] = {
    "version": {"version": 2}, "headers_start": {"headers_start": 1 << 20}, "body_start": {"body_start": 1 << 20},
    "body_in_headers": {"body_start": len(FASTSTREAM_MAGIC) + 12}, "count": {"count": 1000}}


@dataclass(frozen=True)
class Envelope:
    """A :class:`Doc` in a FastStream envelope; ``broken`` names a key of :data:`BROKEN_ENVELOPES`."""

    doc: Doc | BadUtf8
    broken: str = ""

    def encode(self, uid: str) -> bytes:
        headers = {b"correlation_id": uid.encode()}
        return envelope(self.doc.encode(uid), headers, **BROKEN_ENVELOPES.get(self.broken, {}))


Value = bytes | Doc | Big | BadUtf8 | Envelope


@dataclass(frozen=True)
class Entry:
    """One stream entry. ``reasons`` empty: a good job that must get an ``ok`` result."""

    label: str
    where: str  # "ingress" or "pool"
    fields: tuple[tuple[str, Value], ...]
    reasons: frozenset[str] = frozenset()

    def encode(self, uid: str) -> dict[bytes, bytes]:
        return {name.encode(): value if isinstance(value, bytes) else value.encode(uid)
                for name, value in self.fields}


def _fill(value: Any, uid: str) -> Any:
    if isinstance(value, str):
        return uid if value == UID else value
    if isinstance(value, dict):
        return {_fill(k, uid): _fill(v, uid) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, uid) for v in value]
    return value


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def good_job(**changes: Any) -> dict[str, Any]:
    return {"id": UID, "model": "llama-3.1-8b", "kind": "completion", "prompt": "p", "max_tokens": 2, **changes}


def routed(job: Any, **changes: Any) -> dict[str, Any]:
    """A RoutedJob as the policy worker writes it to a pool stream."""
    route = {"pool": "gpu", "slo": "standard", "reason": "fuzz", "routed_at": 1.7e9, "ttft_target_ms": 2000.0}
    return {"job": job, "route": route, "created_at": 1.7e9, **changes}


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


# ---------------------------------------------------------------------------------------
# Strategies.

msgpack_ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can encode
json_scalars = (st.none() | st.booleans() | msgpack_ints
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=16))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
unknown_names = st.text(min_size=1, max_size=16).filter(lambda k: k not in Job.__struct_fields__)
# Below the interpreter's recursion limit (the test's own json.dumps recurses too); the
# deeply nested tests below go past it with hand-written bytes.
safe_nesting = st.integers(1, 300).map(nested)

# (field, value) pairs that break the Job schema or its input rules: each must be refused.
WRONG_JOB_FIELDS: list[tuple[str, Any]] = [
    ("id", 7), ("id", None), ("id", ""), ("id", "has space"), ("id", "x" * 129), ("id", ["a"]),
    ("id", "trailing-newline\n"),
    ("model", 1), ("model", None), ("model", ""), ("model", {"a": "b"}),
    ("kind", "nope"), ("kind", 1), ("kind", None), ("kind", "chat"), ("kind", "embedding"),
    ("prompt", 1), ("prompt", ["p"]), ("prompt", None),
    ("max_tokens", -1), ("max_tokens", 1_000_001), ("max_tokens", "2"), ("max_tokens", 1.5),
    ("max_tokens", True), ("max_tokens", None),
    ("tenant", ""), ("tenant", 1), ("tenant", None), ("tenant", "t" * 65),
    ("messages", [{"role": "user", "content": "both inputs"}]), ("messages", "str"), ("messages", [{"role": 1}]),
    ("texts", ["also texts"]), ("texts", 3),
    ("slo", 1), ("slo", ["interactive"]),
    ("deadline", -1), ("deadline", "soon"), ("deadline", 1e12),
    ("reply_to", "jobs"), ("reply_to", "dead"), ("reply_to", "a:b"), ("reply_to", ""), ("reply_to", 1),
    ("reply_to", "x" * 65),
    ("created_at", -5), ("created_at", "x"), ("created_at", 1e12),
    ("metadata", {"a": 1}), ("metadata", []), ("metadata", "x"), ("metadata", {"a": None}),
    ("v", "1"), ("v", 1.5), ("v", None), ("v", []),
]
# The subset that breaks the *schema* (a pool worker checks structure, not input rules:
# a routed job passed the policy's checks already).
SEMANTIC_ONLY = [("kind", "chat"), ("kind", "embedding"), ("prompt", None),
                 ("messages", [{"role": "user", "content": "both inputs"}]), ("texts", ["also texts"]),
                 ("reply_to", "jobs"), ("reply_to", "dead")]
STRUCTURAL = [pair for pair in WRONG_JOB_FIELDS if pair not in SEMANTIC_ONLY]


@st.composite
def bad_job_doc(draw: st.DrawFn, wrong: list[tuple[str, Any]], required: tuple[str, ...]) -> dict[str, Any]:
    """A job object that is wrong in one or more ways: ``wrong`` values, ``required`` fields left out."""
    doc = good_job()
    how = draw(st.sampled_from(["wrong_type", "missing", "unknown", "mixed"]))
    if how in ("wrong_type", "mixed"):
        for key, value in draw(st.lists(st.sampled_from(wrong), min_size=1, max_size=3)):
            doc[key] = value
    if how in ("missing", "mixed"):
        for key in draw(st.lists(st.sampled_from(required), min_size=1, max_size=3)):
            doc.pop(key, None)
    if how in ("unknown", "mixed") or doc == good_job():
        for _ in range(draw(st.integers(1, 3))):
            doc[draw(unknown_names)] = draw(json_values | safe_nesting)
    return doc


bad_ingress_job = bad_job_doc(WRONG_JOB_FIELDS, ("id", "model", "prompt"))
bad_routed_job = bad_job_doc(STRUCTURAL, ("id", "model"))  # a routed job without a prompt still runs


def ingress(label: str, fields: dict[str, Value], reasons: frozenset[str] | set[str]) -> Entry:
    return Entry(label, "ingress", tuple(fields.items()), frozenset(reasons))


def pool(label: str, fields: dict[str, Value], reasons: frozenset[str] | set[str]) -> Entry:
    return Entry(label, "pool", tuple(fields.items()), frozenset(reasons))


EXTRA_NAMES = ["extra", "x", "trace", "__meta__"]
extra_fields = st.dictionaries(st.sampled_from(EXTRA_NAMES), st.binary(max_size=32), max_size=2)
# (min_size, not .filter(bool): Hypothesis 6.170 trips an internal assertion on the filtered form)
some_extra_fields = st.dictionaries(st.sampled_from(EXTRA_NAMES), st.binary(max_size=32), min_size=1, max_size=2)

bad_ingress = st.one_of(
    st.builds(lambda b: ingress("bytes", {"job": b}, INGRESS_REASONS), st.binary(max_size=300)),
    st.builds(lambda d: ingress("json-bad-job", {"job": Doc(d)}, {"invalid_job"}), bad_ingress_job),
    st.builds(lambda d: ingress("msgpack-bad-job", {"job": Doc(d, "msgpack")}, {"invalid_job"}),
              bad_ingress_job),
    st.builds(lambda v: ingress("json-not-an-object", {"job": Doc(v)}, {"decode_error"}),
              json_values.filter(lambda v: not isinstance(v, dict))),
    st.builds(lambda v: ingress("msgpack-not-a-map", {"job": Doc(v, "msgpack")}, {"decode_error"}),
              json_values.filter(lambda v: not isinstance(v, dict))),
    st.builds(lambda d: ingress("msgpack-junk-map", {"job": Doc(d, "msgpack")}, INGRESS_REASONS),
              st.dictionaries(msgpack_ints | st.binary(max_size=4) | st.text(max_size=4), json_values,
                              min_size=1, max_size=4).filter(lambda d: "id" not in d)),
    st.builds(lambda b: ingress("msgpack-prefix-junk", {"job": b}, INGRESS_REASONS),
              st.builds(lambda head, tail: bytes([head]) + tail, st.sampled_from([*range(0x80, 0x90), 0xDE, 0xDF]),
                        st.binary(max_size=64))),
    st.builds(lambda b: ingress("msgpack-bad-utf8", {"job": b}, {"decode_error"}),
              st.binary(min_size=1, max_size=8).filter(lambda b: not _utf8(b))
              .map(lambda b: bytes([0x81, 0xA0 | len(b)]) + b + b"\x01")),
    st.builds(lambda n: ingress("huge-valid-job", {"job": Doc(good_job(prompt="x" * n))}, {"too_large"}),
              st.integers(LIMIT, 3 * LIMIT)),
    st.builds(lambda n: ingress("huge-junk", {"job": Big(n, b"\xff")}, {"too_large"}),
              st.integers(LIMIT + 1, 4 * LIMIT)),
    st.builds(lambda name, b: ingress("no-job-field", {name: b}, {"decode_error"}),
              st.sampled_from(["jobs", "routed", "data", "Job", "payload"]), st.binary(max_size=64)),
    st.builds(lambda d, extra: ingress("junk-job-with-extra-fields", {"job": Doc(d), **extra}, {"invalid_job"}),
              bad_ingress_job, some_extra_fields),
    st.builds(lambda b: ingress("data-junk", {"__data__": b}, INGRESS_REASONS), st.binary(max_size=64)),
    st.builds(lambda b: ingress("faststream-junk", {"__data__": FASTSTREAM_MAGIC + b}, {"decode_error"}),
              st.binary(max_size=64)),
    st.builds(lambda d, how: ingress("faststream-broken-envelope", {"__data__": Envelope(Doc(d), how)},
                                     {"decode_error"}),
              st.just(good_job()), st.sampled_from(sorted(BROKEN_ENVELOPES))),
    st.builds(lambda: ingress("json-bad-utf8-with-id", {"job": BadUtf8()}, {"decode_error"})),
    st.builds(lambda m: ingress("unknown-model", {"job": Doc(good_job(model=m))}, {"unknown_model"}),
              st.text(min_size=1, max_size=20).filter(lambda m: m not in ("llama-3.1-8b", "llama-3.3-70b",
                                                                            "minilm-l6"))),
)

bad_pool = st.one_of(
    st.builds(lambda b: pool("routed-bytes", {"routed": b}, {"decode_error"}), st.binary(max_size=300)),
    st.builds(lambda d: pool("routed-bad-job", {"routed": Doc(routed(d))}, {"decode_error"}),
              bad_routed_job),
    st.builds(lambda v: pool("routed-not-an-object", {"routed": Doc(v)}, {"decode_error"}),
              json_values.filter(lambda v: not isinstance(v, dict))),
    st.builds(lambda k: pool("routed-missing-part", {"routed": Doc({x: y for x, y in routed(good_job()).items()
                                                                     if x != k})}, {"decode_error"}),
              st.sampled_from(["job", "route", "created_at"])),
    st.builds(lambda k, v: pool("route-wrong-type", {"routed": Doc(routed(good_job(), route={"pool": "gpu", k: v}))},
                                {"decode_error"}),
              st.sampled_from(["slo", "reason", "routed_at", "ttft_target_ms"]), st.just(None) | st.lists(st.none())),
    st.just(pool("routed-msgpack", {"routed": Doc(routed(good_job()), "msgpack")}, {"decode_error"})),
    st.builds(lambda n: pool("routed-huge", {"routed": Big(n)}, {"too_large"}),
              st.integers(POOL_LIMIT + 1, POOL_LIMIT + 20_000)),
    st.builds(lambda name: pool("no-routed-field", {name: Doc(routed(good_job()))}, {"decode_error"}),
              st.sampled_from(["job", "Routed", "data", "__data__"])),
    st.builds(lambda b, extra: pool("junk-routed-with-extra-fields", {"routed": b, **extra}, {"decode_error"}),
              st.binary(max_size=64), some_extra_fields),
    st.builds(lambda m: pool("routed-model-the-device-lacks", {"routed": Doc(routed(good_job(model=m)))},
                             {"backend_error"}),
              st.sampled_from(["gpt-9", "m", "llama"])),
)

good = st.one_of(
    st.builds(lambda: ingress("good-json", {"job": Doc(good_job())}, set())),
    st.builds(lambda: ingress("good-msgpack", {"job": Doc(good_job(), "msgpack")}, set())),
    st.builds(lambda extra: ingress("good-with-extra-fields", {"job": Doc(good_job()), **extra}, set()),
              extra_fields),
    st.builds(lambda: ingress("good-faststream-data", {"__data__": Doc(good_job())}, set())),
    st.builds(lambda fmt: ingress("good-faststream-envelope", {"__data__": Envelope(Doc(good_job(), fmt))}, set()),
              st.sampled_from(["json", "msgpack"])),
    st.builds(lambda: pool("good-routed", {"routed": Doc(routed(good_job()))}, set())),
    st.builds(lambda extra: pool("good-routed-extra-fields", {"routed": Doc(routed(good_job())), **extra}, set()),
              extra_fields),
)

# One of each kind, always tried first (Hypothesis' @example), so no run misses a kind.
EVERY_KIND = [
    ingress("bytes", {"job": b"\x00\xffnot a job"}, INGRESS_REASONS),
    ingress("json-bad-job", {"job": Doc(good_job(max_tokens="2", zz=1))}, {"invalid_job"}),
    ingress("msgpack-bad-job", {"job": Doc({"id": UID, "prompt": "p", "kind": "completion"}, "msgpack")},
            {"invalid_job"}),
    ingress("json-not-an-object", {"job": Doc([1, 2])}, {"decode_error"}),
    ingress("msgpack-not-a-map", {"job": Doc("job", "msgpack")}, {"decode_error"}),
    ingress("msgpack-junk-map", {"job": Doc({1: b"\xff"}, "msgpack")}, INGRESS_REASONS),
    ingress("msgpack-bad-utf8", {"job": b"\x81\xa2\xff\xfe\x01"}, {"decode_error"}),
    ingress("json-bad-utf8-with-id", {"job": BadUtf8()}, {"decode_error"}),
    ingress("huge-valid-job", {"job": Doc(good_job(prompt="x" * LIMIT))}, {"too_large"}),
    ingress("huge-junk", {"job": Big(LIMIT + 1, b"\xff")}, {"too_large"}),
    ingress("no-job-field", {"payload": b"{}"}, {"decode_error"}),
    ingress("junk-job-with-extra-fields", {"job": Doc(good_job(kind="nope")), "extra": b"x"}, {"invalid_job"}),
    ingress("faststream-junk", {"__data__": FASTSTREAM_MAGIC + b"\x00\x01junk"}, {"decode_error"}),
    ingress("faststream-broken-envelope", {"__data__": Envelope(Doc(good_job()), "body_start")}, {"decode_error"}),
    ingress("unknown-model", {"job": Doc(good_job(model="gpt-9"))}, {"unknown_model"}),
    ingress("good-json", {"job": Doc(good_job())}, set()),
    pool("routed-bytes", {"routed": b"\x00\xff"}, {"decode_error"}),
    pool("routed-bad-job", {"routed": Doc(routed(good_job(max_tokens=-1)))}, {"decode_error"}),
    pool("routed-huge", {"routed": Big(POOL_LIMIT + 1)}, {"too_large"}),
    pool("no-routed-field", {"job": Doc(routed(good_job()))}, {"decode_error"}),
    pool("routed-model-the-device-lacks", {"routed": Doc(routed(good_job(model="gpt-9")))}, {"backend_error"}),
    pool("good-routed", {"routed": Doc(routed(good_job()))}, set()),
]

batches = st.tuples(st.lists(bad_ingress | bad_pool, min_size=1, max_size=8), st.lists(good, min_size=1, max_size=3)) \
    .flatmap(lambda parts: st.permutations(parts[0] + parts[1]))


# ---------------------------------------------------------------------------------------
# Driving the live stack.


@dataclass
class Added:
    entry: Entry
    stream: str
    entry_id: str
    uid: str


async def new_dead_letters(client: aioredis.Redis, topo: Topology, after: str) -> list[DeadLetter]:
    return [decode_dead(f[b"dead"]) for _id, f in await client.xrange(topo.dead, min=f"({after}")]


async def last_id(client: aioredis.Redis, stream: str) -> str:
    last = await client.xrevrange(stream, count=1)
    return last[0][0].decode() if last else "0-0"


async def add_entries(client: aioredis.Redis, topo: Topology, entries: list[Entry], tag: str) -> list[Added]:
    added = []
    for i, entry in enumerate(entries):
        uid = f"{tag}-{i}"
        stream = topo.jobs if entry.where == "ingress" else topo.pool("gpu")
        entry_id = await client.xadd(stream, entry.encode(uid))  # type: ignore[arg-type]
        added.append(Added(entry, stream, entry_id.decode(), uid))
    return added


async def drained(client: aioredis.Redis, topo: Topology) -> bool:
    """Nothing pending or left on the ingress and pool streams (handled entries are XDELed)."""
    for stream, group in ((topo.jobs, POLICY_GROUP), *((s, WORKER_GROUP) for s in lanes(topo, "gpu"))):
        if await client.xlen(stream) or (await client.xpending(stream, group))["pending"]:
            return False
    return True


def alive(roles: Roles) -> None:
    dead = [(p.args, p.returncode) for p in roles.procs if p.poll() is not None]
    assert not dead, f"role processes died: {dead}\n{roles.logs()}"


async def check_batch(url: str, topo: Topology, roles: Roles, entries: list[Entry]) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        start = await last_id(client, topo.dead)
        added = await add_entries(client, topo, entries, f"fz{next(_runs)}")
        bad = {(a.stream, a.entry_id): a for a in added if a.entry.reasons}
        goods = [a for a in added if not a.entry.reasons]
        letters: list[DeadLetter] = []

        async def settled() -> bool:
            alive(roles)
            letters[:] = await new_dead_letters(client, topo, start)
            if not {(d.stream, d.entry_id) for d in letters} >= bad.keys():
                return False
            return all([await client.exists(topo.done(a.uid)) for a in goods])

        await eventually(settled, timeout=30, what="a dead letter per bad entry and a result per good job")
        await eventually(lambda: drained(client, topo), timeout=10, what="ingress and pool streams drained")
        letters[:] = await new_dead_letters(client, topo, start)

        # Exactly one dead letter per bad entry, none for anything else.
        keys = [(d.stream, d.entry_id) for d in letters]
        assert sorted(keys) == sorted(bad), f"dead letters {keys} for bad entries {sorted(bad)}"
        for letter in letters:
            a = bad[(letter.stream, letter.entry_id)]
            assert letter.reason in a.entry.reasons, (a.entry.label, letter.reason, letter.error)
            assert letter.error, letter
            assert letter.delivery_count == 1, letter  # on first delivery, not after retries
            if letter.reason == "too_large":
                assert len(letter.payload) <= LIMIT  # the oversized payload is not kept whole
            if letter.reason in UNANSWERED:  # one outcome: the dead letter, no result
                assert not await client.exists(topo.done(a.uid)), (a.entry.label, letter)
        for a in goods:
            result = decode_result(await client.get(topo.done(a.uid)))
            assert result.status == "ok", (a.entry.label, result)
        alive(roles)
    finally:
        await client.aclose()


async def wait_for_stack(url: str, topo: Topology) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        async def up() -> bool:
            return bool(await client.hlen(topo.policy_heartbeats)) and bool(await client.hlen(topo.heartbeats("gpu")))

        await eventually(up, timeout=30, what="policy and gpu worker heartbeats")
    finally:
        await client.aclose()


def start_stack(roles: Roles, url: str, topo: Topology) -> None:
    roles.start("policy", env=ENV)
    roles.start("worker", "--pool", "gpu", "--grace", "5", env=ENV)
    asyncio.run(wait_for_stack(url, topo))


# ---------------------------------------------------------------------------------------
# Tests.


@pytest.mark.timeout(600)
def test_malformed_and_oversized_entries_become_dead_letters_while_good_jobs_flow(
        roles: Roles, redis_url: str, prefix: str) -> None:
    topo = Topology(prefix)
    start_stack(roles, redis_url, topo)
    examples = 0

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(batch=batches)
    @example(batch=EVERY_KIND)
    def interleaved_batch(batch: list[Entry]) -> None:
        nonlocal examples
        examples += 1
        asyncio.run(check_batch(redis_url, topo, roles, batch))

    interleaved_batch()
    assert examples >= 10
    alive(roles)
    # Bad input is an expected condition: handled, logged as a warning, never a crash.
    assert "Traceback" not in roles.logs(), roles.logs()
    assert roles.stop_all() == [0, 0]


async def test_an_undecodable_body_is_a_decode_error_with_no_result_even_when_its_id_is_readable(
        roles: Roles, redis_url: str, prefix: str) -> None:
    # Regression: JSON that is not UTF-8 got a dead letter *and* a `failed` result (the id
    # was read anyway); a pickle was `invalid_job` ("Object missing required field `id`");
    # a broken FastStream envelope reached the job decoder whole, or as an empty body.
    topo = Topology(prefix)
    bad: dict[str, tuple[dict[str, bytes], str]] = {
        "utf8": ({"job": bad_utf8_job("utf8")}, "malformed JSON"),
        "msgpack-junk": ({"job": msgspec.msgpack.encode(good_job(id="msgpack-junk")) + b"\xc1junk"}, "msgpack"),
        "msgpack-id-junk": ({"job": msgspec.msgpack.encode({"id": "msgpack-id-junk"}) + b"\xc1"}, "msgpack"),
        "pickle": ({"job": b"\x80\x02}(X\x02\x00\x00\x00idX\x06\x00\x00\x00pickleu."}, "a Python pickle"),
        "envelope-utf8": ({"__data__": envelope(bad_utf8_job("envelope-utf8"), {})}, "malformed JSON"),
        "envelope-body-start": ({"__data__": envelope(json.dumps(good_job(id="envelope-body-start")).encode(), {},
                                                      body_start=1 << 20)}, "FastStream envelope"),
        "envelope-version": ({"__data__": envelope(json.dumps(good_job(id="envelope-version")).encode(), {},
                                                   version=7)}, "FastStream envelope"),
        "magic-then-json": ({"__data__": FASTSTREAM_MAGIC + json.dumps(good_job(id="magic-then-json")).encode()},
                            "FastStream envelope"),
    }
    roles.start("policy", env=ENV)
    roles.start("worker", "--pool", "gpu", "--grace", "5", env=ENV)
    await wait_for_stack(redis_url, topo)
    client = aioredis.Redis.from_url(redis_url)
    try:
        entry_ids = {(await client.xadd(topo.jobs, fields)).decode(): name  # type: ignore[arg-type]
                     for name, (fields, _why) in bad.items()}
        await client.xadd(topo.jobs, {"job": json.dumps(good_job(id="good"))})

        async def settled() -> bool:
            alive(roles)
            return len(await client.xrange(topo.dead)) >= len(bad) and bool(await client.exists(topo.done("good")))

        await eventually(settled, timeout=20, what="dead letters and the good job's result")
        letters = await new_dead_letters(client, topo, "0-0")
        assert sorted(entry_ids[d.entry_id] for d in letters) == sorted(bad)  # one each
        for letter in letters:
            name = entry_ids[letter.entry_id]
            assert letter.reason == "decode_error", (name, letter)
            assert not await client.exists(topo.done(name)), f"{name} got a result as well as a dead letter"
            assert bad[name][1] in letter.error and "expected" in letter.error, (name, letter.error)
            assert letter.error.isprintable(), (name, letter.error)
        results = [decode_result(f[b"result"]).id for _id, f in await client.xrange(topo.reply("results"))]
        assert results == ["good"]
        alive(roles)
    finally:
        await client.aclose()


GADGET_COMMAND = "touch {path}"


def pickle_gadgets(canary: Path) -> list[bytes]:
    """Payloads that run a command if anything unpickles them (written by hand: no pickle import)."""
    cmd = GADGET_COMMAND.format(path=canary).encode()
    proto0 = b"cos\nsystem\n(S'" + cmd + b"'\ntR."
    # Protocol 2: starts with 0x80, which a msgpack reader sees as an empty map.
    proto2 = b"\x80\x02cposix\nsystem\nq\x00X" + len(cmd).to_bytes(4, "little") + cmd + b"q\x01\x85q\x02Rq\x03."
    yaml_gadget = b"!!python/object/apply:os.system ['" + cmd + b"']"
    return [proto0, proto2, yaml_gadget]


async def test_pickle_gadget_is_dead_lettered_and_runs_nothing(roles: Roles, redis_url: str, prefix: str,
                                                                tmp_path: Path) -> None:
    topo = Topology(prefix)
    roles.start("policy", env=ENV)
    roles.start("worker", "--pool", "gpu", "--grace", "5", env=ENV)
    # The gadget works: proven on a throwaway interpreter, so the canary below means something.
    for i in (0, 1):
        probe = tmp_path / f"probe-{i}"
        subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"],
                       input=pickle_gadgets(probe)[i], check=True)
        assert probe.exists()

    canary = tmp_path / "canary"
    entries = []
    for i, gadget in enumerate(pickle_gadgets(canary)):
        entries += [ingress(f"gadget-{i}-job", {"job": gadget}, {"decode_error"}),
                    ingress(f"gadget-{i}-data", {"__data__": gadget}, {"decode_error"}),
                    ingress(f"gadget-{i}-data-faststream", {"__data__": FASTSTREAM_MAGIC + gadget}, {"decode_error"}),
                    pool(f"gadget-{i}-routed", {"routed": gadget}, {"decode_error"})]
    entries.append(ingress("good", {"job": Doc(good_job())}, set()))
    await wait_for_stack(redis_url, topo)
    await check_batch(redis_url, topo, roles, entries)
    assert not canary.exists(), "a pickle gadget ran"
    client = aioredis.Redis.from_url(redis_url)
    try:
        payloads = [d.payload for d in await new_dead_letters(client, topo, "0-0")]
    finally:
        await client.aclose()
    # The dead letters keep the original bytes for inspection (FastStream ones: the envelope).
    for gadget in pickle_gadgets(canary):
        assert payloads.count(gadget) == 3 and payloads.count(FASTSTREAM_MAGIC + gadget) == 1


def test_no_unsafe_deserialisers_in_the_code() -> None:
    """No pickle, marshal, yaml.load or eval anywhere a payload could reach (CI grep)."""
    modules = r"(pickle|cPickle|_pickle|marshal|shelve|dill|jsonpickle|yaml)"
    # Imports, also by name (a format called "yaml" in a CLI choice is no deserialiser).
    banned = re.compile(rf"^\s*(import\s+[\w., ]*?|from\s+)\b{modules}\b"
                        rf"|(import_module|__import__)\(\s*[\"']{modules}[\"']"
                        r"|\byaml\.(unsafe_)?load\(|(?<![\w.])(eval|exec)\(", re.M)
    hits = [f"{path.relative_to(ROOT)}: {m.group(0).strip()}"
            for package in ("broker", "workers", "policies") for path in (ROOT / package).rglob("*.py")
            for m in banned.finditer(path.read_text())]
    assert hits == []


# ---------------------------------------------------------------------------------------
# Deep nesting, and routed jobs that pass the schema but not the policy's input rules.


async def _single_bad_entry(roles: Roles, redis_url: str, prefix: str, entry: Entry, timeout: float) -> None:
    topo = Topology(prefix)
    roles.start("policy", env=ENV)
    roles.start("worker", "--pool", "gpu", "--grace", "5", env=ENV)
    await wait_for_stack(redis_url, topo)
    client = aioredis.Redis.from_url(redis_url)
    try:
        added = await add_entries(client, topo, [entry, ingress("good", {"job": Doc(good_job())}, set())], "one")

        async def settled() -> bool:
            alive(roles)
            letters = await new_dead_letters(client, topo, "0-0")
            return any(d.entry_id == added[0].entry_id for d in letters) and bool(
                await client.exists(topo.done(added[1].uid)))

        await eventually(settled, timeout=timeout, what=f"a dead letter for {entry.label}")
        await eventually(lambda: drained(client, topo), timeout=timeout, what="streams drained")
        (letter,) = await new_dead_letters(client, topo, "0-0")
        assert letter.reason in entry.reasons, letter
        alive(roles)
    finally:
        await client.aclose()


DEEP = 1800
"""Levels of nesting: past the interpreter's recursion limit (1000), still under the 4 KiB job limit."""


@pytest.mark.parametrize("field", ["zz", "metadata"])
async def test_deeply_nested_junk_on_ingress_is_dead_lettered(roles: Roles, redis_url: str, prefix: str,
                                                              field: str) -> None:
    # Regression: msgspec raises RecursionError (not DecodeError) when it skips a deeply
    # nested value; uncaught in _salvage it killed every policy worker that read the entry.
    bomb = b'{"id":"deep","model":"llama-3.1-8b","' + field.encode() + b'":' + b"[" * DEEP + b"]" * DEEP + b"}"
    assert len(bomb) < LIMIT
    # Nested past what the decoder reads: a decode error, even if a schema error came first.
    await _single_bad_entry(roles, redis_url, prefix, ingress("nested", {"job": bomb}, {"decode_error"}), 8)


async def test_deeply_nested_junk_on_a_pool_stream_is_dead_lettered(roles: Roles, redis_url: str,
                                                                     prefix: str) -> None:
    # Regression: the same RecursionError in decode_routed left the entry pending forever.
    head = json.dumps(routed(good_job(id="deep-routed")))[:-1].encode()
    bomb = head + b', "zz": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    entry = pool("nested", {"routed": bomb}, {"decode_error"})
    await _single_bad_entry(roles, redis_url, prefix, entry, 8)


async def test_routed_job_with_a_reserved_reply_stream_is_dead_lettered(roles: Roles, redis_url: str,
                                                                        prefix: str) -> None:
    entry = pool("reserved-reply", {"routed": Doc(routed(good_job(reply_to="jobs")))},
                 {"invalid_job", "decode_error"})
    await _single_bad_entry(roles, redis_url, prefix, entry, 8)
