"""docs/gateway.md's examples run as written: making a key, every curl line, the Python client example."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from broker.topology import Topology
from cli.embedded import free_port
from cli.stack import wait_for_roles
from tests.conftest import ROOT, Roles
from tests.gateway_proc import GatewayProc

DOC = ROOT / "docs" / "gateway.md"
DOCUMENTED_URL = "http://localhost:8000"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_shows_curl_and_python_examples_of_every_endpoint() -> None:
    curls = [line for block in blocks("bash") for line in block.splitlines() if line.startswith("curl ")]
    paths = {re.search(r"localhost:8000(/v1/\S+)", line)[1] for line in curls}  # type: ignore[index]
    assert paths == {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"}
    assert "base_url=\"http://localhost:8000/v1\"" in blocks("python")[0]


def shell(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    line = line.replace("inference-broker ", f"{sys.executable} -m cli ").replace(DOCUMENTED_URL, env["GATEWAY"])
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


async def test_the_documented_key_curl_and_client_examples_work(
        roles: Roles, tmp_path: Path, redis_url: str, prefix: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": redis_url, "IB_PREFIX": prefix}
    make_key = next(line for line in blocks("bash")[0].splitlines() if "hash-key" in line)
    env["GATEWAY"] = DOCUMENTED_URL
    made = shell(make_key, tmp_path, env)
    assert made.returncode == 0, made.stderr
    env["OPENAI_API_KEY"] = (tmp_path / "acme.key").read_text().strip()

    roles.policy()
    roles.worker("gpu")
    roles.worker("accel")
    port = free_port()
    gateway = GatewayProc(roles.start("gateway", "--keys-file", str(tmp_path / "keys.txt"), "--port", str(port)),
                          port)
    await gateway.ready()
    wait_for_roles(redis_url, Topology(prefix), {"gpu": 1, "accel": 1}, timeout=30)
    env["GATEWAY"] = gateway.url

    for line in (line for block in blocks("bash")[1:] for line in block.splitlines() if line.startswith("curl ")):
        done = shell(line, tmp_path, env)
        assert done.returncode == 0, f"{line}\n{done.stderr}"
        bodies = [json.loads(data) for data in re.findall(r"^data: (\{.*)$", done.stdout, re.M)] \
            if "stream" in line else [json.loads(done.stdout)]
        assert bodies and not any("error" in body for body in bodies), f"{line}\n{done.stdout}"
        if "stream" in line:
            assert done.stdout.rstrip().endswith("data: [DONE]") and bodies[-1]["usage"]["completion_tokens"] == 8

    script = tmp_path / "example.py"
    script.write_text(blocks("python")[0].replace(DOCUMENTED_URL, gateway.url))
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "priority" in done.stdout.splitlines()[0]  # the service tier the reply says it got


@pytest.mark.parametrize("table", ["errors", "configuration"])
def test_the_docs_tables_name_what_the_code_does(table: str) -> None:
    text = DOC.read_text()
    if table == "errors":
        source = "".join((ROOT / "gateway" / name).read_text() for name in ("openai.py", "errors.py", "catalog.py",
                                                                        "responses.py", "endpoints.py", "app.py"))
        codes = set(re.findall(r'code="([a-z_]+)"', source))
        section = text[text.index("## Errors"):text.index("## Disconnects")]
        missing = sorted(code for code in codes if f"`{code}`" not in section)
        assert not missing, f"codes the gateway answers but the doc does not list: {missing}"
    else:
        from gateway.settings import GatewaySettings
        section = text[text.index("## Configuration"):text.index("## Metrics")]
        missing = [name for name in GatewaySettings.__struct_fields__ if f"`IB_GATEWAY_{name.upper()}`" not in section]
        assert not missing, missing

