"""Smoke test of bench/gateway_servers.py: both servers answer and the table comes out (not how fast)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from cli.embedded import free_port
from tests.conftest import ROOT

pytest.importorskip("psutil", reason="the bench extra is not installed: pip install -e '.[bench]'")
pytest.importorskip("granian", reason="the bench extra is not installed: pip install -e '.[bench]'")


def test_the_server_benchmark_measures_both_servers_on_both_endpoints() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.gateway_servers", "--seconds", "0.3", "--concurrency", "4",
                           "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = re.findall(r"^\| (uvicorn|granian) \| (/json|/sse) \| ([\d,]+) \|", done.stdout, re.M)
    assert {(server, path) for server, path, _ in rows} == {(s, p) for s in ("uvicorn", "granian")
                                                           for p in ("/json", "/sse")}
    assert all(int(rps.replace(",", "")) > 0 for _, _, rps in rows)
