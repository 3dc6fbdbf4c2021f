"""Smoke test of the gateway benchmark: ``python -m bench.gateway --quick`` runs end to end.

Seconds, not a measurement: real policy, worker and gateway processes, both latency paths
(the SDK and the gateway) answer every request, and the streaming ramp's two small levels
hold. The full benchmark is run by hand (bench/RESULTS.md, "Gateway").
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("psutil", reason="the bench extra is not installed: pip install -e '.[bench]'")


@pytest.mark.timeout(120)
def test_quick_gateway_benchmark_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\nearlier sections\n")
    done = subprocess.run([sys.executable, "-m", "bench.gateway", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-4000:]
    report = out.read_text()
    assert report.startswith("# Benchmark results\n\nearlier sections\n")  # appended, nothing rewritten
    assert "\n## Gateway\n" in report and "python -m bench.gateway --quick" in report
    for path in ("SDK: `Client.run`", "gateway: `POST /v1/chat/completions`"):
        row = next(line for line in report.splitlines() if line.startswith(f"| {path} |"))
        requests, errors = (int(cell.replace(",", "")) for cell in row.split("|")[2:4])
        assert (requests, errors) == (50, 0), row  # --quick: 1 s at 50/s, every request answered
    assert re.search(r"\*\*added by the gateway\*\* \| \| \| \*\*[+-]", report)
    levels = re.findall(r"^\| (\d+) \| (\d+) \| .* \| (yes|no) \|$", report, flags=re.M)
    assert [(n, complete) for n, complete, _ in levels] == [("5", "5"), ("10", "10")], levels
    assert "One gateway process held" in report
