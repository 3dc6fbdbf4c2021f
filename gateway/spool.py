"""A running batch's outcomes so far, appended to a local file until the batch is final.

The gateway acks a result on the batch reply stream only after its line (or, for a job the
policy refused, the attempt its line is submitted again as) is appended here,
so a gateway that stops (or is killed) mid-batch loses nothing: it reads the spool back on
start, and the results it had not acked come again from its consumer group. A line that
comes twice (a result read again after a crash, before its ack) is kept once, the first.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import BinaryIO

import msgspec

from broker.wire import DECODE_ERRORS
from gateway.batchfile import OutputLine

log = logging.getLogger("inference_broker.gateway")


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """Line ``index`` of the input ended with ``line``; ``ok``: it goes to the output file, else the
    error file. Without a line: the line's job was refused, and it is submitted again as ``attempt``."""

    index: int
    ok: bool
    line: OutputLine | None
    attempt: int = 0


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Entry).decode


class Spool:
    """The outcome file of one batch, ``<spool_dir>/<batch id>.jsonl``."""

    def __init__(self, folder: Path, batch_id: str) -> None:
        self.path = folder / f"{batch_id}.jsonl"
        self._file: BinaryIO | None = None

    def read(self) -> tuple[dict[int, Entry], dict[int, int]]:
        """The outcomes written so far, the first of each index; and the attempt each refused line is at."""
        entries: dict[int, Entry] = {}
        attempts: dict[int, int] = {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return entries, attempts
        for raw in data.splitlines():
            try:
                entry = _decode(raw)
            except DECODE_ERRORS:
                # Only a crash mid-write leaves a torn line, and only the last: its result was not acked.
                log.warning("skipping a torn line of %s", self.path)
                continue
            if entry.line is None:
                attempts[entry.index] = max(entry.attempt, attempts.get(entry.index, 0))
            else:
                entries.setdefault(entry.index, entry)
        return entries, attempts

    def append(self, entry: Entry) -> None:
        """Add an entry: one unbuffered write, in the OS' hands before the result is acked."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open while the batch runs
            if self._file.tell() and not _ends_line(self.path):
                self._file.write(b"\n")  # end a torn last line, or the next entry would be read as part of it
        self._file.write(_encode(entry) + b"\n")

    def remove(self) -> None:
        """Close and delete the spool (the batch's files are written)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _ends_line(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, 2)
        return file.read(1) == b"\n"
