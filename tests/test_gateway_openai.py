"""The gateway's pure parts: OpenAI bodies to jobs and results to bodies, tiers, models, keys, settings."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path

import pytest

from broker.config import load_config
from broker.wire import Job, Metrics, Result, Timing, Usage
from gateway.keys import KeyRing, KeysError, key_line
from gateway.openai import ApiError, Catalog, Tiers, to_job, to_response
from gateway.responses import chunk, timing_headers, usage_chunk
from gateway.settings import GatewaySettings

CONFIG = load_config()
TIERS = Tiers.of(CONFIG)
CATALOG = Catalog.of(CONFIG)


def job_of(endpoint: str, body: object, **kw: object) -> Job:
    args: dict[str, object] = {"job_id": "j1", "tenant": "acme", "tiers": TIERS, "deadline": None,
                               "catalog": CATALOG, **kw}
    return to_job(endpoint, json.dumps(body).encode(), **args)  # type: ignore[arg-type]


def error_of(endpoint: str, body: object, **kw: object) -> ApiError:
    with pytest.raises(ApiError) as caught:
        job_of(endpoint, body, **kw)
    return caught.value


CHAT = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "Hi"}]}


def test_a_chat_request_becomes_a_chat_job_of_the_keys_tenant_whatever_the_body_says() -> None:
    job = job_of("chat", {**CHAT, "tenant": "evil", "user": "u1", "temperature": 0.2, "max_tokens": 7,
                          "some_future_field": {"x": 1}}, deadline=1.8e9)
    assert (job.kind, job.tenant, job.max_tokens, job.deadline, job.stream) == ("chat", "acme", 7, 1.8e9, False)
    assert [(m.role, m.content) for m in job.messages] == [("user", "Hi")]


def test_max_completion_tokens_wins_over_max_tokens_and_text_parts_are_joined() -> None:
    job = job_of("chat", {"model": "llama-3.1-8b", "max_tokens": 9, "max_completion_tokens": 3,
                          "messages": [{"role": "system", "content": [{"type": "text", "text": "a"},
                                                                      {"type": "text", "text": "b"}]},
                                       {"role": "assistant", "content": None}, {"role": "user", "content": "q"}]})
    assert job.max_tokens == 3
    assert [m.content for m in job.messages] == ["ab", "", "q"]


@pytest.mark.parametrize(("endpoint", "body", "status", "param", "code"), [
    ("chat", {"messages": []}, 400, "model", None),
    ("chat", {"model": "llama-3.1-8b"}, 400, "messages", None),
    ("chat", {**CHAT, "messages": []}, 400, "messages", None),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0].type", None),
    ("chat", {**CHAT, "n": 2}, 400, "n", None),
    ("chat", {**CHAT, "max_tokens": -1}, 400, "max_tokens", None),
    ("chat", {**CHAT, "service_tier": "gold"}, 400, "service_tier", None),
    ("chat", {**CHAT, "model": "gpt-9"}, 404, "model", "model_not_found"),
    ("embedding", {"model": "minilm-l6", "input": []}, 400, "input", None),
    ("embedding", {"model": "minilm-l6", "input": ["a", ""]}, 400, "input[1]", None),
    ("embedding", {"model": "minilm-l6", "input": [[1, 2]]}, 400, "input[0]", None),
    ("embedding", {"model": "minilm-l6", "input": "a", "dimensions": 8}, 400, "dimensions", None),
    ("completion", {"model": "llama-3.1-8b", "prompt": ["a", "b"]}, 400, "prompt", None),
])
def test_bad_requests_are_answered_in_openais_error_format_naming_the_parameter(
        endpoint: str, body: object, status: int, param: str, code: str | None) -> None:
    error = error_of(endpoint, body)
    assert (error.status, error.param, error.code) == (status, param, code), error.message
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}  # type: ignore[arg-type]
    assert "`$" not in error.message


def test_a_body_that_is_not_json_is_a_400_not_a_crash() -> None:
    for body in (b"", b"{", b"\xff\xfe", b"[1]", b'"text"', b"{" * 10_000):
        with pytest.raises(ApiError) as caught:
            to_job("chat", body, job_id="j", tenant="t", tiers=TIERS, deadline=None)
        assert caught.value.status == 400


def test_service_tiers_map_to_classes_and_the_header_overrides_them() -> None:
    assert job_of("chat", {**CHAT, "service_tier": "priority"}).slo == "interactive"
    assert job_of("chat", {**CHAT, "service_tier": "flex"}).slo == "batch"
    assert job_of("chat", {**CHAT, "service_tier": "default"}).slo is None  # the policy's rules decide
    assert job_of("chat", CHAT).slo is None
    assert job_of("chat", {**CHAT, "service_tier": "flex"}, slo="standard").slo == "standard"
    assert error_of("chat", CHAT, slo="platinum").status == 400
    custom = Tiers.of(CONFIG, {"flex": "standard", "default": "batch"})
    assert job_of("chat", {**CHAT, "service_tier": "flex"}, tiers=custom).slo == "standard"
    assert job_of("chat", CHAT, tiers=custom).slo == "batch"
    with pytest.raises(ValueError, match="not a class"):
        Tiers.of(CONFIG, {"flex": "cheap"})
    assert (TIERS.applied("interactive"), TIERS.applied("batch"), TIERS.applied("standard")) == \
        ("priority", "flex", "default")


def test_completions_take_one_prompt_and_openais_default_of_16_tokens() -> None:
    job = job_of("completion", {"model": "llama-3.1-8b", "prompt": ["once"], "stream": True,
                                "stream_options": {"include_usage": True}})
    assert (job.kind, job.prompt, job.max_tokens, job.stream) == ("completion", "once", 16, True)
    assert job.metadata == {"include_usage": "1"}


def ok_result(job: Job, **fields: object) -> Result:
    timing = Timing(created_at=100.0, routed_at=100.001, dequeued_at=100.002, started_at=100.003,
                    first_token_at=100.01, finished_at=100.1)
    return Result.for_job(job, "ok", slo="interactive", pool="accel", route_reason="rule 2; fast\r\nX-Evil: 1",  # type: ignore[arg-type]
                          timing=timing, metrics=Metrics.of(timing, 5), **fields)


def test_a_chat_result_becomes_a_chat_completion_with_usage_and_the_broker_field() -> None:
    job = job_of("chat", {**CHAT, "max_tokens": 5})
    body = to_response("chat", job, ok_result(job, output="hello", usage=Usage(prompt_tokens=3, completion_tokens=5)),
                       tiers=TIERS)
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-j1" and body["created"] == 100
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hello", "refusal": None},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert body["service_tier"] == "priority"
    assert body["broker"]["pool"] == "accel" and body["broker"]["queue_time_ms"] == pytest.approx(3, abs=0.01)  # type: ignore[index]


def test_timing_headers_are_one_printable_line_each() -> None:
    job = job_of("chat", CHAT)
    headers = timing_headers(ok_result(job, output="x"))
    assert headers["x-ib-pool"] == "accel" and headers["x-ib-ttft-ms"] == "10.0"
    assert all(v.isprintable() and "\n" not in v for v in headers.values())


def test_embeddings_come_as_floats_or_as_openais_base64_float32() -> None:
    vectors = [[0.5, -1.25], [2.0, 0.0]]
    job = job_of("embedding", {"model": "minilm-l6", "input": ["a", "b"]})
    body = to_response("embedding", job, ok_result(job, embeddings=vectors))
    assert [d["embedding"] for d in body["data"]] == vectors  # type: ignore[attr-defined]
    assert body["usage"] == {"prompt_tokens": 1, "total_tokens": 1}
    b64 = job_of("embedding", {"model": "minilm-l6", "input": "a", "encoding_format": "base64"})
    encoded = to_response("embedding", b64, ok_result(b64, embeddings=vectors[:1]))["data"][0]["embedding"]  # type: ignore[index]
    assert list(struct.unpack("<2f", base64.b64decode(encoded))) == vectors[0]


@pytest.mark.parametrize(("status", "http", "retry"), [("rejected", 429, 3), ("expired", 504, None),
                                                       ("failed", 502, None), ("cancelled", 409, None)])
def test_results_that_are_not_ok_become_their_http_errors(status: str, http: int, retry: int | None) -> None:
    job = job_of("chat", CHAT)
    result = Result.for_job(job, status, error="slo_unattainable: queue", retry_after_s=2.2)  # type: ignore[arg-type]
    with pytest.raises(ApiError) as caught:
        to_response("chat", job, result)
    assert caught.value.status == http
    assert (caught.value.retry_after_s and round(caught.value.retry_after_s + 0.4)) == retry


def test_stream_chunks_carry_the_role_first_and_usage_last_when_asked() -> None:
    job = job_of("chat", {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    first = chunk("chat", job, 5, "he", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "he"}  # type: ignore[index]
    assert first["usage"] is None and first["object"] == "chat.completion.chunk"
    last = usage_chunk("chat", job, 5, None, 4)
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
    plain = job_of("chat", {**CHAT, "stream": True})
    assert "usage" not in chunk("chat", plain, 5, "x")


def test_the_catalog_lists_the_models_of_the_policy_config_and_what_each_serves() -> None:
    body = CATALOG.body()
    assert [m["id"] for m in body["data"]] == ["llama-3.1-8b", "llama-3.3-70b", "minilm-l6"]  # type: ignore[attr-defined]
    only_embeddings = Catalog(kinds={"e5": frozenset({"embedding"})})
    error = error_of("chat", {**CHAT, "model": "e5"}, catalog=only_embeddings)
    assert (error.status, error.param, error.code) == (400, "model", "model_not_supported")


def test_keys_are_kept_hashed_and_map_to_their_tenant() -> None:
    line = key_line("sk-one", "acme")
    assert line == f"{hashlib.sha256(b'sk-one').hexdigest()} acme"
    ring = KeyRing(KeyRing.entries(f"# keys\n{line}\n\n{key_line('sk-two', 'beta')}  # ops\n", "keys.txt"))
    assert (ring.tenant("sk-one"), ring.tenant("sk-two"), ring.tenant("sk-three"), ring.tenant("")) == \
        ("acme", "beta", None, None)
    assert "sk-one" not in repr(ring.digests)


def test_a_malformed_keys_line_is_named_by_number_and_never_echoed() -> None:
    with pytest.raises(KeysError) as caught:
        KeyRing.entries(f"{key_line('a', 't')}\nsk-raw-secret acme\n", "keys.txt")
    assert "entry 2" in str(caught.value) and "sk-raw-secret" not in str(caught.value)


def test_gateway_settings_come_from_the_env_and_need_keys_unless_no_auth(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no API keys configured"):
        GatewaySettings.from_env({}).keyring()
    assert GatewaySettings.from_env({"IB_GATEWAY_NO_AUTH": "1"}).keyring() is None
    with pytest.raises(ValueError, match="both set"):  # never silently open when keys were meant to apply
        GatewaySettings.from_env({"IB_GATEWAY_NO_AUTH": "true", "IB_GATEWAY_KEYS": key_line("k", "t")}).keyring()
    keys = tmp_path / "keys.txt"
    keys.write_text(key_line("k1", "acme") + "\n")
    env = {"IB_GATEWAY_KEYS_FILE": str(keys), "IB_GATEWAY_KEYS": key_line("k2", "beta"), "IB_GATEWAY_PORT": "9001",
           "IB_GATEWAY_TIERS": "flex=standard,default="}
    settings = GatewaySettings.from_env(env, grace_s=3)
    ring = settings.keyring()
    assert ring is not None and (ring.tenant("k1"), ring.tenant("k2")) == ("acme", "beta")
    assert (settings.port, settings.grace_s, settings.tier_map(CONFIG).slo_of["flex"]) == (9001, 3, "standard")
    with pytest.raises(ValueError, match="TIER=CLASS"):
        GatewaySettings.from_env({"IB_GATEWAY_TIERS": "gold=batch"}).tier_map(CONFIG)
    with pytest.raises(ValueError, match="IB_GATEWAY_PORT|port"):
        GatewaySettings.from_env({"IB_GATEWAY_PORT": "99999"})
