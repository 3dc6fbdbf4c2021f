"""The systems under test: how to start each one's roles and run its clients.

* ``raw``: the raw ceiling (:mod:`bench.raw_chain`), two hop processes per stage count.
* ``inference-broker``: the real ``python -m cli policy`` and ``python -m cli worker
  --pool bench`` processes with ``bench/bench.toml`` (one pool on the instant device) and
  every reliability feature at its default (claims, leases, fenced completion, dedup,
  deletion after ack, retention); clients through the SDK (:mod:`bench.broker_load`).
* ``celery``, ``arq``, ``taskiq``: the peers (``bench/peers/``), each in the interpreter of
  its own virtual environment, since their redis-py pins exclude each other and the broker.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

from bench.harness import ROOT, Procs, Role
from broker.topology import Topology
from cli.stack import wait_for_roles

CONFIG = ROOT / "bench" / "bench.toml"
VENVS = ROOT / "bench" / ".venvs"
PEERS = ("celery", "arq", "taskiq")
PEER_MODULE = {"celery": "celery", "arq": "arq", "taskiq": "taskiq_redis"}
PEER_PACKAGES = {"celery": ["celery", "kombu", "redis", "hiredis"], "arq": ["arq", "redis", "hiredis"],
                 "taskiq": ["taskiq", "taskiq-redis", "redis", "hiredis"]}


class System:
    """A system under test. Subclasses say how its roles start and which client module it uses."""

    name = ""
    module = ""
    """The client module, run as ``python -m module produce|collect ...``."""

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self.procs: list[subprocess.Popen[bytes]] = []

    def env(self, url: str) -> dict[str, str]:
        return {"BENCH_REDIS_URL": url}

    def start(self, procs: Procs, url: str, run: str, *, policy: int = 1, workers: int = 1) -> list[Role]:
        raise NotImplementedError

    def client(self) -> list[str]:
        return [self.python, "-m", self.module]

    def client_args(self, url: str, run: str, phase: str) -> list[str]:
        """Arguments that make one phase's jobs distinct from every other phase's."""
        return ["--redis-url", url, "--run", f"{run}-{phase}"]

    def wait_ready(self, url: str, run: str, policy: int, workers: int) -> None:
        """Block until the roles are up (beyond this, the warm-up batch proves they work)."""

    def _role(self, procs: Procs, label: str, argv: list[str], env: dict[str, str]) -> Role:
        popen = procs.spawn(f"{self.name}-{label}-{len(self.procs)}", argv, env)
        self.procs.append(popen)
        return Role(label, psutil.Process(popen.pid), popen)

    stop_timeout = 15.0
    """Seconds a role gets to exit on SIGTERM before it is killed."""

    def stop(self, procs: Procs) -> None:
        procs.stop(self.procs, timeout=self.stop_timeout)
        self.procs = []

    def check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{self.name}: a role exited with status {p.returncode}")


class RawChain(System):
    name = "raw"
    module = "bench.raw_chain"

    def start(self, procs: Procs, url: str, run: str, *, policy: int = 1, workers: int = 1) -> list[Role]:
        hop = [self.python, "-m", self.module, "hop", "--redis-url", url, "--run", run]
        roles = [self._role(procs, "hop 1", [*hop, "--src", "ingress", "--dst", "pool"], {}) for _ in range(policy)]
        roles += [self._role(procs, "hop 2", [*hop, "--src", "pool", "--dst", "results"], {})
                  for _ in range(workers)]
        return roles

    def client_args(self, url: str, run: str, phase: str) -> list[str]:
        # The hops read fixed streams; the collector starts after what earlier phases left.
        return ["--redis-url", url, "--run", run]


class InferenceBroker(System):
    name = "inference-broker"
    module = "bench.broker_load"

    def __init__(self, python: str = sys.executable, settings: dict[str, str] | None = None,
                 shards: int = 1) -> None:
        super().__init__(python)
        self.shards = shards
        """Shards of the deployment (``bench.shards``): the roles' ``IB_SHARDS`` and the clients'."""
        self.settings = {**(settings or {}), **({"IB_SHARDS": str(shards)} if shards > 1 else {})}
        """``IB_*`` variables for the roles (the memory section shortens retention)."""

    def start(self, procs: Procs, url: str, run: str, *, policy: int = 1, workers: int = 1) -> list[Role]:
        common = ["--redis-url", url, "--prefix", run, "--config", str(CONFIG), "--log-level", "WARNING"]
        roles = [self._role(procs, "policy", [self.python, "-m", "cli", "policy", *common], self.settings)
                 for _ in range(policy)]
        roles += [self._role(procs, "worker", [self.python, "-m", "cli", "worker", "--pool", "bench", *common],
                             self.settings) for _ in range(workers)]
        return roles

    def client_args(self, url: str, run: str, phase: str) -> list[str]:
        # One deployment (prefix) per run; each phase's jobs answer on their own result stream.
        return ["--redis-url", url, "--run", run, "--reply", phase, "--shards", str(self.shards)]

    def wait_ready(self, url: str, run: str, policy: int, workers: int) -> None:
        wait_for_roles(url, Topology(run, self.shards), {"bench": workers}, timeout=60, check=self.check_alive)


class Peer(System):
    """A peer task queue whose ``bench/peers/<name>_app.py`` has a ``worker`` mode."""

    worker_processes = 2
    """Worker processes: one per core, as each peer's docs advise for CPU-bound dispatch."""
    stop_timeout = 1.0
    """Nothing is left to finish after a measurement (taskiq alone would wait about 18 s)."""

    def __init__(self, name: str, python: str) -> None:
        super().__init__(python)
        self.name = name
        self.module = f"bench.peers.{name}_app"

    def start(self, procs: Procs, url: str, run: str, *, policy: int = 1, workers: int = 1) -> list[Role]:
        argv = [self.python, "-m", self.module, "worker", "--redis-url", url]
        if self.name == "arq":
            # arq has no multi-process mode: run one worker process per core.
            return [self._role(procs, "worker", [*argv, "--processes", "1"], self.env(url))
                    for _ in range(self.worker_processes)]
        return [self._role(procs, "worker", [*argv, "--processes", str(self.worker_processes)], self.env(url))]


def peer_python(name: str) -> str | None:
    """The interpreter that runs peer ``name``, or None where none is installed.

    ``BENCH_<NAME>_PYTHON``, else ``bench/.venvs/<name>`` (``--setup-peers`` makes it), else
    this interpreter when it can import the peer (Celery fits the broker's environment).
    """
    explicit = os.environ.get(f"BENCH_{name.upper()}_PYTHON")
    if explicit:
        return explicit
    venv = VENVS / name / "bin" / "python"
    if venv.exists():
        return str(venv)
    if importlib.util.find_spec(PEER_MODULE[name]) is not None:
        return sys.executable
    return None


def setup_peers(names: list[str]) -> None:
    """Create ``bench/.venvs/<peer>`` from ``bench/peers/requirements-<peer>.txt`` (network: PyPI)."""
    for name in names:
        venv = VENVS / name
        req = ROOT / "bench" / "peers" / f"requirements-{name}.txt"
        print(f"setting up {name} in {venv.relative_to(ROOT)} from {req.relative_to(ROOT)}", flush=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-r", str(req)], check=True)


def versions(python: str, packages: list[str]) -> dict[str, str]:
    """Installed versions of ``packages`` in the environment of ``python``."""
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for p in sys.argv[1:]:\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: out[p] = 'missing'\n"
            "print(json.dumps(out))")
    done = subprocess.run([python, "-c", code, *packages], capture_output=True, text=True, timeout=60)
    return json.loads(done.stdout) if done.returncode == 0 else {p: "?" for p in packages}


def redis_server_version(binary: str) -> str:
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    return done.stdout.strip().split(" v=")[-1].split()[0] if done.returncode == 0 else "?"


def available(names: list[str]) -> dict[str, str]:
    """Peer name to interpreter, for the peers that are installed and importable there."""
    out: dict[str, str] = {}
    for name in names:
        python = peer_python(name)
        if python is None:
            continue
        try:
            ok = subprocess.run([python, "-c", f"import {PEER_MODULE[name]}"], capture_output=True, timeout=60,
                                cwd=Path(ROOT))
        except OSError:
            continue  # a BENCH_<NAME>_PYTHON that does not exist
        if ok.returncode == 0:
            out[name] = python
    return out
