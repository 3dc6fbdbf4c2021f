"""A real ``python -m cli gateway`` process for the gateway tests, and the keys it accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import openai

from cli.embedded import free_port
from gateway.keys import key_line
from tests.conftest import Roles
from tests.helpers import eventually

KEY = "sk-test-acme-0123456789"
"""An API key of tenant ``acme``."""
OTHER_KEY = "sk-test-beta-9876543210"
"""An API key of tenant ``beta``."""


class GatewayProc:
    """A started gateway: its process and base URL."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def openai(self, key: str = KEY, **options: object) -> openai.AsyncOpenAI:
        """The official client, unchanged but for base_url and api_key (and no retries: tests see each answer)."""
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **options)  # type: ignore[arg-type]

    async def ready(self) -> None:
        async def answers() -> bool:
            assert self.proc.poll() is None, "the gateway exited"
            try:
                async with httpx.AsyncClient() as http:
                    return (await http.get(f"{self.url}/readyz", timeout=2)).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(answers, timeout=30, what="the gateway's /readyz")


async def start_gateway(roles: Roles, tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                        keys: dict[str, str] | None = None) -> GatewayProc:
    """``python -m cli gateway`` on a free port with ``keys`` (key -> tenant; default: the test
    keys of acme and beta), once it is ready."""
    path = tmp_path / "keys.txt"
    path.write_text("".join(f"{key_line(key, tenant)}\n" for key, tenant in
                            (keys or {KEY: "acme", OTHER_KEY: "beta"}).items()))
    port = free_port()
    proc = roles.start("gateway", "--port", str(port), "--keys-file", str(path), *args, env=env)
    gateway = GatewayProc(proc, port)
    await gateway.ready()
    return gateway
