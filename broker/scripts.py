"""The Lua scripts that move jobs between streams, each in one atomic step, and their calls.

Every move runs inside a script, so no other client sees a job on two streams, or acked on
one and absent from the next. Each move also writes a per-job marker with ``SET NX``, which
makes it idempotent by job id: a redelivered entry (its consumer died after the move,
before it learned of the ack) is acked again without a second copy downstream. The hot
moves (route, complete, submit) take a whole batch of entries per call; a batch cut short
by an error leaves its unacked entries pending, and their redelivery only acks what had
moved. Handled entries are deleted from their stream once acked, since only the broker's
own group reads the ingress and pool streams: their length is their backlog, and acked
work does not accumulate.

Worker-side scripts are *fenced*: they act only while the caller still owns the entry
(it is pending under the caller's consumer name). ``XACK`` from a consumer that no longer
owns an entry succeeds in Redis, so without the check a worker that was paused past its
lease, and whose job a peer took over, could still ack and publish.

Return codes: 1 done, 0 duplicate (the job already had an outcome; only acked), -1 fenced
(the caller lost the entry; nothing was written).

Redis does not roll back a script that fails part way: what it wrote before the error stays.
So no script writes before it has checked the keys it writes to (``lib/types.lua``), and a
job whose ``reply_to`` names a key that is no stream is left pending for its caller to
dead-letter, with nothing written for it.

Each script is a file of ``broker/lua``; its head comment documents its KEYS and ARGV, and
its ``-- requires:`` line names the fragments of ``broker/lua/lib`` it uses. Each is read
and hashed once, at import. Its KEYS and ARGV are laid out by one function (its encoder, in
:mod:`broker.calls`), which returns a :class:`ScriptCall` for :class:`Scripts` (now, or
queued on a pipeline) or for :class:`broker.script_batcher.ScriptBatcher`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from importlib.resources import files
from typing import Generic, NamedTuple, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoPermissionError, NoScriptError

from broker.connection import RETRYABLE
from broker.errors import ScriptsNotLoaded

log = logging.getLogger("inference_broker.scripts")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

LUA = files("broker") / "lua"
"""The scripts; their shared fragments are under ``lib``."""
_REQUIRES = re.compile(r"^-- requires: (.+)$", re.MULTILINE)


def _with_requirements(text: str, included: set[str]) -> list[str]:
    """``text`` after the fragments its ``-- requires:`` line names (not yet in ``included``),
    each after its own requirements: every fragment once, defined before it is used."""
    parts: list[str] = []
    for line in _REQUIRES.findall(text):
        for name in (n.strip() for n in line.split(",")):
            if name not in included:
                included.add(name)
                parts += _with_requirements((LUA / "lib" / f"{name}.lua").read_text(), included)
    return [*parts, text]


class Script:
    """One script as Redis runs it (its file after the fragments it requires), and its SHA."""

    __slots__ = ("name", "source", "sha")

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = "".join(_with_requirements((LUA / f"{name}.lua").read_text(), set()))
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()
        if SCRIPTS.setdefault(name, self) is not self:
            raise ValueError(f"script {name} is loaded twice")

    def __repr__(self) -> str:
        return f"Script({self.name!r})"


SCRIPTS: dict[str, Script] = {}
"""Every script by name (its file's stem): a name is loaded once."""
ROUTE = Script("route")
COMPLETE = Script("complete")
DEAD = Script("dead")
NACK = Script("nack")
RENEW = Script("renew")
CLAIM = Script("claim")
DELCONSUMER = Script("delconsumer")
EXPIRE_BEATS = Script("expire_beats")
DROPGROUP = Script("dropgroup")
REAP = Script("reap")
SUBMIT = Script("submit")
REPLAY = Script("replay")
CANCEL = Script("cancel")


class ScriptCall(NamedTuple, Generic[R_co]):
    """One call of ``script``, with the KEYS and ARGV its encoder laid out (:mod:`broker.calls`:
    made nowhere else). ``R_co``: what Redis replies."""

    script: Script
    keys: list[str]
    args: list[object]


MAX_PIPELINES = 64
"""Pipelines :class:`Scripts` remembers calls of until they are executed."""


class Scripts:
    """Runs script calls by SHA. Queue calls on a pipeline, then :meth:`execute` it.

    A node that does not know a script refuses its EVALSHA: a Redis that restarted empty, or
    a replica a failover promoted (scripts are not replicated). :meth:`execute` then runs
    again the script calls it refused, and only those (the pipeline's other commands, a read,
    ran once), by EVAL with their source, sent to the same nodes by their keys: that also
    teaches each node the script, so the next EVALSHA goes through. Such a node has likely
    forgotten them all, so every script is then loaded wherever the client sends SCRIPT LOAD
    (each primary it knows of): the other scripts' first calls need no rerun, which waits for
    the whole pipeline, a blocking read included. Every script is idempotent, so a rerun
    cannot duplicate work even if part of the first run went through.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._queued: dict[int, tuple[Pipeline, dict[int, ScriptCall[object]]]] = {}
        """Per pipeline not yet executed: the calls queued on it, by their place in it. Kept here
        rather than read back from the pipeline, whose command list is redis-py's own (and
        differs between a node's pipeline and a cluster's); the pipeline itself is held so
        that its id cannot be reused while it is listed."""

    def queue(self, pipe: Pipeline, call: ScriptCall[object]) -> None:
        """Queue ``call`` on ``pipe``."""
        _pipe, calls = self._queued.setdefault(id(pipe), (pipe, {}))
        calls[len(pipe)] = call
        if len(self._queued) > MAX_PIPELINES:  # pipelines built and never executed: forget the oldest
            del self._queued[next(iter(self._queued))]
        _send(pipe, call)

    async def execute(self, pipe: Pipeline, raise_on_error: bool = True) -> list[object]:
        """Execute ``pipe``, loading the scripts if Redis does not know them; with
        ``raise_on_error``, the first error among the results is raised."""
        _pipe, calls = self._queued.pop(id(pipe), (pipe, {}))
        results: list[object] = await pipe.execute(raise_on_error=False)
        unknown = [i for i, result in enumerate(results) if isinstance(result, NoScriptError) and i in calls]
        if unknown:
            again = self.client.pipeline(transaction=False)
            for i in unknown:
                _send(again, calls[i], by_source=True)
            for i, result in zip(unknown, await again.execute(raise_on_error=False), strict=True):
                results[i] = _missing(calls[i]) if isinstance(result, NoPermissionError) else result
            await self.teach()
        if raise_on_error:
            for result in results:
                if isinstance(result, Exception):
                    raise result
        return results

    async def call(self, call: ScriptCall[R]) -> R:
        """Run one script call now; its reply."""
        pipe = self.client.pipeline(transaction=False)
        self.queue(pipe, call)
        reply: R = (await self.execute(pipe))[0]  # type: ignore[assignment]
        return reply


    async def teach(self) -> None:
        """Load every script (best effort: a refused EVALSHA still gets its EVAL rerun). The
        roles do this as they start, so that producers, whose ACL users may run the broker's
        scripts but load none (docs/security.md), find them."""
        try:
            for script in SCRIPTS.values():
                await self.client.script_load(script.source)
        except (*RETRYABLE, NoPermissionError) as exc:
            log.debug("could not load the scripts (%s); each is sent by EVAL where refused", exc)


def _missing(call: ScriptCall[object]) -> ScriptsNotLoaded:
    return ScriptsNotLoaded(f"Redis does not know the broker's {call.script.name.upper()} script (it restarted or "
                            "failed over) and this user may not load it; a policy or pool worker loads the scripts "
                            "as it starts and sweeps: start one, or retry in a few seconds")


def _send(pipe: Pipeline, call: ScriptCall[object], by_source: bool = False) -> None:
    # EVALSHA/EVAL by name, not `pipe.evalsha`: a cluster pipeline refuses the method (and
    # routes the command by its first key all the same).
    script = ("EVAL", call.script.source) if by_source else ("EVALSHA", call.script.sha)
    pipe.execute_command(*script, len(call.keys), *call.keys, *call.args)


def unanswerable(code: object) -> str | None:
    """For a code of ROUTE or COMPLETE: the type of the key the job's ``reply_to`` names, when
    it is no stream (nothing was written for the job and its entry is still pending), else None."""
    return code.decode() if isinstance(code, bytes) else None


def not_a_stream(key: str, kind: str) -> str:
    """The error of the dead letter of a job whose ``reply_to`` names ``key``, a ``kind``."""
    return f"`$.reply_to` names key {key}, which is a {kind}, not a stream: there is nowhere to put its result"
