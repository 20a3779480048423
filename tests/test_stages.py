"""Stage logic without sockets: validate, the duplicate rule, batching, storage, index."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from engine import digest, status
from engine.config import DuplicatePolicy
from engine.duplicates import Decision, Existing, decide
from engine.errors import StorageError
from engine.index import batch as batch_module
from engine.index import sqlite as sqlite_module
from engine.index.base import InstanceRow, QuarantineRow
from engine.index.postgresql import PostgresIndex
from engine.index.sqlite import SQLiteIndex
from engine.model import Origin, Outcome, Received, Rejection
from engine.stages import dedupe
from engine.stages.flow import STOP, Item, Stop, take_batch
from engine.stages.validate import validate
from engine.storage import area as area_module
from engine.storage.area import PendingFile, StorageArea
from tests.helpers import ct_dataset

ORIGIN = Origin("127.0.0.1", 4000, "SCANNER", "ENGINE")


def encode(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = syntax != ExplicitVRBigEndian
    buffer.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(buffer, ds)
    data = buffer.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data = packer.compress(data) + packer.flush()
    return data


def received(
    ds: Dataset, syntax: str = ExplicitVRLittleEndian, data: bytes | None = None
) -> Received:
    return Received(
        origin=ORIGIN,
        sop_class_uid=str(ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "1.2.3")),
        transfer_syntax=syntax,
        data=encode(ds, syntax) if data is None else data,
        received_at=time.time(),
        started=time.monotonic(),
    )


def sample() -> Dataset:
    return ct_dataset(generate_uid(), generate_uid(), 7, patient_name="Yamada^Tarou")


# -- validate -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "syntax",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ],
)
def test_validate_extracts_index_keys_in_every_uncompressed_syntax(syntax: str) -> None:
    ds = sample()
    item = received(ds, syntax)
    v = validate(item)
    assert v.attributes["sop_instance_uid"] == ds.SOPInstanceUID
    assert v.attributes["study_uid"] == ds.StudyInstanceUID
    assert v.attributes["series_uid"] == ds.SeriesInstanceUID
    assert v.attributes["patient_name"] == "Yamada^Tarou"
    assert v.attributes["instance_number"] == 7
    assert v.attributes["rows"] == 32
    assert v.attributes["modality"] == "CT"
    assert v.digest == digest.of(item.data)
    assert v.payload is item.data  # stored as received, no copy
    assert v.payload_syntax == syntax


def _outcome_of(item: Received) -> Outcome:
    with pytest.raises(Rejection) as caught:
        validate(item)
    return caught.value.outcome


def test_validate_rejects_what_a_store_cannot_use() -> None:
    ds = sample()
    assert _outcome_of(received(ds, data=b"")) is Outcome.CANNOT_UNDERSTAND
    assert _outcome_of(received(ds, data=b"\x08\x00\x16\x00UI\xff\x7f" + b"x" * 8)) is (
        Outcome.CANNOT_UNDERSTAND
    )
    assert _outcome_of(received(ds, syntax="1.2.3.4.5.6")) is Outcome.UNSUPPORTED_SYNTAX

    missing = sample()
    del missing.SeriesInstanceUID
    assert _outcome_of(received(missing)) is Outcome.MISSING_ATTRIBUTE

    malformed = sample()
    malformed.StudyInstanceUID = "1.2.abc.4"
    assert _outcome_of(received(malformed)) is Outcome.INVALID_UID

    other = received(sample())
    other.sop_instance_uid = generate_uid()
    assert _outcome_of(other) is Outcome.INSTANCE_MISMATCH

    wrong_class = received(sample())
    wrong_class.sop_class_uid = "1.2.840.10008.5.1.4.1.1.4"  # MR, dataset says CT
    assert _outcome_of(wrong_class) is Outcome.SOP_CLASS_MISMATCH


def test_every_outcome_has_a_named_status() -> None:
    for outcome in Outcome:
        code = status.for_outcome(outcome)
        assert (code == status.SUCCESS) == outcome.is_success
    assert status.for_outcome(Outcome.DUPLICATE_REJECTED) == status.DUPLICATE_SOP_INSTANCE
    assert status.for_outcome(Outcome.OUT_OF_RESOURCES) == status.OUT_OF_RESOURCES


# -- the duplicate rule -------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (DuplicatePolicy.KEEP, Decision.KEEP),
        (DuplicatePolicy.OVERWRITE, Decision.OVERWRITE),
        (DuplicatePolicy.REJECT, Decision.REJECT),
    ],
)
def test_decide(policy: DuplicatePolicy, expected: Decision) -> None:
    stored = Existing(digest="aa", path="p")
    assert decide(None, "aa", policy) is Decision.NEW
    assert decide(stored, "aa", policy) is Decision.SAME
    assert decide(stored, "bb", policy) is expected


# -- batching -----------------------------------------------------------------------


def test_take_batch_takes_what_is_queued_and_never_waits_to_fill() -> None:
    async def scenario() -> None:
        queue: asyncio.Queue[Item | Stop] = asyncio.Queue(10)
        loop = asyncio.get_running_loop()
        items = [Item(received(sample()), loop.create_future()) for _ in range(5)]
        await queue.put(items[0])
        # One item queued: the batch is that item, at once.
        assert await asyncio.wait_for(take_batch(queue, 64), 1.0) == ([items[0]], False)
        for item in items[1:]:
            await queue.put(item)
        await queue.put(STOP)
        assert await take_batch(queue, 3) == (items[1:4], False)  # capped
        assert await take_batch(queue, 3) == ([items[4]], True)  # Stop comes last

    asyncio.run(scenario())


# -- storage ------------------------------------------------------------------------


def test_write_batch_places_files_and_journals_them(tmp_path: Path) -> None:
    area = StorageArea(tmp_path / "st", tmp_path / "q", fsync=True)
    assert area.prepare(expect_existing=False) is False  # first start: no clean mark yet
    rel = area.instance_path("1.2.3", "1.2.3.4", "ab" * 32)
    good = PendingFile(rel, (b"head", b"body"), {"path": rel})
    bad = PendingFile("../outside/../../" + "x" * 300, (b"x",), {"path": "bad"})
    journal = area.write_batch([good, bad])
    assert journal is not None
    assert (area.root / rel).read_bytes() == b"headbody"
    assert good.error is None and bad.error is not None
    assert list(area.incoming.iterdir()) == []  # no temp file left, even for the failure
    area.release()  # the engine dies before the commit
    again = StorageArea(tmp_path / "st", tmp_path / "q", fsync=True)
    assert again.prepare(expect_existing=True) is False
    left = list(again.journals())
    assert [entries for _, entries in left] == [[{"path": rel}, {"path": "bad"}]]
    again.end_journal(left[0][0])
    assert list(again.journals()) == []
    assert list(again.journal_dir.iterdir()) == []
    # Batches written and committed in one run leave no journal after a clean stop.
    rel2 = again.instance_path("1.2.3", "1.2.3.5", "cd" * 32)
    batches = [again.write_batch([PendingFile(rel2, (b"x",), {"path": rel2})]) for _ in "ab"]
    for batch in batches:
        assert batch is not None
        again.end_journal(batch)
    again.mark_clean()
    assert list(again.journal_dir.iterdir()) == []
    again.release()
    area = again
    assert area.prepare(expect_existing=True) is True
    # One engine per storage folder.
    with pytest.raises(StorageError, match="another engine"):
        StorageArea(tmp_path / "st", tmp_path / "q", fsync=True).prepare(expect_existing=True)
    area.release()


def test_a_missing_storage_folder_is_refused_when_the_index_lists_files(tmp_path: Path) -> None:
    area = StorageArea(tmp_path / "nas" / "pacs", tmp_path / "q", fsync=True)
    with pytest.raises(StorageError, match="NAS mounted"):
        area.prepare(expect_existing=True)
    assert not (tmp_path / "nas").exists()  # no empty folder made in its place


def test_a_decoder_past_its_time_is_refused_and_the_pool_replaced() -> None:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    from engine.codecs import DecodeError, Decoder

    path = get_testdata_file("MR_small_jp2klossless.dcm", download=False)
    assert path is not None
    ds = dcmread(path)
    data = encode(ds, str(ds.file_meta.TransferSyntaxUID))

    async def scenario() -> None:
        slow = Decoder(workers=1, timeout=0.000001)
        try:
            with pytest.raises(DecodeError, match="did not finish"):
                await slow.process(data, ds.file_meta.TransferSyntaxUID, transcode=True)
        finally:
            slow.close()
        decoder = Decoder(workers=1, timeout=60)
        try:
            payload, syntax = await decoder.process(data, ds.file_meta.TransferSyntaxUID, True)
            assert syntax == ExplicitVRLittleEndian and len(payload) > len(data)
        finally:
            decoder.close()

    asyncio.run(scenario())


# -- index --------------------------------------------------------------------------


def _row(ds: Dataset, digest: str, path: str) -> InstanceRow:
    v = validate(received(ds))
    return InstanceRow(
        v.attributes, ExplicitVRLittleEndian, path, 100, digest, time.time(), "S", "E", "ip"
    )


def test_index_judges_duplicates_inside_one_batch(tmp_path: Path, index_url: str) -> None:
    """On each index backend (``index_url``: SQLite, PostgreSQL)."""

    async def scenario() -> None:
        index: SQLiteIndex | PostgresIndex = (
            PostgresIndex(index_url, durable=True)
            if index_url
            else SQLiteIndex(tmp_path / "i.sqlite", durable=True)
        )
        await index.open()
        try:
            a, b = sample(), sample()
            b.StudyInstanceUID = a.StudyInstanceUID
            rows = [
                _row(a, "d1", "p1"),
                _row(a, "d1", "p1"),
                _row(a, "d2", "p2"),
                _row(b, "d3", "p3"),
            ]

            def overwrite(existing: Existing | None, digest: str) -> Decision:
                return decide(existing, digest, DuplicatePolicy.OVERWRITE)

            q = QuarantineRow(
                None, "cannot understand", 0xC000, "bad", "", "", "", "S", "E", "ip", 0.0
            )
            report = await index.commit_batch(rows, [q], overwrite)
            assert report.decisions == [
                Decision.NEW,
                Decision.SAME,
                Decision.OVERWRITE,
                Decision.NEW,
            ]
            assert report.unreferenced == ["p1"]  # replaced within the batch
            assert await index.lookup([a.SOPInstanceUID]) == {
                a.SOPInstanceUID: Existing("d2", "p2")
            }
            assert await index.stats() == {
                "patients": 1,
                "studies": 1,
                "series": 2,
                "instances": 2,
                "bytes": 200,
                "quarantined": 1,
                "stable_studies": 0,
                "forward_pending": 0,
                "forward_failed": 0,
            }
            studies = await index.read("SELECT num_series, num_instances, modalities FROM studies")
            assert [tuple(row) for row in studies] == [(2, 2, "CT")]
        finally:
            await index.close()

    asyncio.run(scenario())


def test_journal_logs_rotate_and_go_once_their_batches_are_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(area_module, "JOURNAL_ROTATE_BYTES", 1)  # a new log per batch
    area = StorageArea(tmp_path / "st", tmp_path / "q", fsync=True)
    area.prepare(expect_existing=False)

    def pending() -> list[PendingFile]:
        rel = area.instance_path("1.2.3", generate_uid(), "ab" * 32)
        return [PendingFile(rel, (b"x",), {"path": rel})]

    def logs() -> list[str]:
        return sorted(p.name for p in area.journal_dir.iterdir())

    first = area.write_batch(pending())
    second = area.write_batch(pending())
    assert first is not None and second is not None
    assert len(logs()) == 2  # the first log still has an open batch
    area.end_journal(first)
    assert len(logs()) == 1  # ... and goes with it
    third = area.write_batch(pending())  # rotates: the second log's batch is still open
    assert third is not None and len(logs()) == 2
    area.end_journal(third)
    area.release()  # a crash: the second batch was never committed
    again = StorageArea(tmp_path / "st", tmp_path / "q", fsync=True)
    left = list(again.journals())
    assert [len(files) for _, files in left] == [1]
    again.end_journal(left[0][0])
    again.clear_settled_journals()
    assert logs() == []


def test_sqlite_commits_batches_on_the_loop_and_checkpoints_on_its_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync off: each batch commits on the loop's own thread (no hand-off), and the WAL
    is checkpointed on the writer's thread every CHECKPOINT_EVERY batches."""
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_EVERY", 3)
    threads: list[int] = []
    checkpoints: list[int] = []
    commit = batch_module.commit
    checkpoint = SQLiteIndex._checkpoint_wal

    def recording_commit(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return commit(*args, **kwargs)

    def recording_checkpoint(index: SQLiteIndex) -> None:
        checkpoints.append(threading.get_ident())
        checkpoint(index)

    monkeypatch.setattr(batch_module, "commit", recording_commit)
    monkeypatch.setattr(SQLiteIndex, "_checkpoint_wal", recording_checkpoint)

    async def scenario() -> int:
        index = SQLiteIndex(tmp_path / "i.sqlite", durable=False)
        await index.open()
        try:
            assert index.inline
            for n in range(7):
                ds = sample()
                await index.commit_batch([_row(ds, f"d{n}", f"p{n}")], [], new_only)
                await asyncio.sleep(0.01)  # a checkpoint scheduled meanwhile runs
            assert (await index.stats())["instances"] == 7
        finally:
            await index.close()
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert threads == [loop_thread] * 7
    assert len(checkpoints) == 2 and loop_thread not in checkpoints


def test_sqlite_commit_never_waits_on_the_loop_for_another_programs_lock(tmp_path: Path) -> None:
    """Another connection holds the write lock: the batch goes to the writer's thread,
    which waits for it, while the loop keeps running; then it commits."""
    path = tmp_path / "i.sqlite"

    async def scenario() -> int:
        index = SQLiteIndex(path, durable=False)
        await index.open()
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            ticker = asyncio.ensure_future(tick())
            commit = asyncio.ensure_future(
                index.commit_batch([_row(sample(), "d", "p")], [], new_only)
            )
            await asyncio.sleep(0.5)
            assert not commit.done()  # waiting for the lock, on its thread
            other.execute("ROLLBACK")
            report = await asyncio.wait_for(commit, 30)
            ticker.cancel()
            assert report.decisions == [Decision.NEW]
            assert (await index.stats())["instances"] == 1
            return ticks
        finally:
            other.close()
            await index.close()

    assert asyncio.run(scenario()) >= 20  # the loop ran all along (50 ticks at most)


def new_only(existing: Existing | None, digest: str) -> Decision:
    return decide(existing, digest, DuplicatePolicy.KEEP)


def test_dedupe_leaves_uids_being_flushed_to_the_index_stage() -> None:
    """A UID whose row is committed but whose batch is still flushing is not answered
    "already stored" by the fast path: the index stage judges it after its own flush."""
    ds = sample()
    uid = str(ds.SOPInstanceUID)

    class Stored:
        async def lookup(self, uids: list[str]) -> dict[str, Existing]:
            raise AssertionError("lookup_now answers")

        def lookup_now(self, uids: list[str]) -> dict[str, Existing] | None:
            return {u: Existing("d", "p") for u in uids}

    async def scenario(committing: set[str]) -> bool:
        loop = asyncio.get_running_loop()
        item = Item(received(ds), loop.create_future())
        item.validated = validate(item.received)
        item.validated.digest = "d"
        await dedupe.process([item], Stored(), DuplicatePolicy.KEEP, committing)
        return item.done

    assert asyncio.run(scenario(set())) is True  # same bytes, stored: answered at once
    assert asyncio.run(scenario({uid})) is False  # being flushed: on to the index stage
