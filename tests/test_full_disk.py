"""A full disk: 0xA700, nothing half-written, and storing resumes by itself.

The engine runs in a mount namespace of its own (``unshare --mount``, root only) with
a small tmpfs as its storage folder: the NAS or disk that fills up. The test reaches
that filesystem through ``/proc/PID/root`` (the engine's view of the file tree) to
fill it with a filler file, list it and free it again, and runs ``engine stats`` in
the same namespace (``nsenter``).

Two layouts: the index elsewhere (the realistic case: only the archive is full) and
the index on the full filesystem too. In both, a C-STORE that runs out of space is
answered 0xA700 (out of resources) with the reason, logged, and leaves no file, no
temp file and no index row; the same association and the others keep working; once
the filler is deleted the same association stores again, without a restart.

On the native transport a dataset is written to a temp file in the storage folder
while it arrives (``storage/spool.py``), so the space runs out there, in the middle
of the dataset; on the pynetdicom transport, in the write stage.

The one case that leaves something: the index on the full disk, out of room after the
file is in place (``test_index_out_of_room_after_the_file_is_in_place``). And without
root: a journal line cut short by a full disk does not damage the lines after it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from engine import status
from engine.storage import area
from engine.storage.area import PendingFile, StorageArea
from tests.helpers import REPO, TRANSPORT, Engine, ct_dataset

WAIT = 30.0
DISK_SIZE = 4 * 1024 * 1024  # the small filesystem
FILL_CHUNK = 64 * 1024
LEFT_FREE = 256 * 1024  # room left for the dataset that runs out of space half-way
BIG_SIDE = 724  # rows and columns of that dataset: 1 MB of pixels
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


def unavailable(probe_folder: Path) -> str | None:
    """Why a small filesystem cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to mount a small tmpfs (unshare --mount)"
    missing = [tool for tool in ("unshare", "nsenter") if shutil.which(tool) is None]
    if missing:
        return f"needs {' and '.join(missing)} (util-linux) for a small filesystem"
    probe_folder.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(
        ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"',
         str(probe_folder)],
        capture_output=True, text=True, timeout=WAIT, check=False,
    )  # fmt: skip
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()}"
    return None


@dataclass
class SmallDisk:
    """An engine whose storage folder (and maybe index) is on a small tmpfs of its own."""

    engine: Engine
    mount_point: Path
    storage: Path
    index_on_it: bool

    def inside(self, path: Path) -> Path:
        """``path`` as the engine sees it (in its mount namespace)."""
        assert self.engine.process is not None
        return Path(f"/proc/{self.engine.process.pid}/root{path}")

    @property
    def filler(self) -> Path:
        return self.inside(self.mount_point / "filler")

    def free(self) -> int:
        fs = os.statvfs(self.inside(self.mount_point))
        return fs.f_bavail * fs.f_frsize

    def fill(self, path: Path, leave: int = 0) -> None:
        """Write zeros to ``path`` until the filesystem is full; give ``leave`` bytes back."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        written = 0
        try:
            for _ in range(DISK_SIZE // FILL_CHUNK + 2):
                try:
                    written += os.write(fd, bytes(FILL_CHUNK))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
            else:
                raise AssertionError(f"{DISK_SIZE} bytes written and the disk is not full")
            if leave:
                os.ftruncate(fd, written - leave)
        finally:
            os.close(fd)

    def files(self) -> dict[str, int]:
        """Every file on the small disk with its size, but the fillers, the journal logs
        (append-only, their lines are the engine's business) and the temp files (the
        spool keeps a few empty ones ready: see ``temp_bytes``)."""
        root = self.inside(self.mount_point)
        return {
            str(p.relative_to(root)): p.stat().st_size
            for p in root.rglob("*")
            if p.is_file() and not p.name.startswith("filler")
            and not {".journal", ".incoming"} & set(p.parts)
        }  # fmt: skip

    def instance_files(self) -> list[str]:
        storage = self.inside(self.storage)
        return sorted(
            str(p.relative_to(storage))
            for p in storage.rglob("*.dcm")
            if not any(part.startswith(".") for part in p.relative_to(storage).parts)
        )

    def temp_bytes(self) -> int:
        """Bytes in the storage folder's temp files (the spool keeps a few empty ones)."""
        return sum(p.stat().st_size for p in self.inside(self.storage / ".incoming").iterdir())

    def stats(self) -> dict[str, int]:
        """``engine stats``, run in the engine's mount namespace."""
        assert self.engine.process is not None
        out = subprocess.run(
            ["nsenter", "-t", str(self.engine.process.pid), "-m", "--",
             sys.executable, "-m", "engine", "stats", "--config", str(self.engine.config_path)],
            cwd=REPO, capture_output=True, check=True, timeout=WAIT,
        )  # fmt: skip
        result: dict[str, int] = orjson.loads(out.stdout)
        return result


@contextmanager
def engine_on_small_disk(tmp_path: Path, index_on_it: bool) -> Iterator[SmallDisk]:
    reason = unavailable(tmp_path / "probe")
    if reason is not None:
        pytest.skip(reason)
    folder = tmp_path / "engine"
    if index_on_it:
        mount_point = folder / "disk"
        overrides = {"storage": {"path": "disk/storage"}, "index": {"path": "disk/index.sqlite"}}
    else:
        mount_point = folder / "storage"
        overrides = {}
    launcher = (
        "unshare", "--mount", "sh", "-c",
        f'mount -t tmpfs -o size={DISK_SIZE} tmpfs "$0" && exec "$@"', str(mount_point),
    )  # fmt: skip
    engine = Engine(folder, overrides, launcher=launcher)
    mount_point.mkdir(parents=True)
    storage = mount_point / "storage" if index_on_it else mount_point
    disk = SmallDisk(engine.start(), mount_point, storage, index_on_it)
    try:
        assert disk.free() > DISK_SIZE // 2, "the engine is not on the small disk"
        yield disk
    finally:
        if engine.process is not None:
            assert engine.stop() == 0, engine.log()


@pytest.fixture(params=["index elsewhere", "index on the full disk"])
def small_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SmallDisk]:
    with engine_on_small_disk(tmp_path, request.param == "index on the full disk") as disk:
        yield disk


class Scanner:
    """One pynetdicom association, as a scanner keeps it for a whole series."""

    def __init__(self, port: int, calling_ae: str) -> None:
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        ae.add_requested_context(Verification)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="ENGINE")
        assert self.assoc.is_established

    def store(self, ds: Dataset) -> tuple[int, str]:
        """The C-STORE's status and Error Comment."""
        rsp = self.assoc.send_c_store(ds)
        return int(rsp.Status), str(rsp.get("ErrorComment", ""))

    def echo(self) -> int:
        return int(self.assoc.send_c_echo().Status)

    def release(self) -> None:
        self.assoc.release()


def test_full_disk_answers_out_of_resources_and_storing_resumes_by_itself(
    small_disk: SmallDisk,
) -> None:
    disk, engine = small_disk, small_disk.engine
    study, series = generate_uid(), generate_uid()
    first = ct_dataset(study, series, 1)
    small = ct_dataset(study, series, 2)
    big = ct_dataset(study, series, 3, size=BIG_SIDE)
    scanner = Scanner(engine.port, "SCANNER")
    other = Scanner(engine.port, "OTHER")
    assert scanner.store(first) == (status.SUCCESS, "")
    stored = disk.instance_files()
    assert len(stored) == 1

    # 1. Almost full: the big dataset runs out of space half-way through its file.
    disk.fill(disk.filler, leave=LEFT_FREE)
    before = disk.files()
    code, comment = scanner.store(big)
    assert (code, comment) == (status.OUT_OF_RESOURCES, f"cannot write the file: {NO_SPACE}")
    assert disk.files() == before, "a partial file was left behind"
    assert disk.temp_bytes() == 0
    assert disk.free() >= LEFT_FREE

    # 2. Full: the small one has no room for its first byte.
    disk.fill(disk.inside(disk.mount_point / "filler-rest"))
    assert disk.free() == 0
    assert scanner.store(small) == (status.OUT_OF_RESOURCES, f"cannot write the file: {NO_SPACE}")
    assert disk.files() == before
    # The same association and the others keep working.
    assert scanner.echo() == status.SUCCESS
    assert other.echo() == status.SUCCESS
    stats = disk.stats()
    assert (stats["instances"], stats["quarantined"]) == (1, 0)
    assert disk.instance_files() == stored
    errors = re.findall(r"ERROR .*cannot write .*No space left on device.*", engine.log())
    assert len(errors) == 2, engine.log()

    # 3. Space again: the same association stores both, no restart.
    disk.filler.unlink()
    disk.inside(disk.mount_point / "filler-rest").unlink()
    assert scanner.store(small) == (status.SUCCESS, "")
    assert scanner.store(big) == (status.SUCCESS, "")
    assert other.echo() == status.SUCCESS
    scanner.release()
    other.release()
    assert disk.stats()["instances"] == 3
    files = disk.instance_files()
    assert len(files) == 3
    for sent in (first, small, big):
        (name,) = [f for f in files if f"/{sent.SOPInstanceUID}." in f]
        kept = dcmread(disk.inside(disk.storage / name))
        assert kept.PixelData == sent.PixelData
    assert disk.temp_bytes() == 0
    where = "on it" if disk.index_on_it else "elsewhere"
    print(f"full disk ({TRANSPORT or 'native'}, index {where}): {errors[0].split(' ', 2)[-1]}")


INDEX_ROOM = 12 * 1024  # room for the file and its journal line, not for the index rows


def test_index_out_of_room_after_the_file_is_in_place(tmp_path: Path) -> None:
    """With the index on the full disk too, the file can fit and the index rows not.

    The scanner gets 0xA700 and no row is committed; the complete file stays in place,
    unindexed, with its journal entry (nothing in the pipeline may remove a file another
    item could be committing, and the index is the judge): when the scanner sends the
    instance again it is indexed with that same file, and a restart would settle it
    from the journal. Nothing half-written is left.
    """
    with engine_on_small_disk(tmp_path, index_on_it=True) as disk:
        engine = disk.engine
        study, series = generate_uid(), generate_uid()
        first, second = ct_dataset(study, series, 1), ct_dataset(study, series, 2)
        scanner = Scanner(engine.port, "SCANNER")
        assert scanner.store(first) == (status.SUCCESS, "")
        # An empty write-ahead log: the next commit needs new room for every page.
        with sqlite3.connect(disk.inside(disk.mount_point / "index.sqlite")) as db:
            busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
        disk.fill(disk.filler, leave=INDEX_ROOM)
        code, comment = scanner.store(second)
        assert code == status.OUT_OF_RESOURCES
        assert comment == "the index could not commit: database or disk is full"
        assert disk.stats()["instances"] == 1
        assert len(disk.instance_files()) == 2  # the complete file, not indexed
        assert disk.temp_bytes() == 0
        assert "rollback failed" not in engine.log()
        assert scanner.echo() == status.SUCCESS
        disk.filler.unlink()
        assert scanner.store(second) == (status.SUCCESS, "")
        scanner.release()
        assert disk.stats()["instances"] == 2
        files = disk.instance_files()
        assert len(files) == 2
        (name,) = [f for f in files if f"/{second.SOPInstanceUID}." in f]
        assert dcmread(disk.inside(disk.storage / name)).PixelData == second.PixelData


# -- the journal when the disk fills up in the middle of a line ------------------------


class DiskFillsUp:
    """``os`` as ``engine.storage.area`` sees it, but ``write`` finds the disk full after
    ``room`` more bytes (the first write that crosses it is cut short, as on a real disk)."""

    def __init__(self, room: int) -> None:
        self.room = room

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, NO_SPACE)
        written = os.write(fd, bytes(data)[: self.room])
        self.room -= written
        return written


def pending(name: str) -> PendingFile:
    return PendingFile(f"ab/cd/study/{name}.dcm", (b"DICM" + name.encode(),), {"path": name})


def test_a_journal_line_cut_short_by_a_full_disk_leaves_the_journal_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    storage = StorageArea(tmp_path / "storage", tmp_path / "quarantine", fsync=False)
    storage.prepare(expect_existing=False)
    first = storage.write_batch([pending("first")])
    assert first is not None
    full = DiskFillsUp(room=10)
    monkeypatch.setattr(area, "os", full)
    cut = pending("cut")
    assert storage.write_batch([cut]) is None  # its journal line did not fit
    assert cut.error is not None and area.is_out_of_space(cut.error)
    assert not (storage.root / cut.rel_path).exists()
    full.room = 1 << 20  # space again
    last = storage.write_batch([pending("last")])
    assert last is not None
    full.room = 0
    storage.end_journal(first)  # its "done" line does not fit either: no harm
    assert "cannot mark batch" in caplog.text
    (log_path,) = (tmp_path / "storage" / ".journal").iterdir()
    batches = area._read_log(log_path)  # what a recovery would replay
    assert [entry["path"] for files in batches.values() for entry in files] == ["first", "last"]
    assert "ignoring line" not in caplog.text
