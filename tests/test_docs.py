"""The documented redis-cli examples work as written (docs stay true to the code)."""

from __future__ import annotations

import json
import shlex

import redis.asyncio as aioredis

from broker.topology import Topology
from tests.conftest import ROOT, Roles
from tests.helpers import eventually

DOCS = [ROOT / "README.md", ROOT / "docs" / "wire-format.md"]


def documented_xadds() -> list[list[str]]:
    """Every `redis-cli ... XADD 'ib:{ib}:jobs' ...` command shown in the docs, as argv."""
    commands = []
    for doc in DOCS:
        for line in doc.read_text().splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("redis-cli") and " XADD " in line and ":jobs" in line:
                argv = shlex.split(line)
                commands.append(argv[argv.index("XADD"):])
    return commands


def test_the_docs_show_xadd_examples() -> None:
    assert len(documented_xadds()) >= 3


async def test_documented_xadd_commands_get_their_documented_outcome(
        roles: Roles, client: aioredis.Redis, prefix: str) -> None:
    roles.policy()
    roles.worker("gpu")
    roles.worker("accel")
    topo = Topology(prefix)
    expected: dict[str, str] = {}
    for argv in documented_xadds():
        # Same command, under this test's prefix.
        argv = [a.replace("ib:{ib}", topo.base) for a in argv]
        await client.execute_command(*argv)
        fields = dict(zip(argv[3::2], argv[4::2], strict=True))
        if "job" in fields:
            job = json.loads(fields["job"])
            expected[job["id"]] = job.get("reply_to", "results")

    async def all_done() -> bool:
        return await client.exists(*(topo.done(job_id) for job_id in expected)) == len(expected)

    await eventually(all_done, what="an outcome for every documented job")
    for job_id, reply_to in expected.items():
        result = json.loads(await client.get(topo.done(job_id)))
        # A documented job either works, or is documented as the example of a bad one.
        assert result["status"] == ("failed" if "bad" in job_id else "ok"), result
        entries = await client.xrange(topo.reply(reply_to))
        assert [json.loads(f[b"result"])["id"] for _i, f in entries].count(job_id) == 1


def readme_command(title: str) -> str:
    """The command under ``title`` in the README's "Two commands" section."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(title)
    fence = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
    return lines[fence + 1].strip()


def test_ci_runs_the_readme_test_command_exactly_as_written() -> None:
    # CI once installed more extras than the README's command and so never ran what a new
    # user runs (a test that assumed torch failed only on a fresh machine).
    command = readme_command("Run the tests:")
    assert command.startswith("python3 -m venv .venv && ") and command.endswith("python -m pytest")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci
    first_pytest = next(line for line in ci if "pytest" in line and not line.startswith(("#", "echo")))
    assert first_pytest == command, "the README's command must be the first test run in .ci/run"
