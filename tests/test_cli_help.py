"""The CLI's surface: help for every command, `config`, and the errors given before any I/O.

Nothing here talks to Redis: every invocation either stops at --help, prints the built-in
config, or fails on its arguments before connecting.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from broker.config import default_config_text
from cli.main import main
from policies.config import EVALUATION_ROUTERS, config_from_dict

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = sorted(main.commands)
# A URL nothing listens on: the commands below must fail before they would use it.
NOWHERE = "redis://127.0.0.1:1/0"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No REDIS_URL etc. from the developer's shell, no `up` state file, no logging setup."""
    for var in ("REDIS_URL", "IB_PREFIX", "IB_CONFIG", "IB_GRACE_S"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "runtime"))
    # The commands call logging.basicConfig on the runner's captured stderr; keep that out of
    # the test process's root logger.
    monkeypatch.setattr(logging, "basicConfig", lambda **_: None)


def invoke(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, prog_name="inference-broker")


def option_names(cmd: click.Command) -> list[str]:
    """Every visible option flag (``--help`` included) and argument name of ``cmd``."""
    # With the root group's context settings, which every command inherits: click caches the
    # help option a context makes (`-h` went missing from later invocations without them).
    ctx = click.Context(cmd, info_name=cmd.name, **main.context_settings)
    names: list[str] = []
    for param in cmd.get_params(ctx):
        if isinstance(param, click.Option):
            if not param.hidden:
                names += [*param.opts, *param.secondary_opts]
        else:
            names.append(param.human_readable_name)  # JOB_ID, PATH
    return names


def test_there_are_commands() -> None:
    assert {"up", "submit", "worker", "policy", "config"} <= set(COMMANDS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_group_help(flag: str) -> None:
    res = invoke(flag)
    assert res.exit_code == 0, res.output
    assert "Usage: inference-broker" in res.output
    for name in COMMANDS:
        assert name in res.output
    for opt in option_names(main):
        assert opt in res.output, opt


def test_no_arguments_shows_usage() -> None:
    res = invoke()
    assert "Usage: inference-broker" in res.output
    assert res.exit_code in (0, 2)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name: str) -> None:
    cmd = main.commands[name]
    res = invoke(name, "--help")
    assert res.exit_code == 0, res.output
    assert res.exception is None
    assert f"Usage: inference-broker {name}" in res.output
    assert cmd.help and cmd.help.split("\n")[0].strip()[:30] in res.output
    for opt in option_names(cmd):
        assert opt in res.output, f"{name}: {opt} missing from --help"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_accepts_short_help(name: str) -> None:
    res = invoke(name, "-h")
    assert res.exit_code == 0, res.output
    assert f"Usage: inference-broker {name}" in res.output


def test_version() -> None:
    res = invoke("--version")
    assert res.exit_code == 0
    assert "version" in res.output


def test_python_dash_m_broker_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "cli", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "submit" in proc.stdout


# --------------------------------------------------------------------------- config


def test_config_prints_the_builtin_toml() -> None:
    res = invoke("config")
    assert res.exit_code == 0, res.output
    assert res.stdout == default_config_text()
    cfg = config_from_dict(tomllib.loads(res.stdout))
    assert "gpu" in cfg.pools and "interactive" in cfg.classes


def test_config_checks_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(invoke("config").stdout)
    res = invoke("config", str(path))
    assert res.exit_code == 0, res.output
    assert f"{path}: ok" in res.output
    assert "3 classes" in res.output and "gpu" in res.output and "accel" in res.output


@pytest.mark.parametrize(("text", "problem"), [
    ('[classes.standard]\nttft_ms = "fast"\n[pools.gpu]\nmodels = ["llama-3.1-8b"]\n', "ttft_ms"),
    ('[classes.standard]\nttft_ms = 1\n[pools.gpu]\nmodels = ["llama-3.1-8b"]\nprofile = "tpu"\n', "'tpu'"),
    ('[classes.standard]\nttft_ms = 1\n[pools.cpu]\nmodels = ["llama-3.1-8b"]\n', "default_pool 'gpu'"),
    ("[classes.standard\n", "line 1"),
])
def test_config_bad_file_exits_nonzero_naming_file_and_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad-policy.toml"
    path.write_text(text)
    res = invoke("config", str(path))
    assert res.exit_code != 0
    assert isinstance(res.exception, SystemExit)  # a clean error, not a traceback
    assert str(path) in res.output
    assert problem in res.output


def test_config_refuses_an_evaluation_only_router_naming_them_all(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(invoke("config").stdout + '\n[routing]\npolicy = "oracle"\n')
    res = invoke("config", str(path))
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert "'oracle' is an evaluation-only router" in res.output
    for name in EVALUATION_ROUTERS:
        assert name in res.output
    assert "inference-broker simulate --policy" in res.output  # where they do run


def test_config_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    res = invoke("config", str(tmp_path / "absent.toml"))
    assert res.exit_code == 2
    assert "absent.toml" in res.output


# --------------------------------------------------------------------------- errors before I/O


@pytest.mark.parametrize("args", [
    ["submit", "-p", "hello"],
    ["policy"],
    ["worker", "--pool", "gpu"],
    ["result", "some-job"],
    ["results"],
    ["health"],
    ["top", "--once"],
    ["report"],
], ids=lambda a: a[0])
def test_commands_without_redis_point_at_up(args: list[str]) -> None:
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    assert "no Redis configured" in res.output
    assert "inference-broker up" in res.output
    assert "--redis-url" in res.output


def test_a_running_up_is_found_through_its_state_file(tmp_path: Path) -> None:
    """With the state file present the URL error goes away (and the next check, --prompt, fails)."""
    state = tmp_path / "runtime" / "inference-broker" / "up.url"
    state.parent.mkdir(parents=True)
    state.write_text(NOWHERE + "\n")
    res = invoke("submit")
    assert res.exit_code == 2
    assert "no Redis configured" not in res.output
    assert "give --prompt TEXT or --job FILE" in res.output


def test_submit_needs_a_prompt_or_a_job() -> None:
    res = invoke("submit", "--redis-url", NOWHERE)
    assert res.exit_code == 2
    assert "--prompt" in res.output and "--job" in res.output


def test_submit_job_file_must_be_json() -> None:
    res = invoke("submit", "--redis-url", NOWHERE, "--job", "-", input="not json")
    assert res.exit_code == 2
    assert "--job" in res.output and "not JSON" in res.output


@pytest.mark.parametrize(("args", "message"), [
    (["submit", "--kind", "image", "-p", "x"], "--kind"),
    (["submit", "--max-tokens", "-1", "-p", "x"], "--max-tokens"),
    (["worker"], "--pool"),
    (["worker", "--pool", "gpu", "--concurrency", "0"], "--concurrency"),
    (["demo", "--jobs", "0"], "--jobs"),
    (["up", "--log-level", "LOUD"], "--log-level"),
    (["result"], "JOB_ID"),
    (["asyncapi", "--format", "xml"], "--format"),
    (["top", "--interval", "0"], "--interval"),
    (["report", "--reply-to", "jobs", "--redis-url", NOWHERE], "reserved"),
    (["up", "--replicas", "1"], "--replicas needs --cluster N"),
    (["demo", "--cluster", "3", "--redis-url", NOWHERE], "--cluster starts its own Redis"),
    (["demo", "--cluster", "3", "--no-stack", "--redis-url", NOWHERE], "give one of them"),
])
def test_bad_arguments_are_usage_errors(args: list[str], message: str) -> None:
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_submit_invalid_job_file_is_a_clean_error() -> None:
    res = invoke("submit", "--redis-url", NOWHERE, "--job", "-", input='{"model": "m", "kind": "chat"}')
    assert isinstance(res.exception, SystemExit) and res.exit_code != 0
    assert "$.messages" in res.output


def test_invalid_prefix_is_a_clean_error() -> None:
    res = invoke("results", "--redis-url", NOWHERE, "--prefix", "bad prefix")
    assert isinstance(res.exception, SystemExit) and res.exit_code != 0
    assert "prefix" in res.output


def test_reserved_reply_to_is_a_clean_error() -> None:
    res = invoke("results", "--redis-url", NOWHERE, "--reply-to", "jobs")
    assert isinstance(res.exception, SystemExit) and res.exit_code != 0
    assert "reserved" in res.output


# --------------------------------------------------------------------------- help at 80 columns


def command_paths() -> list[tuple[str, ...]]:
    """Every command, subcommands of groups included: ("up",), ("dead", "list"), ..."""
    paths: list[tuple[str, ...]] = []
    for name, cmd in sorted(main.commands.items()):
        if isinstance(cmd, click.Group):
            paths += [(name, sub) for sub in sorted(cmd.commands)]
        paths.append((name,))
    return paths


def command_at(path: tuple[str, ...]) -> click.Command:
    cmd: click.Command = main
    for name in path:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[name]
    return cmd


def first_sentence(cmd: click.Command) -> str:
    """The first sentence of a command's docstring, whitespace collapsed (what the command list shows)."""
    words = (cmd.help or "").partition("\n\n")[0].split()
    for i, word in enumerate(words):
        if word.endswith(".") and (i == len(words) - 1 or not words[i + 1][0].islower()):
            return " ".join(words[: i + 1])
    return " ".join(words)


def flat(text: str) -> str:
    """``text`` on one line, as written before wrapping (which may break after a hyphen)."""
    return re.sub(r"-\s+", "-", " ".join(text.split()))


def help_at_80(*path: str) -> str:
    """``--help`` of a command as a pipe shows it: 80 columns."""
    res = CliRunner().invoke(main, [*path, "--help"], prog_name="inference-broker", env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("path", [(), *(p for p in command_paths() if isinstance(command_at(p), click.Group))],
                         ids=lambda p: " ".join(p) or "main")
def test_command_lists_show_whole_sentences_at_80_columns(path: tuple[str, ...]) -> None:
    # Click cut each description to one line with "...", mid-phrase.
    text = flat(help_at_80(*path))
    group = command_at(path)
    assert isinstance(group, click.Group)
    for name, cmd in group.commands.items():
        assert first_sentence(cmd) in text, f"{name}: {first_sentence(cmd)!r} not whole in the list"


@pytest.mark.parametrize("path", [(), *command_paths()], ids=lambda p: " ".join(p) or "main")
def test_help_at_80_columns_cuts_nothing(path: tuple[str, ...]) -> None:
    out = help_at_80(*path)
    body = [line for line in out.splitlines() if not line.startswith("Usage:")]  # "[ARGS]..." is click's notation
    cut = [line for line in body if "..." in line or "…" in line]
    assert not cut, f"{' '.join(path)}: {cut}"
    assert max(map(len, out.splitlines())) <= 80


@pytest.mark.parametrize("path", command_paths(), ids=" ".join)
def test_every_option_says_what_it_does(path: tuple[str, ...]) -> None:
    cmd = command_at(path)
    ctx = click.Context(cmd, info_name=path[-1], **main.context_settings)
    bare = [p.opts[0] for p in cmd.get_params(ctx) if isinstance(p, click.Option) and not p.hidden and not p.help]
    assert not bare, f"{' '.join(path)}: options without help: {bare}"


def readme() -> str:
    return (ROOT / "README.md").read_text()


@pytest.mark.parametrize(("command", "phrases"), [
    ("up", ["every configured pool", "SIGTERM"]),
    ("worker", ["simulated device", "OpenAI-compatible", "in-process model"]),
])
def test_help_and_readme_say_the_same(command: str, phrases: list[str]) -> None:
    row = next(line for line in readme().splitlines() if line.startswith(f"| `{command}"))
    text = flat(help_at_80(command))
    for phrase in phrases:
        assert phrase in row and phrase in text, phrase


def test_demo_help_and_readme_give_the_same_duration() -> None:
    match = re.search(r"It takes about (\d+ s)\.", readme())
    assert match is not None
    assert f"Takes about {match.group(1)} by default" in flat(help_at_80("demo"))


# --------------------------------------------------------------------------- options checked before any I/O


@pytest.mark.parametrize("text", ["[classes.standard\n", 'default_pool = "tpu"\n'], ids=["not-toml", "invalid"])
def test_a_malformed_config_fails_every_command(tmp_path: Path, text: str) -> None:
    # `submit --config` with a bad file used to be ignored: only the roles read it.
    path = tmp_path / "policy.toml"
    path.write_text(text)
    for args in (["submit", "-p", "x"], ["result", "some-job"], ["dead", "list"], ["health"]):
        res = invoke(*args, "--redis-url", NOWHERE, "--config", str(path))
        assert res.exit_code == 2, (args, res.output)
        assert "--config" in res.output and str(path) in res.output


def test_a_missing_config_fails_every_command(tmp_path: Path) -> None:
    for args in (["submit", "-p", "x"], ["top", "--once"], ["simulate"]):
        res = invoke(*args, "--redis-url", NOWHERE, "--config", str(tmp_path / "absent.toml")) \
            if args[0] != "simulate" else invoke(*args, "--config", str(tmp_path / "absent.toml"))
        assert res.exit_code == 2, (args, res.output)
        assert "absent.toml" in res.output and "does not exist" in res.output


def test_an_unreadable_url_file_is_a_usage_error(tmp_path: Path) -> None:
    res = invoke("submit", "-p", "x", "--redis-url", f"@{tmp_path / 'absent-url'}")
    assert res.exit_code == 2
    assert "cannot read the URL file" in res.output and "absent-url" in res.output


def test_simulate_fits_80_columns() -> None:
    res = CliRunner().invoke(main, ["simulate", "--duration", "2", "--policy", "slo,lowest_latency,cheapest_first",
                                    "--goodput"], prog_name="inference-broker", env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert "…" not in res.output and max(map(len, res.output.splitlines())) <= 80
    for name in ("slo", "lowest_latency", "cheapest_first", "interactive", "standard", "goodput"):
        assert re.search(rf"\b{name}\b", res.output), name


@pytest.mark.parametrize(("args", "message"), [
    (["submit", "-p", "x", "--timeout", "0"], "--timeout"),
    (["results", "--limit", "0"], "--limit"),
    (["health", "--max-age", "0"], "--max-age"),
    (["worker", "--pool", "gpu", "--grace", "-1"], "--grace"),
    (["dead", "list", "--reason", "bored"], "--reason"),
    # Checked before the run, not after a minute of it.
    (["demo", "--json", "/nonexistent-dir/results.jsonl"], "--json"),
], ids=lambda a: " ".join(a[:2]) if isinstance(a, list) else a)
def test_values_that_cannot_work_are_usage_errors(args: list[str], message: str) -> None:
    res = invoke(*args, "--redis-url", NOWHERE)
    assert res.exit_code == 2, res.output
    assert message in res.output
