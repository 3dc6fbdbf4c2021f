"""The wire contract (msgspec Structs, decode_job) and the key topology. Pure: no Redis."""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.topology import RESERVED, Topology
from broker.wire import (
    VERSION,
    ChatMessage,
    InvalidJob,
    Job,
    Metrics,
    Result,
    Timing,
    decode_dead,
    decode_heartbeat,
    decode_job,
    decode_policy_heartbeat,
    decode_result,
    decode_routed,
    encode_job,
    json_encode,
    new_id,
)

CHAT = {"id": "job-1", "model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hi"}]}


def full_job() -> Job:
    return Job(
        id="tenant-a:job/1+x=y@z.q_r",
        model="llama-3.3-70b",
        kind="completion",
        tenant="acme",
        prompt="Once upon a time",
        max_tokens=512,
        slo="batch",
        deadline=1_800_000_000.5,
        reply_to="my-results.v2",
        created_at=1_700_000_000.25,
        metadata={"trace": "abc", "user": "42"},
    )


def raw(**fields: object) -> bytes:
    doc: dict[str, object] = {**CHAT, **fields}
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def rejects(data: bytes, reason: str = "invalid_job") -> str:
    with pytest.raises(InvalidJob) as info:
        decode_job(data)
    assert info.value.reason == reason, str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("make", [full_job, lambda: Job.chat("llama-3.1-8b", "hello", id="c1"),
                                  lambda: Job(id="e1", model="minilm-l6", kind="embedding", texts=["a", "b"])])
def test_json_round_trip(make: object) -> None:
    job = make()  # type: ignore[operator]
    data = encode_job(job)
    assert data.startswith(b"{")
    assert decode_job(data) == job


@pytest.mark.parametrize("make", [full_job, lambda: Job.chat("llama-3.1-8b", "hello", id="c1")])
def test_msgpack_round_trip(make: object) -> None:
    job = make()  # type: ignore[operator]
    data = msgspec.msgpack.encode(job)
    assert not data.lstrip().startswith(b"{")
    assert decode_job(data) == job


def test_json_with_leading_whitespace_decodes() -> None:
    assert decode_job(b"  \n\t" + raw()).id == "job-1"


def test_omit_defaults_writes_only_what_differs() -> None:
    job = Job.chat("llama-3.1-8b", "hi", id="x")
    assert json.loads(encode_job(job)) == {
        "id": "x", "model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hi"}],
    }
    doc = json.loads(encode_job(full_job()))
    assert doc["kind"] == "completion" and doc["tenant"] == "acme" and doc["max_tokens"] == 512
    assert "v" not in doc and "texts" not in doc and "messages" not in doc


def test_defaults_fill_in_on_decode() -> None:
    job = decode_job(raw())
    assert (job.kind, job.tenant, job.max_tokens, job.reply_to, job.v) == ("chat", "default", 256, "results", VERSION)
    assert job.slo is job.deadline is job.created_at is job.prompt is job.texts is None
    assert job.metadata == {}


def test_unknown_job_fields_are_refused_by_name() -> None:
    # A misspelt field must not silently fall back to its default.
    with pytest.raises(InvalidJob, match="max_token") as err:
        decode_job(raw(max_token=5))
    assert err.value.reason == "invalid_job"


def test_internal_messages_skip_unknown_fields_for_forward_compatibility() -> None:
    from broker.wire import decode_result

    result = decode_result(b'{"id":"x","status":"ok","model":"m","kind":"chat","tenant":"t","future":[1],"v":2}')
    assert result.id == "x" and result.v == 2


def test_chat_helper() -> None:
    a = Job.chat("llama-3.1-8b", "hello")
    b = Job.chat("llama-3.1-8b", "hello")
    assert a.kind == "chat" and a.model == "llama-3.1-8b"
    assert a.messages == [ChatMessage("user", "hello")]
    assert a.id != b.id and re.fullmatch(r"[0-9a-f]{32}", a.id)
    c = Job.chat("m", "x", id="mine", tenant="acme", max_tokens=5, slo="interactive")
    assert (c.id, c.tenant, c.max_tokens, c.slo) == ("mine", "acme", 5, "interactive")
    assert decode_job(encode_job(c)) == c


def test_new_id_is_valid_and_unique() -> None:
    ids = {new_id() for _ in range(100)}
    assert len(ids) == 100
    for i in ids:
        assert decode_job(raw(id=i)).id == i


def test_input_chars_and_prompt_tokens() -> None:
    chat = Job(id="a", model="m", messages=[ChatMessage("system", "abcd"), ChatMessage("user", "efghijkl")])
    assert chat.input_chars() == 12 and chat.prompt_tokens() == 3
    assert Job(id="a", model="m", kind="completion", prompt="x" * 4001).prompt_tokens() == 1000
    assert Job(id="a", model="m", kind="embedding", texts=["abcd", "efgh"]).prompt_tokens() == 2
    assert Job(id="a", model="m", kind="completion", prompt="").prompt_tokens() == 1  # never zero
    assert Job(id="a", model="m", messages=[ChatMessage("user", "ab")]).prompt_tokens() == 1


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("fields", "path"), [
    ({"id": 5}, "$.id"),
    ({"model": None}, "$.model"),
    ({"kind": "translate"}, "$.kind"),
    ({"tenant": ["a"]}, "$.tenant"),
    ({"max_tokens": "many"}, "$.max_tokens"),
    ({"max_tokens": 1.5}, "$.max_tokens"),
    ({"messages": [{"role": "user", "content": 1}]}, "$.messages[0].content"),
    ({"messages": [{"role": "user"}]}, "$.messages[0]"),
    ({"messages": "hi"}, "$.messages"),
    ({"deadline": "soon"}, "$.deadline"),
    ({"metadata": {"k": 1}}, "$.metadata"),
    ({"slo": 3}, "$.slo"),
])
def test_wrong_types_name_the_path(fields: dict[str, object], path: str) -> None:
    assert path in rejects(raw(**fields))


@pytest.mark.parametrize("missing", ["id", "model"])
def test_required_fields(missing: str) -> None:
    assert f"`{missing}`" in rejects(raw(**{missing: ...}))


@pytest.mark.parametrize(("kind", "fields", "needs", "found"), [
    ("chat", {"messages": ..., "prompt": "hi"}, "$.messages", "`$.prompt`"),
    ("chat", {"messages": ...}, "$.messages", "none"),
    ("chat", {"texts": ["a"]}, "$.messages", "`$.messages`, `$.texts`"),
    ("completion", {}, "$.prompt", "`$.messages`"),
    ("embedding", {"messages": ..., "prompt": "x"}, "$.texts", "`$.prompt`"),
])
def test_input_must_match_kind(kind: str, fields: dict[str, object], needs: str, found: str) -> None:
    msg = rejects(raw(kind=kind, **fields))
    assert f"a {kind} job needs exactly `{needs}`" in msg
    assert msg.endswith(f"found {found}")


def test_empty_messages_rejected() -> None:
    assert "`$.messages` is empty" in rejects(raw(messages=[]))


def test_empty_texts_rejected() -> None:
    assert "`$.texts` is empty" in rejects(raw(kind="embedding", messages=..., texts=[]))


@pytest.mark.parametrize("bad", ["", "has space", "semi;colon", "brace{x}", "star*", "é", "a\nb"])
def test_bad_id_pattern(bad: str) -> None:
    assert "$.id" in rejects(raw(id=bad))


def test_id_length_limit() -> None:
    assert decode_job(raw(id="a" * 128)).id == "a" * 128
    assert "$.id" in rejects(raw(id="a" * 129))


@pytest.mark.parametrize("name", sorted(RESERVED))
def test_reserved_reply_to_rejected(name: str) -> None:
    msg = rejects(raw(reply_to=name))
    assert "$.reply_to" in msg and "reserved" in msg


@pytest.mark.parametrize("bad", ["a:b", "a{b}", "", "x" * 65, "with space"])
def test_bad_reply_to_rejected(bad: str) -> None:
    assert "$.reply_to" in rejects(raw(reply_to=bad))


def test_reply_to_length_limit() -> None:
    assert decode_job(raw(reply_to="r" * 64)).reply_to == "r" * 64


@pytest.mark.parametrize(("value", "ok"), [(0, True), (1, True), (1_000_000, True), (-1, False), (1_000_001, False)])
def test_max_tokens_bounds(value: int, ok: bool) -> None:
    if ok:
        assert decode_job(raw(max_tokens=value)).max_tokens == value
    else:
        assert "$.max_tokens" in rejects(raw(max_tokens=value))


def test_model_and_tenant_must_be_non_empty() -> None:
    assert "$.model" in rejects(raw(model=""))
    assert "$.tenant" in rejects(raw(tenant=""))
    assert "$.tenant" in rejects(raw(tenant="t" * 65))


@pytest.mark.parametrize("data", [b"", b"   ", b"{", b'{"id": "a",', b"\xc1", b"\xff\xfe garbage",
                                  b'{"id": "a" "model": "m"}', b"\x81\xa2id"])
def test_undecodable_bytes_are_decode_errors(data: bytes) -> None:
    assert "msgpack" in rejects(data, "decode_error")


@pytest.mark.parametrize("data", [b"[1, 2]", b"null", b'"job"', b"42", b"\x91\x01", b"\x05",
                                  msgspec.msgpack.encode(["id", "x"])])
def test_a_body_that_is_not_an_object_or_map_is_a_decode_error(data: bytes) -> None:
    msg = rejects(data, "decode_error")
    assert "got `int`" not in msg  # JSON `[...]` must not be reported as a msgpack int


@pytest.mark.parametrize("data", [
    b'{"id": "j", "model": "m", "prompt": "\xff", "kind": "completion"}',  # bad UTF-8, id readable
    b'{"id": 7, "model": "m", "zz": "\xff"}',                      # bad UTF-8 after a schema error
    b"\x81\xa2id\xc1",                                              # msgpack with an invalid opcode
    msgspec.msgpack.encode({**CHAT}) + b"junk",                     # a whole msgpack job, then junk
    msgspec.msgpack.encode({"id": 1}) + b"junk",                    # a schema error, then junk
    b"\x80\x02junk",                                                # an empty map, then junk
    b"\x81\x81\x01\x02\x03",                                          # a map as a map key
])
def test_a_body_that_cannot_be_decoded_is_a_decode_error_whatever_its_schema(data: bytes) -> None:
    # Regression: a msgspec ValidationError raised before the decoder reached the broken
    # bytes made these `invalid_job` ("Object missing required field `id`").
    msg = rejects(data, "decode_error")
    assert "expected a UTF-8 JSON object or a msgpack map" in msg and "\n" not in msg


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_pickle_is_a_decode_error_that_says_so(protocol: int) -> None:
    import pickle  # only to make the bytes: nothing here unpickles

    data = pickle.dumps({"id": "j", "model": "m"}, protocol=protocol)
    assert f"a Python pickle (protocol {protocol})" in rejects(data, "decode_error")


def test_job_data_in_error_messages_is_escaped() -> None:
    # msgspec quotes an unknown field's name as it is: a newline or an ANSI escape in it
    # must not reach a log line or a terminal (`dead list`) raw.
    msg = rejects(raw(**{"zz\n2026-01-01 INFO forged\x1b[31m\x9b\u2028": 1}))
    assert msg.isprintable()
    assert "zz\\n2026-01-01 INFO forged\\x1b[31m\\x9b\\u2028" in msg


def test_an_empty_map_is_an_invalid_job() -> None:
    assert "`id`" in rejects(b"\x80", "invalid_job")
    assert "`id`" in rejects(b"{}", "invalid_job")


def test_msgpack_validation_errors_name_the_path() -> None:
    data = msgspec.msgpack.encode({**CHAT, "max_tokens": -3})
    assert "$.max_tokens" in rejects(data)


def test_encode_job_validates_too() -> None:
    with pytest.raises(InvalidJob, match="needs exactly"):
        encode_job(Job(id="a", model="m", kind="completion"))
    with pytest.raises(InvalidJob, match="reserved"):
        encode_job(Job.chat("m", "x", reply_to="dead"))


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_deep_nesting_raises_invalid_job(fmt: str) -> None:
    if fmt == "json":
        data = b'{"id":"a","model":"m","messages":[{"role":"u","content":"c"}],"x":' + b"[" * 5000 + b"]" * 5000 + b"}"
    else:
        # fixmap of 4: id, model, messages, x=[[[...]]] (fixarray of 1, nested)
        head = msgspec.msgpack.encode({"id": "a", "model": "m", "messages": [{"role": "u", "content": "c"}]})
        data = bytes([0x84]) + head[1:] + msgspec.msgpack.encode("x") + b"\x91" * 5000 + b"\xc0"
    with pytest.raises(InvalidJob):
        decode_job(data)


@pytest.mark.parametrize("field", ["deadline", "created_at"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_times_rejected(field: str, value: float) -> None:
    with pytest.raises(InvalidJob):
        decode_job(msgspec.msgpack.encode({**CHAT, field: value}))


@pytest.mark.parametrize("field", ["id", "reply_to"])
def test_trailing_newline_rejected(field: str) -> None:
    assert f"$.{field}" in rejects(raw(**{field: "abc\n"}))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_give_a_job_or_invalid_job(data: bytes) -> None:
    try:
        job = decode_job(data)
    except InvalidJob as exc:
        assert exc.reason in ("decode_error", "invalid_job")
        assert str(exc)
    else:
        assert isinstance(job, Job)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
field_values = {
    "id": st.sampled_from(["a", "job-1", "", "bad id", 7]) | json_values,
    "model": st.sampled_from(["llama-3.1-8b", ""]) | json_values,
    "kind": st.sampled_from(["chat", "completion", "embedding", "other"]) | json_values,
    "messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=5)}), max_size=2)
    | json_values,
    "prompt": st.text(max_size=5) | json_values,
    "texts": st.lists(st.text(max_size=5), max_size=2) | json_values,
    "max_tokens": st.integers(-5, 2_000_000) | json_values,
    "reply_to": st.sampled_from(["results", "jobs", "a:b", "x"]) | json_values,
    "deadline": st.floats(allow_nan=False, allow_infinity=False) | json_values,
    "metadata": st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2) | json_values,
}
job_docs = st.fixed_dictionaries({}, optional=field_values)


@settings(max_examples=300, deadline=None)
@given(job_docs, st.sampled_from(["json", "msgpack"]))
def test_job_shaped_documents_give_a_job_or_invalid_job(doc: dict[str, object], fmt: str) -> None:
    data = json.dumps(doc).encode() if fmt == "json" else msgspec.msgpack.encode(doc)
    try:
        job = decode_job(data)
    except InvalidJob as exc:
        assert exc.reason == "invalid_job", str(exc)
    else:
        # Whatever is accepted can be re-encoded and comes back equal.
        assert decode_job(encode_job(job)) == job
        assert decode_job(msgspec.msgpack.encode(job)) == job


# --------------------------------------------------------------------------- metrics


def timing(**kw: float) -> Timing:
    base = dict(created_at=100.0, routed_at=100.01, dequeued_at=100.05, started_at=100.1,
                first_token_at=100.3, finished_at=101.3)
    base.update(kw)
    return Timing(**base)  # type: ignore[arg-type]


def test_metrics_from_timing() -> None:
    m = Metrics.of(timing(), output_tokens=11)
    assert m.queue_time_ms == pytest.approx(100.0)
    assert m.time_to_first_token_ms == pytest.approx(300.0)
    assert m.time_per_output_token_ms == pytest.approx(100.0)  # 1000 ms over 10 gaps
    assert m.inference_time_ms == pytest.approx(1200.0)
    assert m.e2e_latency_ms == pytest.approx(1300.0)


@pytest.mark.parametrize("tokens", [0, 1])
def test_tpot_is_none_under_two_tokens(tokens: int) -> None:
    m = Metrics.of(timing(), output_tokens=tokens)
    assert m.time_per_output_token_ms is None
    assert m.e2e_latency_ms == pytest.approx(1300.0)


def test_tpot_with_two_tokens_is_the_single_gap() -> None:
    assert Metrics.of(timing(), output_tokens=2).time_per_output_token_ms == pytest.approx(1000.0)


def test_result_round_trips_through_json() -> None:
    t = timing()
    r = Result(id="x", status="ok", model="m", kind="chat", tenant="t", slo="interactive", pool="accel",
               output="hello", timing=t, metrics=Metrics.of(t, 5), slo_met=True, route_reason="hint")
    assert decode_result(json_encode(r)) == r
    assert "error" not in json.loads(json_encode(r))  # omit_defaults


def test_typed_decoders_reject_wrong_documents() -> None:
    for decode in (decode_result, decode_routed, decode_dead, decode_heartbeat, decode_policy_heartbeat):
        with pytest.raises(msgspec.ValidationError):
            decode(b"{}")


def test_a_result_copies_its_jobs_identity() -> None:
    job = full_job()
    r = Result.for_job(job, "expired", slo="batch", error="deadline passed before start")
    assert (r.id, r.model, r.kind, r.tenant) == (job.id, job.model, job.kind, job.tenant)
    assert (r.status, r.slo, r.error, r.pool, r.timing) == ("expired", "batch", "deadline passed before start",
                                                           None, None)
    assert decode_result(json_encode(r)) == r


def test_a_rejected_jobs_result_copies_what_could_be_read_of_it() -> None:
    from broker.ingress import salvage

    salvaged = salvage(b'{"id": "j-1", "model": "m", "kind": "sculpture", "tenant": "acme", "texts": 5}')
    assert salvaged is not None
    r = Result.for_job(salvaged, "failed", error="invalid_job: ...")
    assert (r.id, r.model, r.kind, r.tenant) == ("j-1", "m", "chat", "acme")  # an unknown kind reads as chat
    assert decode_result(json_encode(r)) == r


def test_results_are_built_in_one_place() -> None:
    """Every result is made by Result.for_job: no other code assembles one field by field."""
    root = Path(__file__).resolve().parent.parent
    built, for_job = [], 0
    for package in ("broker", "workers", "cli", "evaluation", "policies"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Call):
                    continue
                name = node.func.id if isinstance(node.func, ast.Name) else \
                    node.func.attr if isinstance(node.func, ast.Attribute) else ""
                if name == "Result":
                    built.append(f"{path.relative_to(root)}:{node.lineno}")
                for_job += name == "for_job"
    assert built == [], f"build these with Result.for_job: {built}"
    assert for_job >= 3  # the scan sees the calls (policy worker, pool worker)


def test_a_heartbeat_from_before_the_structs_decodes() -> None:
    """Beats as pool and policy workers wrote them before they were Structs (no ``v``)."""
    beat = decode_heartbeat(b'{"ts": 1767225600.5, "in_flight": 2, "capacity": 8, "seq": 3, "obs": [{"model": "m", '
                            b'"prompt_tokens": 10, "output_tokens": 5, "concurrency": 2, "ttft_ms": 12.5, '
                            b'"tpot_ms": null, "at": 1767225600.4}], "cooling_until": null}')
    assert (beat.in_flight, beat.capacity, beat.seq, beat.v, beat.obs[0].ttft_ms) == (2, 8, 3, VERSION, 12.5)
    assert decode_heartbeat(json_encode(beat)) == beat
    policy = decode_policy_heartbeat(b'{"ts": 1767225600.5, "routed": 7, "dead": 1}')
    assert (policy.routed, policy.dead, policy.v) == (7, 1, VERSION)


# --------------------------------------------------------------------------- topology


def hash_tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes (its hash tag rules)."""
    start = key.find("{")
    if start == -1:
        return key
    end = key.find("}", start + 1)
    if end == -1 or end == start + 1:
        return key
    return key[start + 1:end]


def all_keys(t: Topology) -> list[str]:
    return [t.jobs, t.dead, t.pool("gpu"), t.pool("gpu", 2), t.pool("accel"), t.reply("results"), t.reply("mine"),
            t.routed("job-1"), t.done("job-1"), t.heartbeats("gpu"), t.policy_heartbeats,
            t.routed("a{b}c"), t.done("{x}")]


@pytest.mark.parametrize("prefix", ["ib", "prod-eu.1", "A_b", "x" * 32])
def test_every_key_shares_the_prefix_hash_tag(prefix: str) -> None:
    t = Topology(prefix)
    keys = all_keys(t)
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert key.startswith(f"{prefix}:{{{prefix}}}:"), key
        assert hash_tag(key) == prefix, key


def test_default_key_names() -> None:
    t = Topology()
    assert t.jobs == "ib:{ib}:jobs"
    assert t.dead == "ib:{ib}:dead"
    assert t.pool("gpu") == "ib:{ib}:pool:gpu"
    assert t.pool("gpu", 2) == "ib:{ib}:pool:gpu:2"  # a lower-priority lane
    assert t.errors("gpu", 2) == "ib:{ib}:err:gpu:2:" and t.errors("gpu") == "ib:{ib}:err:gpu:"
    assert t.reply("results") == "ib:{ib}:results"


def test_deployments_do_not_share_keys() -> None:
    assert not set(all_keys(Topology("a"))) & set(all_keys(Topology("b")))


@pytest.mark.parametrize("name", sorted(RESERVED))
def test_reserved_reply_names_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="reserved"):
        Topology().reply(name)


def test_no_reply_stream_collides_with_a_broker_key() -> None:
    t = Topology()
    internal = {t.jobs, t.dead}
    for name in ["results", "jobs2", "deadish"]:
        assert t.reply(name) not in internal


@pytest.mark.parametrize("prefix", ["", "x" * 33, "a b", "a:b", "a{b", "a}b", "é", "\nab", "a\nb"])
def test_invalid_prefixes_rejected(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Topology(prefix)


def test_prefix_with_trailing_newline_rejected() -> None:
    with pytest.raises(ValueError, match="prefix"):
        Topology("ib\n")


# --------------------------------------------------------------------------- FastStream envelopes


async def test_faststream_envelopes_unwrap_and_broken_ones_are_decode_errors(
        redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    """Envelopes as a real FastStream publisher writes them (its public API, a real Redis)."""
    from faststream.redis import RedisBroker

    from broker.ingress import entry_payload

    body = json_encode(Job.chat("llama-3.1-8b", "hi", id="fs"))
    stream = f"{prefix}:envelopes"
    async with RedisBroker(redis_url) as fs:
        await fs.publish(body, stream=stream, reply_to="r", correlation_id="c")
        await fs.publish(body, stream=stream, headers={"traceparent": "00-ab-cd-01", "x" * 300: "y"})
    entries = await client.xrange(stream)
    assert len(entries) == 2
    for _id, fields in entries:
        data = fields[b"__data__"]
        assert decode_job(entry_payload({b"__data__": data})).id == "fs"
        # FastStream's own parser hands these back whole; they must be decode errors saying why.
        for broken in (data[:8] + b"\x00\x02" + data[10:], data[:30], data[:14], data[:8] + body):
            with pytest.raises(InvalidJob) as info:
                entry_payload({b"__data__": broken})
            assert info.value.reason == "decode_error" and "bad FastStream envelope" in str(info.value)


def test_a_jobs_shard_is_its_cluster_slot_mod_the_shard_count_and_shard_keys_share_one_tag() -> None:
    from redis.crc import key_slot

    from broker.topology import Topology, shard_of

    # CLUSTER KEYSLOT of an id without braces: CRC16 (XMODEM) of the id mod 16384.
    assert key_slot(b"123456789") == 0x31C3 % 16384
    assert [shard_of(i, 1) for i in ("a", "b", "c")] == [0, 0, 0]
    assert shard_of("abc", 3) == key_slot(b"abc") % 3
    one = Topology("ib")
    assert one.jobs == "ib:{ib}:jobs" and one.every_shard == [one]  # one shard: the old key names
    three = Topology("ib", shards=3)
    assert [t.jobs for t in three.every_shard] == ["ib:{ib.0}:jobs", "ib:{ib.1}:jobs", "ib:{ib.2}:jobs"]
    job = three.of_job("abc")
    assert job.shard == shard_of("abc", 3)
    keys = [job.jobs, job.pool("gpu", 1), job.done("abc"), job.routed("abc"), job.reply("results"), job.dead]
    assert {key_slot(k.encode()) for k in keys} == {key_slot(f"{{ib.{job.shard}}}".encode())}
    assert {t.heartbeats("gpu") for t in three.every_shard} == {"ib:{ib.0}:hb:pool:gpu"}
    with pytest.raises(ValueError, match="shard"):
        Topology("ib", shards=0)
