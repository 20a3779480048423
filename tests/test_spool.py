"""Datasets written to disk while they arrive (the native transport's spool).

- ``Spooler`` on its own: the temp file is the Part 10 header plus the fragments, the
  digest is that of the dataset bytes, the header is parsed early, a discarded spool
  leaves no file, and a write error reaches the future.
- Through the engine: a dataset whose header is longer than the bytes kept in memory is
  stored byte for byte (the header is read back from the file); a 96 MB dataset with
  ``receive_buffer`` at 1 MB leaves the engine's peak memory far below the dataset's
  size; both ``sync_method`` values store and survive a restart.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from engine import digest, status
from engine.model import Rejection
from engine.stages import validate
from engine.storage import part10
from engine.storage.spool import HEAD_BYTES, Spooled, Spooler
from tests.helpers import TRANSPORT, Engine, ct_dataset, send_datasets

NATIVE = TRANSPORT in ("", "native")


def encoded(ds: object) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, ds)  # type: ignore[arg-type]
    return buffer.getvalue()


def spool_once(
    incoming: Path,
    data: bytes,
    cut: int,
    *,
    discard: bool = False,
    last: int = 0,
    threads: int = 2,
) -> tuple[Spooled | None, list[Path]]:
    """Feed ``data`` to a spool in pieces of ``cut`` bytes; the Spooled (or None) and the
    files left in ``incoming`` once the spooler is closed. ``threads`` 0: the loop writes."""

    async def scenario() -> Spooled | None:
        spooler = Spooler(incoming, fsync=True, threads=threads, inspect=validate.inspect_head)
        try:
            spool = spooler.open(CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian, "SCU")
            view = memoryview(data)
            pieces = [view[start : start + cut] for start in range(0, len(data), cut)]
            # The last ``last`` pieces go with ``finish``, as the association hands them.
            for piece in pieces[: len(pieces) - last]:
                spool.add([piece])
            if discard:
                spool.discard()
                return None
            return await spool.finish(pieces[len(pieces) - last :])
        finally:
            await asyncio.to_thread(spooler.close)

    result = asyncio.run(scenario())
    return result, sorted(incoming.iterdir())


@pytest.mark.parametrize("threads", [0, 2])
@pytest.mark.parametrize(
    ("cut", "last"), [(1, 0), (4096, 0), (16 * 1024 + 7, 3), (10**9, 0), (10**9, 1), (4096, 50)]
)
def test_spool_writes_header_and_fragments_and_parses_the_head(
    tmp_path: Path, cut: int, last: int, threads: int
) -> None:
    ds = ct_dataset(generate_uid(), generate_uid(), 1, size=256)  # 128 KB of pixels
    ds.SOPInstanceUID = "1.2.3.4"
    data = encoded(ds)
    assert len(data) > HEAD_BYTES
    spooled, left = spool_once(tmp_path, data, cut, last=last, threads=threads)
    assert spooled is not None
    head = part10.header(CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian, "SCU")
    assert left == [spooled.temp]
    assert spooled.temp.read_bytes() == head + data
    assert spooled.header_length == len(head)
    assert spooled.size == len(data)
    assert spooled.digest == digest.of(data)
    early = spooled.early
    assert isinstance(early, validate.Header)
    assert early.attributes is not None and early.attributes["patient_id"] == "PAT001"
    early.check_size(len(data))  # complete: no complaint
    with pytest.raises(Rejection, match="truncated"):
        early.check_size(len(data) - 1)
    assert dcmread(spooled.temp).PixelData == ds.PixelData


def test_a_small_dataset_is_parsed_whole_and_a_bad_one_judged_at_once(tmp_path: Path) -> None:
    ds = ct_dataset(generate_uid(), generate_uid(), 1)
    data = encoded(ds)
    assert len(data) < HEAD_BYTES
    (tmp_path / "a").mkdir()
    spooled, _ = spool_once(tmp_path / "a", data, 1000)
    assert spooled is not None and isinstance(spooled.early, validate.Header)
    (tmp_path / "b").mkdir()
    cut_short = data[:-10]  # pixel data declares more than follows
    spooled, _ = spool_once(tmp_path / "b", cut_short, 1000)
    assert spooled is not None and isinstance(spooled.early, Rejection)


@pytest.mark.parametrize("threads", [0, 2])
def test_a_discarded_spool_leaves_no_file(tmp_path: Path, threads: int) -> None:
    data = encoded(ct_dataset(generate_uid(), generate_uid(), 1, size=256))
    spooled, left = spool_once(
        tmp_path, data[: len(data) // 2], 4096, discard=True, threads=threads
    )
    assert spooled is None
    assert left == []  # the spare files made ahead are removed at close too


@pytest.mark.parametrize("threads", [0, 2])
def test_a_write_error_reaches_the_future(tmp_path: Path, threads: int) -> None:
    incoming = tmp_path / "incoming"  # does not exist: no temp file can be created

    async def scenario() -> None:
        spooler = Spooler(incoming, fsync=True, threads=threads)
        try:
            spool = spooler.open(CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian, "SCU")
            spool.add([memoryview(b"\x08\x00" * 100)])
            with pytest.raises(FileNotFoundError):
                await spool.finish()
        finally:
            await asyncio.to_thread(spooler.close)

    asyncio.run(scenario())


# -- through the engine ---------------------------------------------------------------


def test_a_header_longer_than_the_kept_head_is_read_back_from_the_file(tmp_path: Path) -> None:
    ds = ct_dataset(generate_uid(), generate_uid(), 1)
    # A private block of 200 KB before the pixel data: the header outgrows HEAD_BYTES.
    block = ds.private_block(0x0011, "ENGINE TEST", create=True)
    block.add_new(0x01, "OB", os.urandom(200 * 1024))
    engine = Engine(tmp_path).start()
    try:
        assert send_datasets(engine, [ds]) == [(ds.SOPInstanceUID, status.SUCCESS)]
        (stored,) = engine.stored_files()
        assert dcmread(stored) == ds
        assert engine.stats()["instances"] == 1
    finally:
        engine.stop()


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not NATIVE, reason="the spool is the native transport's")
@pytest.mark.parametrize("threads", [0, 1])
def test_a_large_dataset_does_not_sit_in_memory(tmp_path: Path, threads: int) -> None:
    """96 MB of pixel data through an engine whose receive_buffer is 1 MB: the engine's
    peak resident memory grows by much less than the dataset (the pynetdicom transport
    holds all of it), whether the loop writes it (0) or a thread does and the reading
    pauses when it lags (1)."""
    size = 96 * 1024 * 1024
    ds = ct_dataset(generate_uid(), generate_uid(), 1)
    side = int((size // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.PixelData = np.random.default_rng(1).integers(0, 4000, side * side, dtype=np.int16).tobytes()
    engine = Engine(
        tmp_path,
        {"dicom": {"receive_buffer": 1024 * 1024}, "storage": {"write_threads": threads}},
    ).start()
    try:
        assert engine.process is not None
        assert send_datasets(engine, [ct_dataset(generate_uid(), generate_uid(), 1)])[0][1] == 0
        before = vm_hwm_kb(engine.process.pid)
        assert send_datasets(engine, [ds]) == [(ds.SOPInstanceUID, status.SUCCESS)]
        grown_mb = (vm_hwm_kb(engine.process.pid) - before) / 1024
        assert grown_mb < 32, f"peak memory grew by {grown_mb:.0f} MB for a 96 MB dataset"
        stored = [p for p in engine.stored_files() if p.stat().st_size > len(ds.PixelData)]
        assert len(stored) == 1
        assert dcmread(stored[0]).PixelData == ds.PixelData
    finally:
        engine.stop()


# sync_method "fsync" with write_threads 0 runs with one thread all the same (its
# per-file syncs wait for the disk); the engine's log shows the setting as written.
@pytest.mark.parametrize(
    ("method", "threads"), [("syncfs", 0), ("syncfs", 1), ("fsync", 0), ("fsync", 2)]
)
def test_both_sync_methods_store_and_survive_a_restart(
    tmp_path: Path, method: str, threads: int
) -> None:
    """Also with the writes on the loop (write_threads 0) or on threads (a NAS)."""
    study = generate_uid()
    datasets = [ct_dataset(study, generate_uid(), n) for n in range(1, 6)]
    engine = Engine(
        tmp_path, {"storage": {"sync_method": method, "write_threads": threads}}
    ).start()
    try:
        results = send_datasets(engine, datasets)
        assert results == [(str(ds.SOPInstanceUID), status.SUCCESS) for ds in datasets]
        assert f'"sync_method":"{method}"' in engine.log()
    finally:
        assert engine.stop() == 0
    assert list((engine.storage / ".journal").iterdir()) == []  # clean stop: no journal
    assert list((engine.storage / ".incoming").iterdir()) == []  # nor temp files
    engine.start()
    try:
        assert engine.stats()["instances"] == len(datasets)
        assert "last stop was not clean" not in engine.log()
    finally:
        engine.stop()
