"""The AsyncAPI document: current, valid against the official AsyncAPI 3 schema, complete.

Validation is offline, against the official schema vendored in tests/asyncapi/ (see its
README for source and licence). Completeness is checked against :class:`Topology` itself:
every key it can produce, with and without its optional parameters, must be a channel
address (a stream) or an ``x-redis-keys`` entry, so a new key fails here until documented.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
import yaml

from broker import wire
from broker.topology import POLICY_GROUP, WORKER_GROUP, Topology
from cli import asyncapi

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "asyncapi.yaml"
SCHEMA = Path(__file__).resolve().parent / "asyncapi" / "asyncapi-3.0.0.schema.json"
REGENERATE = "inference-broker asyncapi --out docs/asyncapi.yaml"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DOC.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(SCHEMA.read_text(encoding="utf-8")))


def test_checked_in_document_is_current() -> None:
    fresh = asyncapi.render("yaml")
    assert DOC.read_text(encoding="utf-8") == fresh, f"docs/asyncapi.yaml is stale: run `{REGENERATE}`"


def test_yaml_and_json_outputs_are_the_same_document() -> None:
    assert yaml.safe_load(asyncapi.render("yaml")) == json.loads(asyncapi.render("json"))


def test_document_validates_against_the_asyncapi_3_schema(doc: dict[str, Any],
                                                          validator: jsonschema.Draft7Validator) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(doc)]
    assert not errors, "\n".join(errors[:20])
    assert doc["asyncapi"].startswith("3.")


@pytest.mark.parametrize(("path", "value"), [
    (("asyncapi",), "2.6.0"),
    (("channels", "jobs", "adress"), "typo"),
    (("operations", "policy.receive.jobs", "action"), "consume"),
    (("components", "messages", "job", "contentType"), 42),
])
def test_the_validator_catches_a_broken_document(doc: dict[str, Any], validator: jsonschema.Draft7Validator,
                                                 path: tuple[str, ...], value: object) -> None:
    """Guard against a vacuous validation: the schema's $refs resolve and bite."""
    broken = copy.deepcopy(doc)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert list(validator.iter_errors(broken))


def _pattern(key: str, prefix: str | None = None) -> str:
    """A key with every variable part (prefix, hash tag, parameters) as ``{}``."""
    if prefix:
        key = key.replace(f"{{{prefix}}}", "{}").replace(prefix, "{}")
    return re.sub(r"\{\w*\}", "{}", key)


def topology_key_patterns() -> set[str]:
    """Every key shape Topology produces: each member, with required parameters only and with all."""
    prefix = "TOPOPREFIX"
    topo = Topology(prefix)
    patterns: set[str] = set()
    for name, member in vars(Topology).items():
        if name.startswith("_") or name in asyncapi.NAVIGATION:
            continue
        if isinstance(member, property):
            patterns.add(_pattern(getattr(topo, name), prefix))
        elif callable(member):
            params = list(inspect.signature(member).parameters.values())[1:]
            required = {p.name: "{x}" for p in params if p.default is inspect.Parameter.empty}
            for kwargs in (required, {p.name: "{x}" for p in params}):
                key = getattr(topo, name)(**kwargs)
                # A key prefix (ends in ':') is completed by an entry id.
                patterns.add(_pattern(key + ("{x}" if key.endswith(":") else ""), prefix))
    return patterns


def test_the_topology_scan_sees_the_keys() -> None:
    """Guard against a vacuous scan."""
    patterns = topology_key_patterns()
    assert {"{}:{}:jobs", "{}:{}:dead", "{}:{}:pool:{}", "{}:{}:{}", "{}:{}:done:{}"} <= patterns
    assert len(patterns) >= 11


def test_every_key_the_code_uses_is_documented(doc: dict[str, Any]) -> None:
    streams = {_pattern(c["address"]) for c in doc["channels"].values()}
    others = {_pattern(k["key"]) for k in doc["x-redis-keys"].values()}
    missing = topology_key_patterns() - streams - others
    assert not missing, f"keys from broker/topology.py missing from the AsyncAPI document: {sorted(missing)}"
    assert not (streams | others) - topology_key_patterns(), "the document lists keys the code does not use"


def test_every_stream_key_is_a_channel_with_its_messages_and_groups(doc: dict[str, Any]) -> None:
    channels = doc["channels"]
    topo = Topology("ib")
    by_address = {c["address"].replace("{prefix}", "ib").replace("{tag}", "{ib}"): c for c in channels.values()}
    assert set(by_address["ib:{ib}:jobs"]["messages"]) == {"job", "jobMsgpack"}
    assert topo.jobs == "ib:{ib}:jobs" and topo.dead in by_address
    assert [g["name"] for g in by_address["ib:{ib}:jobs"]["x-redis-groups"]] == [POLICY_GROUP]
    assert [g["name"] for g in by_address["ib:{ib}:pool:{pool}"]["x-redis-groups"]] == [WORKER_GROUP]
    fields = {doc["components"]["messages"][m]["x-stream-field"]
              for c in channels.values() for m in c["messages"]}
    assert fields == {"job", "routed", "result", "dead", "token"}  # the fields broker/wire.py's table names
    receivers = {op["x-consumer-group"] for op in doc["operations"].values() if "x-consumer-group" in op}
    assert receivers == {POLICY_GROUP, WORKER_GROUP}


def test_every_wire_message_has_its_schema(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    for struct in (wire.Job, wire.RoutedJob, wire.Result, wire.DeadLetter, wire.Timing, wire.Metrics, wire.Route,
                   wire.TokenChunk, wire.Heartbeat, wire.ObservedJob, wire.PolicyHeartbeat):
        assert struct.__name__ in schemas
    keys = doc["x-redis-keys"]
    assert keys["heartbeats"]["value"] == {"$ref": "#/components/schemas/Heartbeat"}
    assert keys["policy_heartbeats"]["value"] == {"$ref": "#/components/schemas/PolicyHeartbeat"}
    # A field a Struct inherits keeps its description (`ts` comes from `Beat`).
    assert schemas["Heartbeat"]["properties"]["ts"]["description"].startswith("When the role sent it")
    assert schemas["Job"]["properties"]["reply_to"]["description"].startswith("Name of the result stream")
    assert schemas["Job"]["properties"]["id"]["pattern"].endswith("$"), "ECMA-262 patterns, not Python's \\Z"


def test_message_examples_match_their_schemas(doc: dict[str, Any]) -> None:
    """The examples validate against the generated schemas, and the broker itself accepts them."""
    components = doc["components"]
    for message in components["messages"].values():
        for example in message.get("examples", ()):
            schema = {**components["schemas"][message["name"]], "components": components}
            jsonschema.Draft7Validator(schema).validate(example["payload"])
            payload = json.dumps(example["payload"]).encode()
            decoded = wire.decode_job(payload) if message["name"] == "Job" else wire.decode_result(payload)
            assert msgspec.to_builtins(decoded)["id"] == example["payload"]["id"]


def test_an_undescribed_topology_key_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Topology, "audit", property(lambda self: f"{self.base}:audit"), raising=False)
    with pytest.raises(RuntimeError, match="audit"):
        asyncapi.document()


def test_cli_prints_and_writes_the_document(tmp_path: Path) -> None:
    out = tmp_path / "api.json"
    done = subprocess.run([sys.executable, "-m", "cli", "asyncapi", "--format", "json", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == json.loads(asyncapi.render("json"))
    printed = subprocess.run([sys.executable, "-m", "cli", "asyncapi"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert printed.returncode == 0 and printed.stdout == asyncapi.render("yaml")
