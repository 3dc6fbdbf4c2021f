"""compose.yaml, the Dockerfile and .dockerignore agree with each other and with the real CLI.

No Docker engine is needed: every command a container would run (its ``command`` and its
health check) is parsed by the click CLI itself, so a renamed subcommand or option fails here
rather than in a crash-looping container. ``config -q`` runs only where a compose binary is
installed (it needs no engine).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import redis
import yaml

from broker.config import load_config
from cli.main import main

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPT = next(iter(PYPROJECT["project"]["scripts"]))  # "inference-broker"

ROLES = ("policy", "worker-gpu", "worker-accel")
IMAGE_SERVICES = sorted(name for name, svc in SERVICES.items()
                        if "build" in svc or str(svc.get("image", "")).startswith(SCRIPT))
BROKER_SERVICES = [name for name in IMAGE_SERVICES if "profiles" not in SERVICES[name]]
"""The services of the single-node stack (a plain `docker compose up`) that run the broker's image."""


def parse(args: list[str]) -> click.Context:
    """Parse ``inference-broker ARGS`` the way the CLI would, without running anything.

    Raises click.UsageError for an unknown command or option, a missing required option or
    a bad value.
    """
    ctx = main.make_context(SCRIPT, list(args))
    assert args and not args[0].startswith("-"), f"expected a subcommand first: {args}"
    name, cmd, rest = main.resolve_command(ctx, list(args))
    assert cmd is not None, name
    return cmd.make_context(name or "", list(rest), parent=ctx)


def seconds(duration: str) -> float:
    """A compose duration ("40s", "1m30s", "1h") in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?", duration)
    assert parts and duration, f"not a duration: {duration!r}"
    h, m, s, ms = (int(x or 0) for x in parts.groups())
    return h * 3600 + m * 60 + s + ms / 1000


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


# --- the stack's shape -------------------------------------------------------------------


def test_required_services_exist() -> None:
    assert "version" not in COMPOSE, "the Compose spec has no `version:` key"
    assert {"redis", "policy", "worker-gpu", "worker-accel", "demo"} <= SERVICES.keys()
    assert set(BROKER_SERVICES) >= {*ROLES, "demo"}


def test_redis_is_durable_and_never_evicts() -> None:
    redis = SERVICES["redis"]
    assert str(redis["image"]).split(":")[1].startswith("7")
    cmd = redis["command"]
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert cmd[0] == "redis-server"
    assert flags["--appendonly"] == "yes"
    assert flags["--appendfsync"] == "everysec"
    assert flags["--maxmemory-policy"] == "noeviction"  # other policies can evict whole streams
    assert flags["--save"] == ""  # no RDB snapshots; the AOF is the persistence
    # The AOF must live on a volume, or it dies with the container.
    assert any(str(v).split(":")[1] == "/data" for v in redis["volumes"])
    named = {str(v).split(":")[0] for v in redis["volumes"]}
    assert named <= set(COMPOSE.get("volumes") or {})
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


def test_gpu_pool_has_two_replicas() -> None:
    assert SERVICES["worker-gpu"]["deploy"]["replicas"] == 2


def test_every_service_but_redis_and_demo_has_a_healthcheck() -> None:
    once = ("demo", "demo-cluster", "redis-cluster-init")  # run once and exit: nothing to check
    missing = [name for name, svc in SERVICES.items()
               if name not in ("redis", *once) and not svc.get("healthcheck", {}).get("test")]
    assert not missing, f"services without a healthcheck: {missing}"


def test_broker_services_share_one_built_image() -> None:
    images = {SERVICES[name].get("image") for name in IMAGE_SERVICES}
    assert len(images) == 1 and None not in images, images
    assert all("build" in SERVICES[name] for name in IMAGE_SERVICES)


def test_broker_services_are_configured_by_environment() -> None:
    redis_services = {name for name, svc in SERVICES.items() if str(svc.get("image", "")).startswith("redis:")}
    for name in BROKER_SERVICES:
        env = environment(SERVICES[name])
        url = urlsplit(env["REDIS_URL"])
        assert url.scheme == "redis" and url.hostname in redis_services and url.port == 6379, (name, url)
        assert "IB_PREFIX" in env and "IB_CONFIG" in env, name


def test_broker_services_wait_for_a_healthy_redis() -> None:
    for name in BROKER_SERVICES:
        depends = SERVICES[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy", name


def test_roles_restart_and_the_demo_does_not() -> None:
    for name in ROLES:
        assert SERVICES[name]["restart"] == "unless-stopped", name
    assert SERVICES["demo"].get("restart", "no") == "no"
    # The producer starts only once every role answers its health check.
    assert {k: v["condition"] for k, v in SERVICES["demo"]["depends_on"].items()} == {
        name: "service_healthy" for name in ("redis", *ROLES)}


@pytest.mark.parametrize("name", ["worker-gpu", "worker-accel"])
def test_workers_get_longer_to_stop_than_their_drain(name: str) -> None:
    svc = SERVICES[name]
    grace = float(environment(svc).get("IB_GRACE_S", 30.0))  # 30 s: the CLI's default
    default = parse(["worker", "--pool", "x"]).command.params
    assert next(p.default for p in default if p.name == "grace") == 30.0
    # Docker's default is 10 s: shorter than the drain, so running jobs would be SIGKILLed.
    assert seconds(str(svc["stop_grace_period"])) > grace


# --- every command a container runs parses against the real CLI --------------------------


@pytest.mark.parametrize("name", IMAGE_SERVICES)
def test_service_command_parses(name: str) -> None:
    command = SERVICES[name]["command"]
    assert isinstance(command, list), f"{name}: use the list form of `command`"
    ctx = parse(command)
    if ctx.info_name == "worker":
        assert ctx.params["pool"] in load_config().pools, f"{name}: unknown pool"
        assert name.removesuffix("-cluster") == f"worker-{ctx.params['pool']}", "service name and pool disagree"
    if name.removesuffix("-cluster") == "demo":
        assert ctx.params["no_stack"], "the demo must not start roles of its own"


@pytest.mark.parametrize("name", ROLES)
def test_healthcheck_asks_its_own_roles_readyz(name: str) -> None:
    test = SERVICES[name]["healthcheck"]["test"]
    assert test[:2] == ["CMD", SCRIPT], f"{name}: expected [CMD, {SCRIPT}, ...], got {test}"
    check = parse(test[2:])
    assert check.info_name == "health"
    role = parse(SERVICES[name]["command"])
    assert role.info_name in ("policy", "worker")
    # /readyz on the port the role serves: Redis reachable and its groups in place.
    assert role.params["metrics_port"], f"{name}: the role serves no metrics port"
    assert check.params["ready_port"] == role.params["metrics_port"], name


def test_parse_rejects_what_the_cli_does_not_know() -> None:
    # The helper above must be able to fail, or the command tests prove nothing.
    for bad in (["wroker", "--pool", "gpu"], ["worker", "--pool", "gpu", "--bogus"],
                ["worker"], ["health", "--policy", "--max-age", "soon"]):
        with pytest.raises(click.UsageError):
            parse(bad)


# --- the image -----------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in lines if line and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule, simplified: the last pattern matching the path or a parent wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            ignored = not negate
    return ignored


def test_dockerfile_installs_the_package_as_non_root() -> None:
    steps = _dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim")
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entry = [arg for op, arg in steps if op == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[-1]) == [SCRIPT]
    assert any(op == "RUN" and "pip install" in arg for op, arg in steps)


def test_build_context_holds_everything_the_package_needs() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = {Path(src).name for op, arg in _dockerfile() if op == "COPY"
              for src in shlex.split(arg)[:-1] if not src.startswith("--")}
    project = PYPROJECT["project"]
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = {"pyproject.toml", project["readme"], *packages}
    assert needed <= copied, f"the Dockerfile does not copy {needed - copied}"
    for top in sorted(needed):
        files = [top] if (ROOT / top).is_file() else [
            str(f.relative_to(ROOT)) for f in (ROOT / top).rglob("*")
            if f.is_file() and "__pycache__" not in f.parts]
        assert files, top
        excluded = [f for f in files if _ignored(f, patterns)]
        assert not excluded, f".dockerignore leaves out {excluded}"
    assert _ignored(".venv/bin/python", patterns) and _ignored(".git/HEAD", patterns)


# --- the file as Compose reads it ------------------------------------------------------------


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_is_valid() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no `docker compose` plugin or `docker-compose` binary on PATH "
                    "(`config` needs no engine; e.g. apt-get install --no-install-recommends docker-compose)")
    done = subprocess.run([*cli, "-f", str(COMPOSE_FILE), "config", "-q"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, f"{' '.join(cli)} config -q:\n{done.stdout}{done.stderr}"


# --- the observability profile: Prometheus and Grafana ---------------------------------------

OBSERVABILITY = ("prometheus", "grafana")
DEPLOY = ROOT / "deploy"


def _mounts(name: str) -> dict[str, Path]:
    """Container path -> repository path of a service's bind mounts of files in the repo."""
    out = {}
    for volume in SERVICES[name].get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith("./"):
            out[target] = ROOT / source
    return out


def test_observability_services_are_optional_and_mount_files_in_the_repo() -> None:
    for name in OBSERVABILITY:
        svc = SERVICES[name]
        assert svc.get("profiles") == ["observability"], f"{name} must not start with a plain `up`"
        mounts = _mounts(name)
        assert mounts, name
        for target, source in mounts.items():
            assert source.exists(), f"{name} mounts {source} at {target}, which is not in the repository"
        ports = [str(p) for p in svc.get("ports", [])]
        assert all(p.startswith("127.0.0.1:") for p in ports), f"{name}: publish on loopback only"
    for name in (*ROLES, "demo", "redis"):
        assert "profiles" not in SERVICES[name], f"{name} must run without a profile"


def test_prometheus_scrapes_every_role_on_its_metrics_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert _mounts("prometheus")["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus.yml"
    scraped: set[tuple[str, int]] = set()
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            scraped |= {(host, int(sd["port"])) for host in sd["names"]}
        for static in job.get("static_configs", []):
            scraped |= {(t.split(":")[0], int(t.split(":")[1])) for t in static["targets"]}
    for name in ROLES:
        port = parse(SERVICES[name]["command"]).params["metrics_port"]
        assert (name, port) in scraped, f"Prometheus does not scrape {name}:{port}"
    # DNS discovery, not a static target: a static name would reach one replica of worker-gpu.
    assert SERVICES["worker-gpu"]["deploy"]["replicas"] > 1
    assert not any((("worker-gpu", 9100) in {(t.split(":")[0], int(t.split(":")[1])) for t in st["targets"]})
                   for job in config["scrape_configs"] for st in job.get("static_configs", []))


def _defined_series() -> set[str]:
    """Every series name broker/metrics.py can expose (counters with _total, histogram parts, ...)."""
    from prometheus_client import REGISTRY

    import broker.metrics  # noqa: F401 - registers the metrics

    names: set[str] = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("inference_broker_"):
            continue
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "info": ["_info"]}
        names |= {family.name + s for s in suffixes.get(family.type, [""])}
    return names


def _promql_names(expr: str) -> set[str]:
    """Metric names an expression selects: plain names, and __name__=~"a_(b|c)_d" expanded."""
    found: set[str] = set()
    for pattern in re.findall(r'__name__=~"([^"]+)"', expr):
        group = re.search(r"\(([^()]+)\)", pattern)
        assert group, f"only one (a|b) group is expanded: {pattern}"
        found |= {pattern[:group.start()] + alt + pattern[group.end():] for alt in group.group(1).split("|")}
    expr = re.sub(r'__name__=~"[^"]+"', "", expr)
    return found | set(re.findall(r"\binference_broker_[a-z0-9_]+", expr))


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard() -> None:
    mounts = _mounts("grafana")
    provisioning = mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [d["url"] for d in datasources] == ["http://prometheus:9090"]
    providers = [p for f in (provisioning / "dashboards").glob("*.yml")
                 for p in yaml.safe_load(f.read_text())["providers"]]
    path = providers[0]["options"]["path"]
    assert mounts[path] == DEPLOY / "grafana" / "dashboards"
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "inference-broker.json").read_text())
    uids = {d["uid"] for d in datasources}
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] in uids and panel["targets"], panel["title"]


def test_every_dashboard_query_names_metrics_the_roles_define() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "inference-broker.json").read_text())
    defined = _defined_series()
    assert "inference_broker_time_to_first_token_seconds_bucket" in defined  # the helper works
    used: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            names = _promql_names(target["expr"])
            assert names, f"{panel['title']}: {target['expr']} names no inference_broker metric"
            assert names <= defined, f"{panel['title']}: {sorted(names - defined)} are not defined"
            used |= names
    # The views of `inference-broker top`.
    titles = " / ".join(p["title"].lower() for p in dashboard["panels"])
    for view in ("backlog", "in flight / capacity", "throughput", "ttft", "end-to-end", "attainment",
                 "accelerator share", "dead letters"):
        assert view in titles, view
    assert {"inference_broker_stream_backlog", "inference_broker_worker_in_flight", "inference_broker_slo_met_total",
            "inference_broker_e2e_latency_seconds_bucket", "inference_broker_jobs_routed_total"} <= used


# --- the cluster profile: the roles on a Redis Cluster --------------------------------------

CLUSTER_ROLES = tuple(f"{name}-cluster" for name in ROLES)
CLUSTER_NODES = sorted(name for name in SERVICES if name.startswith("redis-node-"))
CLUSTER_DIR = DEPLOY / "redis-cluster"


def _redis_conf() -> dict[str, str]:
    lines = [line.split(None, 1) for line in (CLUSTER_DIR / "redis.conf").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return {key: value.strip() for key, value in lines}


def test_cluster_nodes_are_durable_cluster_nodes_that_announce_their_names() -> None:
    conf = _redis_conf()
    assert conf["cluster-enabled"] == "yes" and conf["cluster-preferred-endpoint-type"] == "hostname"
    # As the single-node Redis: AOF every second, no snapshots, never evict a stream.
    assert (conf["appendonly"], conf["appendfsync"], conf["save"], conf["maxmemory-policy"]) == (
        "yes", "everysec", '""', "noeviction")
    assert conf["dir"] == "/data" and conf["port"] == "6379"
    assert len(CLUSTER_NODES) == 6
    volumes: set[str] = set()
    for name in CLUSTER_NODES:
        node = SERVICES[name]
        assert node["profiles"] == ["cluster"] and str(node["image"]).split(":")[1].startswith("7"), name
        command = node["command"]
        assert command[0] == "redis-server" and command[command.index("--cluster-announce-hostname") + 1] == name
        mounts = _mounts(name)
        assert mounts[command[1]] == CLUSTER_DIR / "redis.conf", name
        data = [str(v).split(":")[0] for v in node["volumes"] if str(v).split(":")[1] == "/data"]
        assert len(data) == 1 and data[0] in (COMPOSE.get("volumes") or {}), f"{name}: its AOF needs a volume"
        volumes.add(data[0])
        assert "ports" not in node and "redis-cli ping" in " ".join(node["healthcheck"]["test"]), name
    assert len(volumes) == len(CLUSTER_NODES), "each node needs a volume of its own"


def test_cluster_init_forms_the_cluster_of_every_node_once_they_answer() -> None:
    init = SERVICES["redis-cluster-init"]
    assert init["profiles"] == ["cluster"] and init.get("restart") == "no"
    script = init["command"][-1]
    assert init["command"][0] == "sh" and _mounts("redis-cluster-init")[script] == CLUSTER_DIR / "create.sh"
    assert {k: v["condition"] for k, v in init["depends_on"].items()} == dict.fromkeys(
        CLUSTER_NODES, "service_healthy")
    env = environment(init)
    nodes = env["NODES"].split()
    assert sorted(node.split(":")[0] for node in nodes) == CLUSTER_NODES
    assert all(node.endswith(":6379") for node in nodes)
    primaries = len(nodes) // (1 + int(env["REPLICAS"]))
    assert primaries * (1 + int(env["REPLICAS"])) == len(nodes) and primaries >= 3  # the cluster's minimum
    # One shard per primary by default.
    assert environment(SERVICES["policy-cluster"])["IB_SHARDS"] == f"${{IB_SHARDS:-{primaries}}}"
    done = subprocess.run(["sh", "-n", str(CLUSTER_DIR / "create.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", [*CLUSTER_ROLES, "demo-cluster"])
def test_cluster_roles_run_as_their_single_node_twins_on_the_cluster(name: str) -> None:
    svc, twin = SERVICES[name], SERVICES[name.removesuffix("-cluster")]
    assert svc["profiles"] == ["cluster"]
    assert svc["command"] == twin["command"] and svc.get("restart") == twin.get("restart")
    if "healthcheck" in twin:
        assert svc["healthcheck"]["test"] == twin["healthcheck"]["test"]
    env = environment(svc)
    url = urlsplit(env["REDIS_URL"])
    assert url.scheme == "redis+cluster" and url.hostname in CLUSTER_NODES and url.port == 6379, url
    assert env.get("IB_SHARDS") and {k: v for k, v in env.items() if k not in ("REDIS_URL", "IB_SHARDS")} == {
        k: v for k, v in environment(twin).items() if k != "REDIS_URL"}
    for key in ("deploy", "stop_grace_period"):
        assert svc.get(key) == twin.get(key), f"{name}: {key} differs from {twin}"
    if name == "demo-cluster":
        assert {k: v["condition"] for k, v in svc["depends_on"].items()} == dict.fromkeys(
            CLUSTER_ROLES, "service_healthy")
    else:
        assert svc["depends_on"] == {"redis-cluster-init": {"condition": "service_completed_successfully"}}


@pytest.mark.skipif(not shutil.which("redis-cli"), reason="create.sh runs redis-cli")
def test_create_sh_forms_a_cluster_of_local_nodes_and_leaves_a_formed_one_alone(tmp_path: Path) -> None:
    from cli.cluster import EmbeddedCluster

    nodes = EmbeddedCluster(primaries=3)  # started unformed: create.sh forms it
    try:
        for node in nodes.nodes:
            node.start()
        env = {"PATH": os.environ["PATH"], "REPLICAS": "0",
               "NODES": " ".join(f"localhost:{node.port}" for node in nodes.nodes)}
        script = str(CLUSTER_DIR / "create.sh")
        first = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=60)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "cluster formed: cluster_known_nodes:3 cluster_size:3" in first.stdout
        for node in nodes.nodes:
            with redis.Redis(port=node.port, decode_responses=True) as client:
                assert client.cluster("info")["cluster_state"] == "ok"
        again = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "formed already" in again.stdout, again.stdout + again.stderr
    finally:
        nodes.stop()
