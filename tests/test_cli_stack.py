"""The CLI as a user runs it: `up` on an embedded Redis, `submit` and `results` against it, `demo`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.topology import shard_of
from tests.conftest import ROOT, Roles, TlsRedis

CLI = [sys.executable, "-m", "cli"]


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "IB_PREFIX", "IB_CONFIG")}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)  # where `up` records its URL
    env["IB_GATEWAY_PORT"] = "0"  # `up`'s gateway on a free port: tests running side by side share no port
    return env


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``check`` until it is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def start_up(cli_env: dict[str, str], tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    """``inference-broker up --workers gpu=1 ARGS``, once it has recorded its Redis URL (the state file)."""
    up = subprocess.Popen([*CLI, "up", "--workers", "gpu=1", *args], env=cli_env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "inference-broker" / "up.url"

    def recorded() -> bool:
        assert up.poll() is None, up.communicate()
        return state.exists()

    try:
        wait_until(recorded, "up to record its Redis URL")
    except BaseException:
        up.kill()
        up.wait()
        raise
    return up, state


def test_up_submit_results_and_clean_stop(cli_env: dict[str, str], tmp_path: Path) -> None:
    up, state = start_up(cli_env, tmp_path)
    try:
        url = state.read_text()
        # No --redis-url: the commands find the stack that `up` started.
        done = run_cli("submit", "--prompt", "Hello there", "--max-tokens", "5", "--json", env=cli_env)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["status"] == "ok" and result["usage"]["completion_tokens"] == 5
        assert result["slo"] == "interactive"

        human = run_cli("submit", "--prompt", "More", "--kind", "completion", "--slo", "batch", env=cli_env)
        assert human.returncode == 0, human.stderr
        assert ": ok" in human.stdout and "TTFT" in human.stdout and "class   batch" in human.stdout

        listed = run_cli("results", "--json", env=cli_env)
        assert listed.returncode == 0, listed.stderr
        assert len(listed.stdout.splitlines()) == 2

        one = run_cli("result", result["id"], env=cli_env)
        assert one.returncode == 0 and result["id"] in one.stdout

        health = run_cli("health", env=cli_env)
        assert health.returncode == 0, health.stderr
    finally:
        up.send_signal(signal.SIGINT)
        out, err = up.communicate(timeout=30)
    assert up.returncode == 0, err
    assert not state.exists()
    host, port = url.split("//")[1].split("/")[0].split(":")
    with pytest.raises(OSError):  # the embedded Redis is gone too
        socket.create_connection((host, int(port)), timeout=1).close()


def assert_nodes_gone(ports: list[int]) -> None:
    """No redis-server of these ports runs any more, and nothing listens on them."""
    for proc in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = proc.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone meanwhile
            continue
        if any(arg.endswith("redis-server") for arg in argv[:1]) and "--port" in argv:
            assert int(argv[argv.index("--port") + 1]) not in ports, f"left running: {argv}"
    for port in ports:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


def cluster_ports(output: str) -> list[int]:
    """The node ports a ``--cluster`` stack printed ("  nodes: A, B, C")."""
    line = next(line for line in output.splitlines() if line.startswith("  nodes: "))
    return [int(port) for port in line.removeprefix("  nodes: ").split(", ")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_up_cluster_is_found_with_its_shards_and_stops_every_node(cli_env: dict[str, str],
                                                                  tmp_path: Path) -> None:
    up, state = start_up(cli_env, tmp_path, "--cluster", "3", "--replicas", "1")
    try:
        url, shards = state.read_text().splitlines()
        assert url.startswith("redis+cluster://127.0.0.1:") and shards == "shards=3"
        # No --redis-url, no --shards: each submit finds the cluster and the job's shard.
        for shard in range(3):
            job_id = next(f"cli-{i}" for i in range(1000) if shard_of(f"cli-{i}", 3) == shard)
            job = tmp_path / f"{job_id}.json"
            job.write_text(json.dumps({"id": job_id, "model": "llama-3.1-8b", "kind": "completion",
                                       "prompt": "Hello", "max_tokens": 3}))
            done = run_cli("submit", "--job", str(job), "--json", env=cli_env)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["status"] == "ok"
    finally:
        up.send_signal(signal.SIGINT)
        _out, err = up.communicate(timeout=30)
    assert up.returncode == 0, err
    assert "3 shards" in err and "3 primaries, 1 replica(s) each" in err and not state.exists()
    for shard in range(3):
        assert f"shard {shard} {{ib.{shard}}} -> slot" in err
    ports = cluster_ports(err)
    assert len(ports) == 6
    assert_nodes_gone(ports)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_demo_runs_to_the_end_on_a_local_cluster(cli_env: dict[str, str]) -> None:
    done = run_cli("demo", "--cluster", "3", "--jobs", "30", "--rate", "60", env=cli_env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "30 jobs in" in done.stdout and "30 ok, 0 not ok" in done.stdout
    assert "redis+cluster://127.0.0.1:" in done.stdout and "3 primaries" in done.stdout
    ports = cluster_ports(done.stdout)
    assert len(ports) == 3
    assert_nodes_gone(ports)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_a_killed_up_takes_its_redis_and_roles_with_it(cli_env: dict[str, str], tmp_path: Path) -> None:
    up, _state = start_up(cli_env, tmp_path)
    try:
        # Up and working: the roles have connected and sent heartbeats.
        wait_until(lambda: run_cli("health", "--pool", "gpu", env=cli_env).returncode == 0, "the gpu worker")
        children = [int(p) for p in Path(f"/proc/{up.pid}/task/{up.pid}/children").read_text().split()]
        assert len(children) == 5  # redis, the policy, a gpu and an accel worker, the gateway
    finally:
        up.kill()  # SIGKILL: no handler runs, no clean stop
        up.wait()
    wait_until(lambda: not any(_alive(pid) for pid in children), "the orphans to exit")


def test_submit_without_a_stack_says_what_to_do(cli_env: dict[str, str]) -> None:
    done = run_cli("submit", "--prompt", "hi", env=cli_env)
    assert done.returncode == 2
    assert "inference-broker up" in done.stderr and "REDIS_URL" in done.stderr


def test_unreachable_redis_is_a_clear_error_without_the_password(cli_env: dict[str, str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    done = run_cli("health", "--redis-url", f"redis://:hunter2@127.0.0.1:{port}/0", env=cli_env)
    assert done.returncode == 1
    assert "unreachable" in done.stderr and "hunter2" not in done.stderr


def test_demo_runs_to_the_end_on_an_embedded_redis(cli_env: dict[str, str]) -> None:
    done = run_cli("demo", "--jobs", "60", "--rate", "60", env=cli_env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "Results by SLO class and pool" in out
    for column in ("queue wait", "TTFT", "end-to-end", "SLO met", "share"):
        assert column in out
    assert "60 jobs in" in out and "60 ok, 0 not ok" in out
    assert "interactive" in out and "accel" in out


def test_demo_no_stack_drives_roles_already_running(roles: Roles, redis_url: str, prefix: str,
                                                    cli_env: dict[str, str]) -> None:
    roles.policy()
    roles.worker("gpu")
    roles.worker("accel")
    done = run_cli("demo", "--no-stack", "--redis-url", redis_url, "--prefix", prefix, "--jobs", "30",
                   "--rate", "60", env=cli_env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "30 ok, 0 not ok" in done.stdout
    # It started no roles of its own: only ours ever sent heartbeats.
    assert [p.poll() for p in roles.procs] == [None, None, None]


def test_demo_no_stack_needs_a_url(cli_env: dict[str, str]) -> None:
    done = run_cli("demo", "--no-stack", env=cli_env)
    assert done.returncode == 2 and "--no-stack needs --redis-url" in done.stderr


def test_up_stops_cleanly_on_sigterm(cli_env: dict[str, str], tmp_path: Path) -> None:
    up = subprocess.Popen([*CLI, "up"], env=cli_env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    state = tmp_path / "inference-broker" / "up.url"
    deadline = time.monotonic() + 30
    while not state.exists():
        assert up.poll() is None and time.monotonic() < deadline, up.communicate()
        time.sleep(0.05)
    up.send_signal(signal.SIGTERM)
    _out, err = up.communicate(timeout=40)
    assert up.returncode == 0, err
    assert not state.exists()


@pytest.fixture
def nowhere() -> str:
    """A Redis URL on a loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{s.getsockname()[1]}/0"


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The error a command printed: one ``error: ...; try: ...`` line on stderr, never a traceback."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if " WARNING " not in line]  # log lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; try: " in lines[0], done.stderr
    return lines[0]


@pytest.mark.parametrize("args", [
    ["submit", "-p", "hi"],
    ["result", "some-job"],
    ["results"],
    ["top", "--once"],
    ["health"],
    ["dead", "list"],
    ["report", "--out", "unused"],
    ["up"],
], ids=lambda a: " ".join(a))
def test_unreachable_redis_is_one_line_and_a_failure(args: list[str], nowhere: str,
                                                     cli_env: dict[str, str]) -> None:
    # submit and result printed redis-py's traceback; top --once printed a frame and exited 0.
    done = run_cli(*args, "--redis-url", nowhere, env=cli_env)
    assert done.returncode == 1, done.stdout + done.stderr
    line = one_line_error(done)
    assert "unreachable" in line and "connection refused" in line and nowhere in line


@pytest.mark.parametrize(("url_of", "says"), [
    (lambda tls, plain: f"rediss://127.0.0.1:{tls.port}/0", ["does not trust", "ssl_ca_certs"]),
    (lambda tls, plain: f"redis://127.0.0.1:{tls.port}/0", ["accepts only TLS", "rediss://"]),
    (lambda tls, plain: plain.replace("redis://", "rediss://", 1), ["does not speak TLS", "redis://"]),
], ids=["untrusted-certificate", "plaintext-to-tls", "tls-to-plaintext"])
@pytest.mark.parametrize("args", [["submit", "-p", "hi"], ["policy"]], ids=["submit", "policy"])
def test_a_tls_mismatch_says_what_is_wrong_at_once(
        tls_redis: TlsRedis, redis_url: str, cli_env: dict[str, str], args: list[str],
        url_of: Callable[[TlsRedis, str], str], says: list[str]) -> None:
    # These were retried in silence (30 s for a role), then reported as "connection reset" or
    # "timeout", or as a traceback.
    started = time.monotonic()
    done = run_cli(*args, "--redis-url", url_of(tls_redis, redis_url), env=cli_env)
    assert time.monotonic() - started < 15  # the TLS handshake against plaintext waits its 5 s once
    assert done.returncode == 1, done.stdout + done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr and line.startswith("error: ")
    for words in says:
        assert words in line


def test_a_tls_url_with_its_ca_works(tls_redis: TlsRedis, cli_env: dict[str, str]) -> None:
    done = run_cli("health", "--redis-url", tls_redis.url, env=cli_env)
    assert done.returncode == 0 and "redis ok" in done.stdout, done.stderr


def test_a_password_on_the_command_line_is_warned_about_and_never_shown(
        nowhere: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    secret_url = nowhere.replace("redis://", "redis://:hunter2@")
    warning = "WARNING inference_broker: the password in --redis-url shows in `ps`"
    typed = run_cli("submit", "-p", "hi", "--redis-url", secret_url, env=cli_env)
    assert warning in typed.stderr.splitlines()[0]
    assert "try: REDIS_URL in the environment, or --redis-url @FILE" in typed.stderr
    one_line_error(typed)
    # The same URL from the environment, or from a file: no warning.
    from_env = run_cli("submit", "-p", "hi", env={**cli_env, "REDIS_URL": secret_url})
    url_file = tmp_path / "redis-url"
    url_file.write_text(secret_url + "\n")
    from_file = run_cli("submit", "-p", "hi", "--redis-url", f"@{url_file}", env=cli_env)
    for done in (typed, from_env, from_file):
        assert done.returncode == 1
        assert "hunter2" not in done.stdout + done.stderr
        assert "***@127.0.0.1" in done.stderr
    for done in (from_env, from_file):
        assert "--redis-url shows in `ps`" not in done.stderr
        one_line_error(done)
