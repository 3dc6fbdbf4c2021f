"""The Batch API's local parts, on a real directory: the file store and the outcome spool."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.batchfile import LineError, OutputLine
from gateway.files import FileTooLarge, LocalFileStore
from gateway.spool import Entry, Spool


def store(root: Path, per_file: int = 1000, per_tenant: int = 1500) -> LocalFileStore:
    return LocalFileStore(root, max_file_bytes=per_file, max_tenant_bytes=per_tenant)


async def test_a_tenants_files_are_its_own(tmp_path: Path) -> None:
    files = store(tmp_path)
    mine = await files.put("acme", "in.jsonl", "batch", b"acme's\n")
    assert (await files.get("acme", mine.id), (await files.stat("acme", mine.id))) == (b"acme's\n", mine)
    for look in (files.get, files.stat):
        assert await look("beta", mine.id) is None
    assert not await files.delete("beta", mine.id) and await files.get("acme", mine.id) == b"acme's\n"
    assert await files.list("beta") == [] and await files.list("acme") == [mine]
    # No tenant name becomes a path: one that looks like a path stays inside the root.
    odd = await files.put("../../etc", "x", "batch", b"x")
    assert await files.get("../../etc", odd.id) == b"x"
    assert all(tmp_path in p.parents for p in tmp_path.rglob("*"))
    assert await files.delete("acme", mine.id) and await files.get("acme", mine.id) is None


async def test_file_ids_that_are_not_ids_read_as_missing(tmp_path: Path) -> None:
    files = store(tmp_path)
    made = await files.put("acme", "in.jsonl", "batch", b"x")
    (tmp_path / "secret").write_text("not yours")
    for wrong in ("../secret", "../../secret", made.id + ".json", "file-" + "0" * 31, made.id.upper(), ""):
        assert await files.get("acme", wrong) is None and await files.stat("acme", wrong) is None
        assert not await files.delete("acme", wrong)


async def test_uploads_stay_within_the_limits_and_results_are_always_written(tmp_path: Path) -> None:
    files = store(tmp_path)
    with pytest.raises(FileTooLarge, match="limit is 1000 bytes per file"):
        await files.put("acme", "big", "batch", b"x" * 1001)
    await files.put("acme", "a", "batch", b"x" * 1000)
    with pytest.raises(FileTooLarge, match="delete files"):
        await files.put("acme", "b", "batch", b"x" * 600)
    await files.put("beta", "b", "batch", b"x" * 600)  # per tenant
    output = await files.put("acme", "out", "batch_output", b"y" * 2000)  # a batch's results: never refused
    assert output.bytes == 2000 and output.purpose == "batch_output"


async def test_a_damaged_record_hides_its_file_without_breaking_the_list(tmp_path: Path) -> None:
    files = store(tmp_path)
    kept = await files.put("acme", "a", "batch", b"a")
    broken = await files.put("acme", "b", "batch", b"b")
    next(tmp_path.rglob(f"{broken.id}.json")).write_text("{not json")
    assert await files.list("acme") == [kept] and await files.stat("acme", broken.id) is None


def entry(index: int, code: str = "batch_cancelled") -> Entry:
    line = OutputLine(id=f"batch_req_x.{index}", custom_id=f"c{index}", response=None,
                      error=LineError(code=code, message="m"))  # type: ignore[arg-type]
    return Entry(index, False, line)


def test_the_spool_keeps_the_first_outcome_of_a_line_and_survives_a_torn_last_line(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "batch_x")
    spool.append(entry(0))
    spool.append(entry(1))
    spool.append(entry(0, "batch_expired"))  # read again after a crash before its ack: the first stays
    spool.close()
    with open(spool.path, "ab") as file:
        file.write(b'[2,false,{"id":"batch_req_x.2"')  # a crash mid-write
    again = Spool(tmp_path, "batch_x")
    outcomes, _ = again.read()
    assert sorted(outcomes) == [0, 1] and outcomes[0] == entry(0)
    again.append(entry(2))  # after a restart: not glued to the torn line
    again.append(Entry(3, False, None, 1))  # line 3's job was refused: it runs again as attempt 1, then 2
    again.append(Entry(3, False, None, 2))
    outcomes, attempts = again.read()
    assert sorted(outcomes) == [0, 1, 2] and attempts == {3: 2}
    again.remove()
    assert not spool.path.exists() and Spool(tmp_path, "batch_x").read() == ({}, {})
