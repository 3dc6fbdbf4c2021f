"""An AsyncAPI 3.0 document of every stream, consumer group and message of the broker.

FastStream's own generator fails on msgspec Structs, so the document is built here: the
message schemas come from :func:`msgspec.json.schema_components` (with each field's
docstring from ``broker/wire.py`` as its description), and every key comes from
:class:`broker.topology.Topology`, called with ``{param}`` placeholders. A Topology member
or parameter this module does not describe is an error, so a new key cannot go undocumented.

Addresses read ``{prefix}:{tag}:jobs``: ``tag`` is the Redis Cluster hash tag, the prefix in
literal braces (``ib:{ib}:jobs`` with the default prefix). Keys that are not streams (result
strings, markers, heartbeat hashes) are listed under ``x-redis-keys``; consumer groups under
each channel's ``x-redis-groups`` and each receiving operation's ``x-consumer-group``.

``inference-broker asyncapi`` prints the document; ``docs/asyncapi.yaml`` is its output,
kept current by ``tests/test_asyncapi.py``.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from importlib import metadata
from typing import Any, NamedTuple

import msgspec

from broker import wire
from broker.topology import POLICY_GROUP, WORKER_GROUP, Topology

SENTINEL = "PREFIXSENTINEL"
"""A valid prefix that appears nowhere else in a key: replaced by ``{prefix}`` / ``{tag}``."""
MESSAGES = (wire.Job, wire.RoutedJob, wire.Result, wire.DeadLetter, wire.TokenChunk, wire.Heartbeat,
            wire.PolicyHeartbeat)

PARAMETERS: dict[str, dict[str, Any]] = {
    "prefix": {"description": "Key prefix of the deployment (`IB_PREFIX`, `--prefix`): 1 to 32 characters of "
                              "`A-Z a-z 0-9 _ . -`.", "default": "ib"},
    "tag": {"description": "Redis Cluster hash tag: the prefix in literal braces, so that every key of a "
                           "deployment hashes to one slot and the Lua scripts run unchanged on a cluster.",
            "default": "{ib}"},
    "pool": {"description": "A pool name from the policy configuration (`[pools.<name>]`).",
             "examples": ["gpu", "accel"]},
    "lane": {"description": "Priority lane of a pool, 1 and up: one lane per distinct SLO-class priority, and "
                            "workers read lower lanes first. Lane 0 has no suffix: it is the plain pool key."},
    "replyTo": {"description": "The job's `reply_to` (default `results`): 1 to 64 characters of "
                               "`A-Z a-z 0-9 _ . -`, not a reserved name (jobs, dead, pool, done, routed, hb, "
                               "err, replies, epoch, tokens).", "default": "results",
                "location": "$message.payload#/reply_to"},
    "jobId": {"description": "A job id."},
    "entryId": {"description": "A stream entry id."},
}


class Stream(NamedTuple):
    """A stream key: its channel, what its entries carry, who reads and writes it."""

    channel: str
    title: str
    description: str
    messages: tuple[str, ...]
    params: dict[str, str]
    """Topology method parameter name to AsyncAPI parameter name."""
    groups: tuple[tuple[str, str], ...] = ()
    """(consumer group, who reads through it), created at id 0 with MKSTREAM."""
    ops: tuple[tuple[str, str, str], ...] = ()
    """(role, action, what it does)."""


class Key(NamedTuple):
    """A key that is not a stream."""

    name: str
    type: str
    description: str
    params: dict[str, str]
    value: str | None = None
    """Component schema of the value (of each field's value, for a hash), if it is a message."""


STREAMS: dict[str, Stream] = {
    "jobs": Stream(
        "jobs", "Ingress",
        "Producers `XADD` one entry per job with one field, `job`: the Job as UTF-8 JSON or a msgpack map "
        "(at most 1 MiB). An entry with field `__data__` (FastStream's binary envelope, or raw job bytes) is "
        "accepted too. Entries are deleted as they are acked, so `XLEN` is the backlog. Each tenant has an "
        "ingress of its own, `{prefix}:{tag}:~{tenant}:jobs`, that only its credentials may write "
        "(docs/security.md): the tenant of its jobs is that one, whatever the payload says.",
        ("job", "jobMsgpack"), {}, ((POLICY_GROUP, "policy workers"),),
        (("producer", "send", "Submit a job (`XADD`); the result arrives on the reply stream."),
         ("gateway", "send", "Submit the job of each OpenAI request, and of each Batch API line (class `batch`, "
          "`reply_to` `batches`), through the SDK; the tenant is the API key's, and a tenant of the policy "
          "config's `[tenants]` gets its own ingress."),
         ("policy", "receive", "Validate, classify and route jobs (`XREADGROUP COUNT 256`)."))),
    "pool": Stream(
        "pool", "Pool stream",
        "Jobs the policy routed to one pool, field `routed`. Each move onto it is one Lua script (dedup marker "
        "+ `XADD` + ack of the ingress entry). Entries are deleted as they are acked.",
        ("routedJob",), {"name": "pool", "lane": "lane"}, ((WORKER_GROUP, "the pool's workers"),),
        (("policy", "send", "Route jobs to the pool (one ROUTE script per read: dedup marker, `XADD`, ack)."),
         ("worker", "receive", "Run jobs, as many at once as the worker has free slots."))),
    "reply": Stream(
        "results", "Result stream",
        "One `Result` per job (deduplicated by job id), field `result`, on the stream its job's `reply_to` "
        "names. Read it with `XREAD` or through a consumer group of your own; entries are trimmed once every "
        "group has read them and they are older than `results_retention_s`. A tenant's jobs reply in its "
        "own space: `{prefix}:{tag}:~{tenant}:r:{replyTo}`.",
        ("result",), {"name": "replyTo"}, (),
        (("worker", "send", "Publish results (a fenced COMPLETE script per batch: done key, `XADD`, ack, per job)."),
         ("policy", "send", "Publish `failed`, `expired` and `rejected` results of jobs it did not route."),
         ("producer", "receive", "Wait for results (`XREAD BLOCK`, or a consumer group of your own)."),
         ("gateway", "receive", "Wait for each request's result; the gateway running the Batch API reads the "
          "`batches` stream of every space through the consumer group `gateway-batches`."))),
    "dead": Stream(
        "dead", "Dead letters",
        "Entries no consumer could process, with the reason, field `dead`. Inspect, replay or purge them with "
        "`inference-broker dead`.",
        ("deadLetter",), {}, (),
        (("policy", "send", "Dead-letter an ingress entry that cannot become a job."),
         ("worker", "send", "Dead-letter a pool entry after a fatal error or `max_deliveries`."),
         ("operator", "receive", "List, replay or purge dead letters (`inference-broker dead`)."))),
    "tokens": Stream(
        "tokens", "Token stream",
        "A job's output as it is generated, for jobs submitted with `stream: true` (chat and completion), "
        "field `token`. Each attempt ends with an entry whose `end` is set; a retried job starts again with "
        "the next `attempt`. Capped at about 10,000 entries; expires `result_ttl_s` after its last write. The "
        "result still arrives on the reply stream. A tenant's: `{prefix}:{tag}:~{tenant}:tokens:{jobId}`.",
        ("tokenChunk",), {"job_id": "jobId"}, (),
        (("worker", "send", "Append output text as the backend generates it (batched, one `XADD` per batch)."),
         ("producer", "receive", "Follow it with `XREAD BLOCK` from `0` (`Client.tokens`, `submit --stream`)."),
         ("gateway", "receive", "Relay it as server-sent events to an OpenAI client that asked for `stream`."))),
}

KEYS: dict[str, Key] = {
    "done": Key("done", "string", "The job's `Result` JSON, written with its result entry; kept for "
                "`result_ttl_s`. One outcome per job (`SET NX`), and a lookup by id. A tenant's: "
                "`{prefix}:{tag}:~{tenant}:done:{jobId}`.", {"job_id": "jobId"},
                "Result"),
    "routed": Key("routed", "string", "Set once a job was routed (makes routing idempotent): `<pool stream "
                  "under the key base> <entry id>` where its entry went, or `1` when it ended before routing "
                  "(at the policy, or cancelled); TTL `result_ttl_s`.", {"job_id": "jobId"}),
    "errors": Key("errors", "hash", "Last error of a retried pool entry (the key ends with the entry id), "
                  "for its dead letter: fields `error` (the text) and `delivery` (the delivery it ended, a "
                  "decimal integer); TTL `result_ttl_s`.", {"pool": "pool", "lane": "lane"}),
    "replies": Key("replies", "set", "Names of the reply streams that received results (for retention).", {}),
    "epoch": Key("epoch", "string", "Written once by the policy workers; its absence later means Redis "
                 "restarted empty.", {}),
    "heartbeats": Key("heartbeats", "hash", "Pool worker name to its latest `Heartbeat` JSON (its load, and "
                      "the timings of the jobs it finished since the last beat), every `heartbeat_s`. A field "
                      "that is not a `Heartbeat` is ignored by every reader.", {"pool": "pool"}, "Heartbeat"),
    "policy_heartbeats": Key("policy_heartbeats", "hash", "Policy worker name to its latest `PolicyHeartbeat` "
                             "JSON, every `heartbeat_s`.", {}, "PolicyHeartbeat"),
}

MESSAGE_INFO: dict[str, tuple[str, str, str, str]] = {
    # name: (schema, stream field, content type, description)
    "job": ("Job", "job", "application/json", "A job as JSON (what the Python SDK sends)."),
    "jobMsgpack": ("Job", "job", "application/msgpack", "The same job as a msgpack map with the same keys."),
    "routedJob": ("RoutedJob", "routed", "application/json", "A job with the policy's route (internal)."),
    "result": ("Result", "result", "application/json", "A job's one outcome, with its timings."),
    "deadLetter": ("DeadLetter", "dead", "application/json", "An entry no consumer could process."),
    "tokenChunk": ("TokenChunk", "token", "application/json", "Output text of a streamed job, or an attempt's end."),
}

EXAMPLE_JOB = {"id": "order-42", "model": "llama-3.1-8b", "messages": [{"role": "user", "content": "Hi"}]}
EXAMPLE_RESULT = {
    "id": "order-42", "status": "ok", "model": "llama-3.1-8b", "kind": "chat", "tenant": "default",
    "slo": "interactive", "pool": "accel", "worker": "worker-accel-host-4242-1a2b3c", "output": "Hello!",
    "usage": {"prompt_tokens": 1, "completion_tokens": 3},
    "timing": {"created_at": 1767225600.0, "routed_at": 1767225600.002, "dequeued_at": 1767225600.003,
               "started_at": 1767225600.003, "first_token_at": 1767225600.125, "finished_at": 1767225600.127,
               "attempt": 1},
    "metrics": {"queue_time_ms": 3.0, "time_to_first_token_ms": 125.0, "time_per_output_token_ms": 1.0,
                "inference_time_ms": 124.0, "e2e_latency_ms": 127.0},
    "slo_met": True, "route_reason": "class interactive by rule 3; accel predicted to meet TTFT 500 ms"}


def _field_docs(cls: type) -> dict[str, str]:
    """``name: type`` followed by a string literal: the field's docstring, as in ``broker/wire.py``;
    those of the fields a Struct inherits too (``Heartbeat`` from ``Beat``)."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if issubclass(base, msgspec.Struct) and base is not msgspec.Struct:
            docs.update(_own_field_docs(base))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = _markdown(after.value.value)
    return docs


def _markdown(text: str) -> str:
    """A docstring in CommonMark, as AsyncAPI descriptions are: ``x`` and :class:`X` become `x`."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", inspect.cleandoc(text))
    return text.replace("``", "`")


def _portable(node: Any) -> Any:
    """Schemas any JSON Schema tool reads: ``\\Z`` (Python's end of string) becomes ECMA-262's ``$``."""
    if isinstance(node, dict):
        return {k: (v[:-2] + "$" if k == "pattern" and isinstance(v, str) and v.endswith(r"\Z") else _portable(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_portable(v) for v in node]
    return node


def schemas() -> dict[str, Any]:
    """Component schemas of every message, from the Structs, with field descriptions."""
    _refs, components = msgspec.json.schema_components(MESSAGES, ref_template="#/components/schemas/{name}")
    structs = {cls.__name__: cls for cls in vars(wire).values()
               if isinstance(cls, type) and issubclass(cls, msgspec.Struct)}
    for name, schema in components.items():
        if "description" in schema:
            schema["description"] = _markdown(schema["description"])
        for field, doc in _field_docs(structs[name]).items() if name in structs else ():
            if field in schema.get("properties", {}):
                schema["properties"][field] = {"description": doc, **schema["properties"][field]}
    return {name: _portable(components[name]) for name in sorted(components)}


def _variants(member: str, params: dict[str, str]) -> list[tuple[str, tuple[str, ...]]]:
    """(address, AsyncAPI parameter names) of Topology ``member``: required parameters only, then all."""
    topo = Topology(SENTINEL)
    attr = getattr(Topology, member)
    if isinstance(attr, property):
        calls: list[dict[str, str]] = [{}]
        sig_params: list[inspect.Parameter] = []
    else:
        sig_params = list(inspect.signature(attr).parameters.values())[1:]
        unknown = [p.name for p in sig_params if p.name not in params]
        if unknown:
            raise RuntimeError(f"Topology.{member} has parameter(s) {unknown} that cli/asyncapi.py does not "
                               "describe: add them to its STREAMS/KEYS entry (and PARAMETERS)")
        required = {p.name: f"{{{params[p.name]}}}" for p in sig_params if p.default is inspect.Parameter.empty}
        calls = [required, {p.name: f"{{{params[p.name]}}}" for p in sig_params}]
    out: list[tuple[str, tuple[str, ...]]] = []
    for kwargs in calls:
        key = getattr(topo, member) if not kwargs and not sig_params else getattr(topo, member)(**kwargs)
        address = key.replace(f"{{{SENTINEL}}}", "{tag}").replace(SENTINEL, "{prefix}")
        if address.endswith(":"):  # a key prefix: the entry id follows
            address += "{entryId}"
        names = tuple(re.findall(r"\{(\w+)\}", address))
        if address not in [a for a, _ in out]:
            out.append((address, names))
    return out


def _named_variants(member: str, base: str, params: dict[str, str]) -> list[tuple[str, str, list[str]]]:
    """(name, address, parameters beyond the required ones) of each form of a key: ``pool``, ``poolLane``."""
    forms = _variants(member, params)
    out = []
    for address, names in forms:
        extra = [n for n in names if n not in forms[0][1]]
        out.append((base + "".join(n[:1].upper() + n[1:] for n in extra), address, extra))
    return out


NAVIGATION = frozenset({"base", "tag", "at", "every_shard", "of_job", "home", "of_tenant", "rel", "space",
                        "under", "reply_path"})
"""Topology members that name a shard, a space or a key's base, not a key."""


def topology_members() -> list[str]:
    """Public members of :class:`Topology` that produce keys."""
    return [name for name, value in vars(Topology).items()
            if not name.startswith("_") and name not in NAVIGATION
            and (isinstance(value, property) or callable(value))]


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document, as plain data."""
    undescribed = set(topology_members()) - set(STREAMS) - set(KEYS)
    if undescribed:
        raise RuntimeError(f"Topology key(s) {sorted(undescribed)} are not described in cli/asyncapi.py: "
                           "add them to STREAMS (a stream) or KEYS (anything else)")
    try:
        version = metadata.version("inference-broker")
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for member, stream in STREAMS.items():
        for channel_id, address, extra in _named_variants(member, stream.channel, stream.params):
            names = re.findall(r"\{(\w+)\}", address)
            description = stream.description + (
                f" This key is the form with {', '.join(f'`{{{n}}}`' for n in extra)}: see the parameter."
                if extra else "")
            channel: dict[str, Any] = {
                "address": address, "title": stream.title, "description": description,
                "messages": {m: {"$ref": f"#/components/messages/{m}"} for m in stream.messages}}
            if names:
                channel["parameters"] = {n: {"$ref": f"#/components/parameters/{n}"} for n in names}
            channel["x-redis-groups"] = [{"name": g, "readers": who, "created": "at id 0 with MKSTREAM"}
                                         for g, who in stream.groups]
            channels[channel_id] = channel
            for role, action, summary in stream.ops:
                op: dict[str, Any] = {
                    "action": action, "channel": {"$ref": f"#/channels/{channel_id}"}, "summary": summary,
                    "messages": [{"$ref": f"#/channels/{channel_id}/messages/{m}"} for m in stream.messages],
                    "x-role": role}
                if action == "receive" and stream.groups and role != "operator":
                    op["x-consumer-group"] = stream.groups[0][0]
                if member == "jobs" and action == "send":
                    op["reply"] = {"channel": {"$ref": "#/channels/results"},
                                   "address": {"location": "$message.payload#/reply_to",
                                               "description": "The result stream the job's `reply_to` names."},
                                   "messages": [{"$ref": "#/channels/results/messages/result"}]}
                operations[f"{role}.{action}.{channel_id}"] = op
    keys: dict[str, Any] = {}
    for member, key in KEYS.items():
        for name, address, _extra in _named_variants(member, key.name, key.params):
            entry: dict[str, Any] = {"key": address, "type": key.type, "description": key.description}
            if key.value:
                entry["value"] = {"$ref": f"#/components/schemas/{key.value}"}
            keys[name] = entry
    messages = {
        name: {"name": schema, "title": schema, "contentType": ctype, "summary": summary,
               "payload": {"$ref": f"#/components/schemas/{schema}"}, "x-stream-field": field,
               **({"examples": [{"name": "minimal", "payload": EXAMPLE_JOB}]} if name == "job" else {}),
               **({"examples": [{"name": "ok", "payload": EXAMPLE_RESULT}]} if name == "result" else {})}
        for name, (schema, field, ctype, summary) in MESSAGE_INFO.items()}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "inference-broker",
            "version": version,
            "description": "Inference jobs routed across GPU and accelerator pools over Redis streams. Each "
                           "stream entry has one field named for its message (`x-stream-field`). Every key of "
                           "a deployment starts with `<prefix>:{<prefix>}:` (quote it in a shell). Delivery is "
                           "at least once; results are deduplicated by job id. See docs/wire-format.md.",
            "license": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {"redis": {"host": "localhost:6379", "protocol": "redis",
                              "description": "Any Redis 7.0+ (6.2 works, without group lag). Set REDIS_URL or "
                                             "--redis-url; `inference-broker up` runs an embedded one."}},
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas(),
            "messages": messages,
            "parameters": {name: PARAMETERS[name] for name in sorted(
                {n for c in channels.values() for n in c.get("parameters", {})})},
        },
        "x-redis-keys": keys,
    }


# --------------------------------------------------------------------------- output

_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_ .,/()@+-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS and not text.endswith(" "):
        return text
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid YAML double-quoted scalar


def _block(text: str) -> bool:
    """Whether ``text`` reads best, and round-trips, as a ``|-`` block: several lines, no edge blanks."""
    lines = text.split("\n")
    return len(lines) > 1 and not text.startswith((" ", "\n")) and not text.endswith("\n") \
        and not any(line.endswith(" ") for line in lines)


def _yaml(value: Any, indent: int) -> list[str]:
    pad = "  " * indent
    if isinstance(value, dict):
        if not value:
            return [pad + "{}"]
        lines: list[str] = []
        for key, item in value.items():
            head = f"{pad}{_scalar(key)}:"
            if isinstance(item, dict | list) and item:
                lines += [head, *_yaml(item, indent + 1)]
            elif isinstance(item, str) and _block(item):
                lines += [head + " |-", *(("  " * (indent + 1) + line).rstrip() for line in item.split("\n"))]
            else:
                lines.append(f"{head} {_yaml(item, 0)[0]}")
        return lines
    if isinstance(value, list):
        if not value:
            return [pad + "[]"]
        lines = []
        for item in value:
            sub = _yaml(item, indent + 1)
            lines.append(f"{pad}- {sub[0].lstrip()}")
            lines += sub[1:]
        return lines
    return [pad + _scalar(value)]


def render(fmt: str = "yaml") -> str:
    """The document as YAML (block style, no dependency) or JSON; deterministic."""
    doc = document()
    if fmt == "json":
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    header = "# Generated by `inference-broker asyncapi` from broker/wire.py and broker/topology.py. Do not edit.\n"
    return header + "\n".join(_yaml(doc, 0)) + "\n"
