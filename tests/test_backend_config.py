"""Pool backend configuration: ``backend``, ``[[pools.<name>.endpoints]]`` and their checks.

The pool configs that docs/backends.md shows for copying are loaded here too, so the page
stays true to the schema.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

import pytest

from policies.config import ConfigError, Endpoint, config_from_dict
from tests.conftest import ROOT

CLASSES = {"standard": {"ttft_ms": 2000}}


def pool(**fields: Any) -> dict[str, Any]:
    """A config whose one pool ``gpu`` is an openai pool with ``fields`` on top."""
    spec = {"models": ["llama-3.1-8b", "llama-3.3-70b"], "backend": "openai",
            "endpoints": [{"base_url": "http://gpu-0:8000/v1"}], **fields}
    return {"classes": CLASSES, "pools": {"gpu": spec}}


def error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return str(info.value)


def test_pools_default_to_the_simulated_backend() -> None:
    spec = config_from_dict({"classes": CLASSES, "pools": {"gpu": {"models": ["llama-3.1-8b"]}}}).pools["gpu"]
    assert spec.backend == "simulated" and spec.endpoints == ()


def test_an_openai_pool_with_endpoints_and_model_names() -> None:
    spec = config_from_dict(pool(request_timeout_s=30, endpoints=[
        {"base_url": "http://gpu-0:8000/v1", "api_key_env": "VLLM_KEY",
         "models": {"llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct"}},
        {"base_url": "https://api.example/v1", "api_key_file": "/run/secrets/key"},
    ])).pools["gpu"]
    first, second = spec.endpoints
    assert isinstance(first, Endpoint) and spec.request_timeout_s == 30
    assert first.serves("llama-3.1-8b") and not first.serves("llama-3.3-70b")
    assert first.upstream("llama-3.1-8b") == "meta-llama/Llama-3.1-8B-Instruct"
    assert second.serves("llama-3.3-70b") and second.upstream("llama-3.3-70b") == "llama-3.3-70b"


@pytest.mark.parametrize(("data", "expected"), [
    (pool(endpoints=[]), "pools.gpu: backend 'openai' needs at least one [[pools.gpu.endpoints]]"),
    ({"classes": CLASSES, "pools": {"gpu": {"models": ["llama-3.1-8b"], "endpoints": [{"base_url": "http://x"}]}}},
     "pools.gpu.endpoints: only backend 'openai' uses endpoints"),
    (pool(endpoints=[{"base_url": "gpu-0:8000"}]), "pools.gpu.endpoints[0].base_url must start with http://"),
    (pool(endpoints=[{"base_url": "http://x", "api_key_env": "K", "api_key_file": "f"}]),
     "pools.gpu.endpoints[0]: set api_key_env or api_key_file, not both"),
    (pool(endpoints=[{"base_url": "http://x", "models": {"llama-2": "x"}}]),
     "pools.gpu.endpoints[0].models: 'llama-2' is not one of the pool's models"),
    (pool(endpoints=[{"base_url": "http://x", "models": {"llama-3.1-8b": "x"}}]),
     "pools.gpu: no endpoint serves ['llama-3.3-70b']"),
    (pool(request_timeout_s=0), "pools.gpu.request_timeout_s must be positive"),
    (pool(backend="tpu"), "'tpu' (expected one of simulated, openai, minilm) - at `$.pools.gpu.backend`"),
    (pool(endpoints=[{"base_url": "http://x", "api_key": "sk-1"}]), "Object contains unknown field `api_key`"),
    ({"classes": CLASSES, "pools": {"gpu": {"models": ["minilm-l6"], "backend": "minilm"}}},
     "pools.gpu.kinds: backend 'minilm' serves only embeddings"),
    ({"classes": CLASSES, "pools": {"gpu": {"models": ["minilm-l6"], "kinds": ["embedding"], "backend": "minilm",
                                            "max_batch": 0}}}, "pools.gpu.max_batch must be at least 1"),
])
def test_bad_backend_configs_say_what_and_where(data: dict[str, Any], expected: str) -> None:
    assert expected in error(data)


def test_unknown_endpoint_keys_name_their_path() -> None:
    assert "$.pools.gpu.endpoints[0]" in error(pool(endpoints=[{"base_url": "http://x", "key": "sk-1"}]))


def test_a_key_pasted_into_api_key_env_is_refused_without_being_echoed() -> None:
    key = "sk-proj-Abc123-def456"
    message = error(pool(endpoints=[{"base_url": "http://x", "api_key_env": key}]))
    assert "api_key_env must be the *name* of an environment variable" in message and key not in message


def test_minilm_pool() -> None:
    spec = config_from_dict({"classes": CLASSES, "pools": {"gpu": {
        "models": ["minilm-l6"], "kinds": ["embedding"], "backend": "minilm", "max_batch": 64,
        "max_wait_ms": 2.5}}}).pools["gpu"]
    assert (spec.backend, spec.max_batch, spec.max_wait_ms) == ("minilm", 64, 2.5)


def documented_pools() -> list[str]:
    """The ```toml blocks of docs/backends.md."""
    text = (ROOT / "docs" / "backends.md").read_text(encoding="utf-8")
    return re.findall(r"```toml\n(.*?)```", text, flags=re.S)


def test_the_documented_pool_configs_are_valid() -> None:
    blocks = documented_pools()
    assert len(blocks) >= 2
    for block in blocks:
        data = tomllib.loads(block)
        data.setdefault("classes", {"interactive": {"ttft_ms": 500}, **CLASSES})
        data.setdefault("default_pool", next(iter(data["pools"])))
        config_from_dict(data)
