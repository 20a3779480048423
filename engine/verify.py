"""``python -m engine verify``: the storage folder checked against the index.

- Every indexed file is read through and compared with its row: **missing** (no file
  at its path), **changed** (another size, file meta information that names another
  instance or transfer syntax, or a dataset whose digest is not the recorded one).
- Every file of the storage folder (but the engine's own, ``engine/storage/files.py``)
  that no row names is **unindexed**.

It only reads, takes no lock and works while the engine runs and receives. What the
engine does meanwhile is not taken for damage: a file found missing or changed is
reported only if its row still names it when checked again; a file without a row only
if it still has none after the walk and no open journal batch names it (the engine
renames a batch's files into place, journaled, just before their rows commit).

An image stored transcoded (``[ingest] transcode``) is recorded with the digest of what
was received, not of its file: its size is checked, not its content (``size_only``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import enum
import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian

from engine.backup.manifest import uri
from engine.config import Config, Transcode
from engine.errors import IndexDatabaseError, StorageError
from engine.index.sqlite import BUSY_TIMEOUT_MS, COMPANIONS, companion
from engine.progress import Progress
from engine.reindex import NEW_SUFFIX, OLD_SUFFIX, READERS
from engine.storage import files
from engine.storage.area import StorageArea

log = logging.getLogger(__name__)

# Index rows read (and files checked) at a time, each page its own short read.
PAGE = 512
# Files of the storage folder looked up in the index at a time.
LOOKUP = 500
# Reads of the journal folder, which the running engine changes as it goes.
JOURNAL_ATTEMPTS = 3
_ROW = "rowid, sop_instance_uid, path, size, digest, transfer_syntax"


class Finding(enum.Enum):
    OK = "ok"
    MISSING = "missing"
    CHANGED = "changed"
    SIZE_ONLY = "size only"  # transcoded: the recorded digest is of what was received


@dataclass(frozen=True, slots=True)
class IndexedFile:
    """An instance row: the file it names and what that file should be."""

    uid: str
    path: str
    size: int
    digest: str
    transfer_syntax: str


@dataclass(slots=True)
class Verified:
    """What a verification found."""

    storage: Path
    index: Path
    instances: int = 0
    nbytes: int = 0
    files: int = 0  # in the storage folder
    size_only: int = 0
    index_check: str = "ok"
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unindexed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def problems(self) -> list[str]:
        lines = [] if self.index_check == "ok" else [f"{self.index}: {self.index_check}"]
        lines += [f"missing: {line}" for line in self.missing]
        lines += [f"changed: {line}" for line in self.changed]
        lines += [f"unindexed: {line}" for line in self.unindexed]
        return lines

    def summary(self) -> dict[str, Any]:
        return {
            "storage": str(self.storage),
            "index": str(self.index),
            "ok": not self.problems,
            "seconds": round(self.seconds, 2),
            "instances": self.instances,
            "bytes": self.nbytes,
            "files": self.files,
            "index_check": self.index_check,
            "missing": len(self.missing),
            "changed": len(self.changed),
            "unindexed": len(self.unindexed),
            "size_only": self.size_only,
            "problems": self.problems,
        }


def verify(config: Config, progress: Progress | None = None) -> Verified:
    """Check the storage folder of ``config`` against its index.

    Raises ``IndexDatabaseError`` (no index, or one that cannot be read) or
    ``StorageError`` (no storage folder); what is wrong with files is in the result.
    """
    started = time.monotonic()
    index, root = config.index.path, config.storage.path
    if not index.exists():
        raise IndexDatabaseError(f"no index at {index}")
    if not root.is_dir():
        raise StorageError(f"the storage folder {root} does not exist; is the disk or NAS mounted?")
    report = Verified(root, index)
    with _reader(index) as db:
        report.index_check = _check_index(db)
        transcodes = config.ingest.transcode is not Transcode.NONE
        _check_rows(db, root, transcodes, report, progress)
        skip = [config.storage.quarantine]
        for database in (index, companion(index, NEW_SUFFIX), companion(index, OLD_SUFFIX)):
            skip.extend(companion(database, suffix) for suffix in ("", *COMPANIONS))
        _find_unindexed(db, config, skip, report)
    report.seconds = time.monotonic() - started
    return report


@contextlib.contextmanager
def _reader(index: Path) -> Iterator[sqlite3.Connection]:
    try:
        db = sqlite3.connect(uri(index, mode="ro"), uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise IndexDatabaseError(f"cannot open the index {index}: {exc}") from exc
    try:
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        yield db
    except sqlite3.Error as exc:
        raise IndexDatabaseError(f"cannot read the index {index}: {exc}") from exc
    finally:
        db.close()


def _check_index(db: sqlite3.Connection) -> str:
    """SQLite's own check of the index's structure: "ok", or what it found."""
    found = [str(row[0]) for row in db.execute("PRAGMA quick_check")]
    return "ok" if found == ["ok"] else "damaged: " + "; ".join(found[:5])


def check(root: Path, row: IndexedFile, transcodes: bool) -> tuple[Finding, str]:
    """One indexed file against its row; the finding and, if not OK, why."""
    path = root / row.path
    try:
        opened = files.read(path)
    except FileNotFoundError:
        return Finding.MISSING, ""
    except files.NotPart10 as exc:
        return Finding.CHANGED, str(exc)
    except OSError as exc:
        return Finding.CHANGED, f"cannot be read: {exc.strerror or exc}"
    if opened.size != row.size:
        return Finding.CHANGED, f"has {opened.size} bytes, the index says {row.size}"
    named = opened.meta_text("MediaStorageSOPInstanceUID")
    if named != row.uid:
        return Finding.CHANGED, f"its file meta information names the instance {named!r}"
    if opened.transfer_syntax != row.transfer_syntax:
        return Finding.CHANGED, (
            f"its file meta information names the transfer syntax {opened.transfer_syntax!r},"
            f" the index {row.transfer_syntax}"
        )
    if opened.digest == row.digest:
        return Finding.OK, ""
    if transcodes and row.transfer_syntax == ExplicitVRLittleEndian:
        return Finding.SIZE_ONLY, ""
    try:
        if files.legacy_digest(path, opened.offset) == row.digest:
            return Finding.OK, ""  # indexed before the engine used BLAKE3
    except OSError as exc:
        return Finding.CHANGED, f"cannot be read: {exc.strerror or exc}"
    return Finding.CHANGED, "its content is not what was stored (its digest differs)"


def _rows(db: sqlite3.Connection) -> Iterator[list[IndexedFile]]:
    """Every instance row, a page at a time (short reads: the engine's checkpoints go on)."""
    last = -1
    while True:
        page = db.execute(
            f"SELECT {_ROW} FROM instances WHERE rowid > ? ORDER BY rowid LIMIT ?", (last, PAGE)
        ).fetchall()
        if not page:
            return
        last = page[-1][0]
        yield [IndexedFile(str(u), str(p), int(s), str(d), str(t)) for _, u, p, s, d, t in page]


def _row_of(db: sqlite3.Connection, uid: str) -> IndexedFile | None:
    row = db.execute(f"SELECT {_ROW} FROM instances WHERE sop_instance_uid = ?", (uid,)).fetchone()
    if row is None:
        return None
    _, u, p, s, d, t = row
    return IndexedFile(str(u), str(p), int(s), str(d), str(t))


def _check_rows(
    db: sqlite3.Connection,
    root: Path,
    transcodes: bool,
    report: Verified,
    progress: Progress | None,
) -> None:
    (count, nbytes) = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM instances"
    ).fetchone()
    if progress is not None:
        progress.start("verify", int(count), int(nbytes))
    with concurrent.futures.ThreadPoolExecutor(READERS, "verify-read") as pool:
        for page in _rows(db):
            findings = pool.map(lambda row: check(root, row, transcodes), page)
            for row, (finding, why) in zip(page, findings, strict=True):
                report.instances += 1
                report.nbytes += row.size
                if finding is Finding.SIZE_ONLY:
                    report.size_only += 1
                elif finding is not Finding.OK and _row_of(db, row.uid) == row:
                    # Still the row: not an overwrite or a removal the engine made meanwhile.
                    if finding is Finding.MISSING:
                        report.missing.append(f"{row.path} ({row.uid})")
                    else:
                        report.changed.append(f"{row.path} ({row.uid}): {why}")
            if progress is not None:
                progress.advance(len(page), sum(row.size for row in page))
    if progress is not None:
        progress.finish()


def _find_unindexed(
    db: sqlite3.Connection, config: Config, skip: list[Path], report: Verified
) -> None:
    root = config.storage.path
    candidates: list[files.StoredFile] = []
    batch: list[files.StoredFile] = []
    try:
        for stored in files.walk(root, skip):
            report.files += 1
            batch.append(stored)
            if len(batch) >= LOOKUP:
                candidates += _without_row(db, root, batch)
                batch = []
    except OSError as exc:
        raise StorageError(f"cannot list the storage folder {root}: {exc}") from exc
    candidates += _without_row(db, root, batch)
    if not candidates:
        return
    # Read after the walk: a file renamed into place before it is in an open batch until
    # its row commits, and so is the instance of a copy an overwrite is replacing.
    paths, uids = _journaled(root, config.storage.quarantine)
    for stored in _without_row(db, root, candidates):  # committed meanwhile?
        in_flight = stored.rel_path in paths or _uid_of(root, stored) in uids
        if not in_flight and (root / stored.rel_path).exists():
            report.unindexed.append(stored.rel_path)


def _without_row(
    db: sqlite3.Connection, root: Path, batch: list[files.StoredFile]
) -> list[files.StoredFile]:
    """The files of ``batch`` that no instance row names."""
    uids = {stored.rel_path: _uid_of(root, stored) for stored in batch}
    wanted = sorted({uid for uid in uids.values() if uid})
    indexed: set[str] = set()
    for start in range(0, len(wanted), LOOKUP):
        chunk = wanted[start : start + LOOKUP]
        marks = ", ".join("?" for _ in chunk)
        indexed.update(
            str(path)
            for (path,) in db.execute(
                f"SELECT path FROM instances WHERE sop_instance_uid IN ({marks})", chunk
            )
        )
    return [stored for stored in batch if stored.rel_path not in indexed]


def _uid_of(root: Path, stored: files.StoredFile) -> str | None:
    """The SOP Instance UID a file is of: from its name, else from its file meta."""
    name = files.parse_name(stored.name)
    if name is not None:
        return name.uid
    try:
        return files.read(root / stored.rel_path).meta_text("MediaStorageSOPInstanceUID") or None
    except (OSError, files.NotPart10):
        return None


def _journaled(root: Path, quarantine: Path) -> tuple[set[str], set[str]]:
    """The files, and their instances, of journal batches not yet committed (or left by
    a crash, for the next start to settle)."""
    paths: set[str] = set()
    uids: set[str] = set()
    for attempt in range(JOURNAL_ATTEMPTS):
        try:
            for _, entries in StorageArea(root, quarantine, fsync=False).journals():
                for entry in entries:
                    if isinstance(entry, dict):
                        paths.add(str(entry.get("path")))
                        uids.add(str(entry.get("sop_instance_uid")))
            break
        except OSError as exc:  # a journal log removed while the folder was listed
            if attempt + 1 == JOURNAL_ATTEMPTS:
                log.warning("cannot read the journals of %s: %s", root, exc)
    return paths, uids
