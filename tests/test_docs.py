"""The documented redis-cli examples work as written (docs stay true to the code)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import click
import redis.asyncio as aioredis

from broker.topology import Topology
from broker.wire import decode_result
from cli.main import main
from cli.stack import wait_for_roles
from tests.conftest import ROOT, Roles
from tests.helpers import eventually
from tests.test_cli_help import option_names

DOCS = [ROOT / "README.md", ROOT / "docs" / "wire-format.md"]


def documented_xadds(cluster: bool = False) -> list[list[str]]:
    """Every `redis-cli ... XADD '<ingress>' ...` command line shown in the docs, as argv: those
    for one node, or with ``cluster`` those for a Redis Cluster (`redis-cli -c`, run against a
    cluster by tests/test_cluster_producers.py)."""
    commands = []
    for doc in DOCS:
        for line in doc.read_text().splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("redis-cli") and " XADD " in line and ":jobs" in line:
                argv = shlex.split(line)
                if ("-c" in argv[:argv.index("XADD")]) == cluster:
                    commands.append(argv)
    return commands


def test_the_docs_show_xadd_examples() -> None:
    assert len(documented_xadds()) >= 3
    assert documented_xadds(cluster=True)


def test_each_documented_cluster_xadd_goes_to_the_ingress_of_its_jobs_shard() -> None:
    topo = Topology("ib", 3)  # the docs' cluster session runs 3 shards (`--shards 3`)
    for argv in documented_xadds(cluster=True):
        stream, *_, fields = argv[argv.index("XADD") + 1:]
        assert stream == topo.of_job(json.loads(fields)["id"]).jobs, argv


async def test_documented_xadd_commands_get_their_documented_outcome(
        roles: Roles, client: aioredis.Redis, prefix: str) -> None:
    roles.policy()
    roles.worker("gpu")
    roles.worker("accel")
    topo = Topology(prefix)
    expected: dict[str, str] = {}
    for line in documented_xadds():
        # Same command, under this test's prefix.
        argv = [a.replace("ib:{ib}", topo.base) for a in line[line.index("XADD"):]]
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


# --------------------------------------------------------------------------- the CLI as documented

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CALL = re.compile(r"inference-broker((?:[ \t]+[^\s`|;&)#]+)+)")


def command_for(words: list[str]) -> tuple[click.Command, list[str]]:
    """The command that ``words`` (after ``inference-broker``) name, and the words after it."""
    cmd: click.Command = main
    while words and isinstance(cmd, click.Group) and words[0] in cmd.commands:
        cmd = cmd.commands[words[0]]
        words = words[1:]
    return cmd, words


def documented_calls() -> list[tuple[str, str, list[str]]]:
    """(file, line, words after ``inference-broker``) of every command line the docs show."""
    calls = []
    for doc in DOC_FILES:
        for line in doc.read_text().splitlines():
            for match in CALL.finditer(line):
                calls.append((doc.name, line.strip(), match.group(1).split()))
    return calls


def test_the_docs_show_cli_calls() -> None:
    assert len(documented_calls()) >= 30


def test_documented_commands_and_options_exist() -> None:
    wrong = []
    for doc, line, words in documented_calls():
        cmd, rest = command_for(words)
        known = set(option_names(cmd))
        wrong += [f"{doc}: {line}: {w}" for w in rest if w.startswith("--") and w.split("=")[0] not in known]
    assert not wrong, "\n".join(wrong)


def cli_table() -> dict[str, str]:
    """The README's table of commands: the command's first words to the row's description."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        if match := re.match(r"\| `([a-z][^`]*)` \| (.*) \|$", line):
            rows[match.group(1)] = match.group(2)
    return rows


def test_the_cli_table_lists_every_command_and_only_real_options() -> None:
    rows = cli_table()
    named = {row.split()[0] for row in rows}
    assert named == set(main.commands), named ^ set(main.commands)
    for row, description in rows.items():
        words = row.replace("/", " ").split()
        cmds = [command_for([words[0], w])[0] for w in words[1:] if w.isalpha()] or [command_for(words)[0]]
        known = set().union(*(option_names(c) for c in cmds))
        for option in re.findall(r"`(--[a-z-]+)", description):
            assert option in known, f"{row}: {option}"


def test_the_commands_said_to_take_the_shared_options_do() -> None:
    text = " ".join((ROOT / "README.md").read_text().split())
    match = re.search(r"Every command except (.+?) takes `--redis-url`, `--prefix`", text)
    assert match is not None
    excepted = set(re.findall(r"`([a-z]+)`", match.group(1)))
    without = {name for name, cmd in main.commands.items()
               if not isinstance(cmd, click.Group) and not {"--redis-url", "--prefix"} <= set(option_names(cmd))}
    assert excepted == without


def readme_submit_examples() -> list[str]:
    """The shell lines of the README's `submit`/`result` examples that run against the local stack."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line.startswith(("ID=", ".venv/bin/inference-broker submit", "echo"))
            and "inference-broker submit" in line and "--redis-url" not in line]


def test_the_readme_submit_examples_run_as_written(roles: Roles, redis_url: str, prefix: str) -> None:
    roles.policy()
    roles.worker("gpu")
    roles.worker("accel")
    # As on a fresh `up`: every pool's worker has reported, so routing sees the idle fleet.
    wait_for_roles(redis_url, Topology(prefix), {"gpu": 1, "accel": 1}, timeout=30)
    examples = readme_submit_examples()
    assert len(examples) >= 5
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("IB_")}, "REDIS_URL": redis_url,
           "IB_PREFIX": prefix}
    cli = f"{shlex.quote(sys.executable)} -m cli"
    for example in examples:
        done = subprocess.run(["bash", "-c", example.replace(".venv/bin/inference-broker", cli)], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{example}\n{done.stdout}{done.stderr}"
        assert ": ok" in done.stdout, f"{example}\n{done.stdout}"
        if claim := re.search(r"# -> (\w+), (\w+)", example):  # the class and pool the comment promises
            cls, pool = claim.groups()
            assert f"class   {cls}\n" in done.stdout and f"pool    {pool}\n" in done.stdout, \
                f"{example}\n{done.stdout}"


PACKAGES = ("policies", "evaluation", "broker", "workers", "gateway", "cli")


def readme_layout() -> dict[str, set[str]]:
    """The modules the README's layout lists under each package heading (``pkg/`` at column 0)."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Project layout"):readme.index("## Status and what is next")]
    listed: dict[str, set[str]] = {}
    package = None
    for line in block.splitlines():
        if m := re.match(r"(\w+)/ ", line):
            package = m.group(1) if m.group(1) in PACKAGES else None
            listed.setdefault(m.group(1), set())
        elif package and (m := re.match(r"  ([\w.]+\.py(?:, [\w.]+\.py)*) ", line)):
            listed[package] |= set(m.group(1).split(", "))
    return listed


def test_the_readme_layout_matches_the_tree() -> None:
    # The layout once left out six modules and listed ones that had moved.
    listed = readme_layout()
    assert [p for p in listed if p in PACKAGES] == list(PACKAGES)  # bottom layer first
    for package in PACKAGES:
        on_disk = {p.name for p in (ROOT / package).glob("*.py")} - {"__init__.py", "__main__.py"}
        assert listed[package] == on_disk, f"{package}/: missing {on_disk - listed[package]}, " \
                                           f"gone {listed[package] - on_disk}"


def test_the_architecture_map_states_the_layers_the_import_test_enforces() -> None:
    from tests.test_imports import MAY_IMPORT

    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert doc.index("## The map") < doc.index("## The shape")  # the page opens with it
    rows = dict(re.findall(r"^\| `(\w+)/` \|.*\| ([^|]+) \|$", doc, flags=re.M))
    assert list(rows) == list(MAY_IMPORT)
    for package, may in rows.items():
        assert set(re.findall(r"`(\w+)`", may)) == MAY_IMPORT[package] - {package}, package



async def test_the_documented_cancel_script_call_ends_a_waiting_job(client: aioredis.Redis, prefix: str,
                                                                    redis_url: str, tmp_path: Path) -> None:
    lines = [line.strip().removeprefix("$ ") for line in (ROOT / "docs" / "wire-format.md").read_text().splitlines()]
    cat = next(line for line in lines if line.startswith("cat ") and line.endswith("> cancel.lua"))
    call = next(line for line in lines if line.startswith("redis-cli") and "--eval cancel.lua" in line)
    topo = Topology(prefix)
    # The documented `cat`, with paths from the project root; the call under this test's prefix and port.
    (tmp_path / "cancel.lua").write_text("".join((ROOT / path).read_text() for path in shlex.split(cat)[1:-2]))
    argv = shlex.split(call.replace("ib:{ib}", topo.base))
    argv[argv.index("-p") + 1] = str(urlsplit(redis_url).port)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert f"(integer) {done.stdout.strip()}" == lines[lines.index(call) + 1], done.stderr  # no tty: no type
    result = decode_result(await client.get(topo.done("doc-cancel-1")))
    assert (result.status, result.error) == ("cancelled", "cancelled by its producer")
