"""Script calls made while a batch is in flight, run together in one pipeline.

A worker finishing many jobs at once would otherwise spend a round trip and a pooled
connection per job (see :class:`ScriptBatcher`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from broker.calls import CompleteTarget, Completion, complete
from broker.scripts import ScriptCall, Scripts

log = logging.getLogger("inference_broker.scripts")
R = TypeVar("R")

Answer = Callable[[Any], None]
"""Gets a script's result, or its error as an exception object."""


class ScriptBatcher:
    """Runs the script calls made while a batch is in flight together, in one pipeline.

    A worker finishing many jobs at once would otherwise spend a round trip and a pooled
    connection per job. Here the first call starts a flush; calls made meanwhile wait for
    the next one: one connection, one round trip per batch, however many jobs end. The
    completions of a batch go to Redis as one COMPLETE per target stream. Each entry is
    still checked and acted on alone, so batching changes no guarantee. Results (or errors,
    Redis' own as well as a lost connection) go back to each caller.
    """

    def __init__(self, scripts: Scripts) -> None:
        self.scripts = scripts
        self.calls: list[tuple[ScriptCall[object], Answer]] = []
        self.completions: list[tuple[CompleteTarget, Completion, Answer]] = []
        self.flusher: asyncio.Task[None] | None = None
        self.batches = 0

    async def call(self, call: ScriptCall[R]) -> R:
        """Run ``call`` with the next batch; its result, or its error raised here."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.calls.append((call, partial(_settle, future)))
        self._flush_soon()
        return await future

    async def complete(self, target: CompleteTarget, item: Completion) -> int | bytes:
        """Complete one entry with the next batch: 1 done, 0 duplicate, -1 fenced, or the type
        of the key its reply stream is (see COMPLETE and :func:`unanswerable`)."""
        future = asyncio.get_running_loop().create_future()
        self.complete_then(target, item, partial(_settle, future))
        code: int | bytes = await future
        return code

    def complete_then(self, target: CompleteTarget, item: Completion, answer: Answer) -> None:
        """Queue one entry for the next COMPLETE of ``target``; ``answer`` gets its code or error.

        For callers with many entries in flight: no future and no task switch per entry.
        """
        self.completions.append((target, item, answer))
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self.flusher is None:
            self.flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self.calls or self.completions:
                calls, self.calls = self.calls, []
                completions, self.completions = self.completions, []
                groups: dict[CompleteTarget, tuple[list[Completion], list[Answer]]] = {}
                for target, item, answer in completions:
                    items, answers = groups.setdefault(target, ([], []))
                    items.append(item)
                    answers.append(answer)
                try:
                    async with self.scripts.client.pipeline(transaction=False) as pipe:
                        for call, _ in calls:
                            self.scripts.queue(pipe, call)
                        for target, (items, _) in groups.items():
                            self.scripts.queue(pipe, complete(target, items))
                        results = await self.scripts.execute(pipe, raise_on_error=False)
                except BaseException as exc:
                    error = exc if isinstance(exc, Exception) else ConnectionError(str(exc))
                    for answer in _answers(calls, completions):
                        _tell(answer, error)
                    if not isinstance(exc, Exception):
                        raise  # cancelled: stop flushing; the callers were told
                    continue
                self.batches += 1
                replies = iter(results)
                for _, answer in calls:
                    _tell(answer, next(replies))
                for _, answers in groups.values():
                    codes = next(replies)
                    for i, answer in enumerate(answers):
                        _tell(answer, codes if isinstance(codes, Exception) else codes[i])  # type: ignore[index]
        finally:
            self.flusher = None
            # Only if cancelled with calls still waiting.
            for answer in _answers(self.calls, self.completions):
                _tell(answer, ConnectionError("the script batcher stopped"))
            self.calls, self.completions = [], []


def _answers(calls: list[tuple[ScriptCall[object], Answer]],
             completions: list[tuple[CompleteTarget, Completion, Answer]]) -> list[Answer]:
    return [call[-1] for call in calls] + [completion[-1] for completion in completions]


def _tell(answer: Answer, result: object) -> None:
    """Give ``answer`` its result; a failing answer is logged and does not stop the others."""
    try:
        answer(result)
    except Exception:  # noqa: BLE001 - one caller's bug must not cost the batch its answers
        log.exception("a script result's handler failed")


def _settle(future: asyncio.Future[Any], result: object) -> None:
    if not future.done():
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)
