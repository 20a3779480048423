"""The reindex job: the new index built beside the old one from the storage folder's
files, then renamed over it (see the package's docstring for what it keeps)."""

from __future__ import annotations

import asyncio
import calendar
import concurrent.futures
import contextlib
import enum
import fcntl
import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson
from pydicom.uid import ExplicitVRLittleEndian

from engine.backup.manifest import uri
from engine.config import Config, DuplicatePolicy, Transcode
from engine.duplicates import Decision, Existing
from engine.errors import IndexDatabaseError, StorageError
from engine.index.base import InstanceRow, QuarantineRow
from engine.index.sqlite import (
    BUSY_TIMEOUT_MS,
    COMPANIONS,
    SQLiteIndex,
    companion,
    remove_database,
)
from engine.progress import Progress
from engine.recovery import MISSING_LIMIT
from engine.reindex.old_index import Known, OldIndex, OldState
from engine.reindex.parse import Parsed, parse_all
from engine.storage import files
from engine.storage.area import LOCK, StorageArea

log = logging.getLogger(__name__)

# Files per index transaction; the next batch is read while one commits.
BATCH = 256
# Threads reading and parsing files: enough to hide a NAS's latency.
READERS = 4
NEW_SUFFIX = ".reindex"
OLD_SUFFIX = ".bak"
# Tables made from the files; every other table of the old index is copied.
DERIVED_TABLES = frozenset({"patients", "studies", "series", "instances", "instance_headers"})
QUARANTINE_TABLE = "quarantine"
# A quarantine note's received_at (engine/stages/write.py).
NOTE_TIME = "%Y-%m-%dT%H:%M:%SZ"
NOTE_SUFFIX = ".json"
# The old index's name in the new index's connection while its tables are copied.
OLD = "old"


class OriginSource(enum.StrEnum):
    """Where an instance's origin (received_at, AE titles, peer, digest) was taken from."""

    OLD_INDEX = "old index"
    JOURNAL = "journal"
    FILE = "file"


@dataclass(slots=True)
class Reindexed:
    """What a reindex found and did."""

    storage: Path
    index: Path
    files: int = 0
    nbytes: int = 0
    instances: int = 0
    not_parsed: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    origins: Counter[str] = field(default_factory=Counter)
    old_index: OldState = OldState.NONE
    old_problem: str = ""
    copied: dict[str, int] = field(default_factory=dict)
    not_copied: dict[str, str] = field(default_factory=dict)
    quarantine: str = ""
    marked_stable: int = 0
    kept_old: Path | None = None
    seconds: float = 0.0

    @property
    def problems(self) -> list[str]:
        """Files not indexed, or indexed but not what was stored: exit status 1."""
        return [*self.not_parsed, *self.duplicates, *self.changed]

    def notes(self) -> list[str]:
        """What the new index could not take from the old one."""
        notes = []
        if self.old_index is not OldState.READ:
            why = (
                f"the old index {self.index} cannot be read ({self.old_problem})"
                if self.old_index is OldState.UNREADABLE
                else f"there was no index at {self.index}"
            )
            notes.append(
                f"{why}: receive times are the files' mtimes, calling AE titles their Source"
                " AE Title, called AE titles and peer addresses unknown; no backup or"
                " forwarding history"
            )
        for table, problem in self.not_copied.items():
            notes.append(f"table {table} not copied from the old index: {problem}")
        if self.quarantine:
            notes.append(self.quarantine)
        if self.kept_old is not None:
            notes.append(f"the old index is kept as {self.kept_old}")
        return notes

    def summary(self) -> dict[str, Any]:
        return {
            "storage": str(self.storage),
            "index": str(self.index),
            "ok": not self.problems,
            "seconds": round(self.seconds, 2),
            "files": self.files,
            "bytes": self.nbytes,
            "instances": self.instances,
            "not_indexed": len(self.not_parsed) + len(self.duplicates),
            "changed": len(self.changed),
            "old_index": self.old_index.value,
            "origins": dict(self.origins),
            "copied_tables": self.copied,
            "studies_marked_stable": self.marked_stable,
            "kept_old_index": str(self.kept_old) if self.kept_old else None,
            "problems": self.problems,
        }


async def reindex(
    config: Config, progress: Progress | None = None, force: bool = False
) -> Reindexed:
    """Rebuild the index of ``config`` from its storage folder.

    Raises ``StorageError`` (no storage folder, an engine running on it, a folder that
    holds far fewer files than the index lists and no ``force``) or
    ``IndexDatabaseError`` (an index of a newer engine); files that cannot be indexed
    are listed in the result's ``problems``.
    """
    root = config.storage.path
    if not root.is_dir():
        raise StorageError(f"the storage folder {root} does not exist; is the disk or NAS mounted?")
    with engine_lock(root):
        job = _Rebuild(config, progress, force)
        try:
            await job.build()
        except (sqlite3.Error, OSError) as exc:
            await asyncio.to_thread(remove_database, job.new_path)
            raise IndexDatabaseError(
                f"cannot build the new index {job.new_path}: {exc}; the index was left as it was"
            ) from exc
        except BaseException:
            await asyncio.to_thread(remove_database, job.new_path)
            raise
        await asyncio.to_thread(job.swap)
    return job.report


@contextlib.contextmanager
def engine_lock(root: Path) -> Iterator[None]:
    """The lock a running engine holds on its storage folder (``StorageArea``): while
    reindex holds it no engine starts there, and reindex does not start beside one."""
    try:
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StorageError(f"cannot open the lock of the storage folder {root}: {exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StorageError(
                f"an engine is running on the storage folder {root} (it holds {root / LOCK});"
                " stop it before reindexing"
            ) from None
        yield
    finally:
        os.close(fd)


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _first_copy(existing: Existing | None, digest: str) -> Decision:
    """The first file of an instance is indexed; other copies are reported."""
    return Decision.NEW if existing is None else Decision.KEEP


# -- the job --------------------------------------------------------------------------------


class _Rebuild:
    def __init__(self, config: Config, progress: Progress | None, force: bool) -> None:
        self.config = config
        self.progress = progress
        self.force = force
        self.root = config.storage.path
        self.index_path = config.index.path
        self.new_path = companion(self.index_path, NEW_SUFFIX)
        self.old_path = companion(self.index_path, OLD_SUFFIX)
        self.transcodes = config.ingest.transcode is not Transcode.NONE
        self.report = Reindexed(self.root, self.index_path)
        self.journaled: dict[str, Known] = {}
        self.old = OldIndex(self.index_path)
        self._started = time.monotonic()

    # -- building the new index ---------------------------------------------------------

    async def build(self) -> None:
        await asyncio.to_thread(remove_database, self.new_path)  # a stopped reindex's
        self.old = await asyncio.to_thread(OldIndex.open, self.index_path)
        try:
            listing = await asyncio.to_thread(self._listing)
            if (
                not self.force
                and self.old.instances > MISSING_LIMIT
                and len(listing) * 2 < self.old.instances
            ):
                raise StorageError(
                    f"the storage folder {self.root} holds {len(listing)} files but the index"
                    f" lists {self.old.instances} instances: is the right disk or NAS mounted?"
                    " (--force rebuilds the index from what is there)"
                )
            new = SQLiteIndex(self.new_path, durable=False)
            await new.open()
            try:
                await self._index_files(new, listing)
            finally:
                await new.close()
            await asyncio.to_thread(self._finish)
        finally:
            self.report.old_index, self.report.old_problem = self.old.state, self.old.problem
            self.old.close()

    def _listing(self) -> list[files.StoredFile]:
        """The files to index, each instance's preferred copy before its other copies."""
        skip = [self.config.storage.quarantine]
        for database in (self.index_path, self.new_path, self.old_path):
            skip.extend(companion(database, suffix) for suffix in ("", *COMPANIONS))
        try:
            listing = list(files.walk(self.root, skip))
        except OSError as exc:
            raise StorageError(f"cannot list the storage folder {self.root}: {exc}") from exc
        self.journaled = self._journaled()
        names = {f.rel_path: files.parse_name(f.name) for f in listing}
        copies = Counter((f.folder, n.uid) for f in listing if (n := names[f.rel_path]))
        several = [uid for (_, uid), count in copies.items() if count > 1]
        indexed = {uid: known.path for uid, known in self.old.known(several).items()}
        newest_first = self.config.ingest.duplicate_policy is DuplicatePolicy.OVERWRITE

        def order(f: files.StoredFile) -> tuple[str, str, int, float]:
            name = names[f.rel_path]
            if name is None:
                return (f.folder, f.name, 0, 0.0)
            # The copy the old index named; else, as the duplicate policy would have
            # kept: the newest copy (overwrite) or the first one (keep, reject).
            preferred = indexed.get(name.uid) == f.rel_path
            return (
                f.folder,
                name.uid,
                0 if preferred else 1,
                -f.mtime if newest_first else f.mtime,
            )

        listing.sort(key=order)
        return listing

    def _journaled(self) -> dict[str, Known]:
        """Files named by journal entries an interrupted run left (their origin)."""
        area = StorageArea(self.root, self.config.storage.quarantine, fsync=False)
        known: dict[str, Known] = {}
        try:
            for _, entries in area.journals():
                for entry in entries:
                    with contextlib.suppress(KeyError, TypeError, ValueError):
                        known[str(entry["path"])] = Known(
                            str(entry["sop_instance_uid"]),
                            str(entry["path"]),
                            str(entry["digest"]),
                            float(entry["received_at"]),
                            str(entry.get("calling_ae", "")),
                            str(entry.get("called_ae", "")),
                            str(entry.get("peer_ip", "")),
                        )
        except OSError as exc:
            log.warning("cannot read the journals of %s: %s", self.root, exc)
        return known

    async def _index_files(self, new: SQLiteIndex, listing: list[files.StoredFile]) -> None:
        self.report.files = len(listing)
        self.report.nbytes = sum(f.size for f in listing)
        if self.progress is not None:
            self.progress.start("reindex", self.report.files, self.report.nbytes)
        batches = [listing[start : start + BATCH] for start in range(0, len(listing), BATCH)]
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(READERS, "reindex-read") as pool:

            def read(batch: list[files.StoredFile]) -> list[asyncio.Future[list[Parsed | str]]]:
                # One job per reader, not per file: a hand-off costs as much as a small file.
                return [
                    loop.run_in_executor(pool, parse_all, self.root, batch[n::READERS])
                    for n in range(READERS)
                ]

            ahead = read(batches[0]) if batches else []
            for number, batch in enumerate(batches):
                shares = await asyncio.gather(*ahead)
                ahead = read(batches[number + 1]) if number + 1 < len(batches) else []
                results: list[Parsed | str] = [""] * len(batch)
                for n, share in enumerate(shares):
                    results[n::READERS] = share
                await self._commit(new, batch, results)
                if self.progress is not None:
                    self.progress.advance(len(batch), sum(f.size for f in batch))
        if self.progress is not None:
            self.progress.finish()

    async def _commit(
        self, new: SQLiteIndex, batch: list[files.StoredFile], results: list[Parsed | str]
    ) -> None:
        parsed: list[Parsed] = []
        for stored, result in zip(batch, results, strict=True):
            if isinstance(result, str):
                self.report.not_parsed.append(f"{stored.rel_path}: not indexed: {result}")
            else:
                parsed.append(result)
        if not parsed:
            return
        known = await asyncio.to_thread(self.old.known, [p.uid for p in parsed])
        rows, sources = zip(*(self._row(p, known.get(p.uid)) for p in parsed), strict=True)
        report = await new.commit_batch(list(rows), [], _first_copy)
        for p, source, decision, existing in zip(
            parsed, sources, report.decisions, report.existing, strict=True
        ):
            if decision is Decision.NEW:
                self.report.instances += 1
                self.report.origins[source.value] += 1
            elif existing is not None and existing.path != p.file.rel_path:
                self.report.duplicates.append(
                    f"{p.file.rel_path}: not indexed: another copy of {p.uid}, whose indexed"
                    f" file is {existing.path}"
                )

    def _row(self, p: Parsed, old: Known | None) -> tuple[InstanceRow, OriginSource]:
        path = p.file.rel_path
        known, source = old, OriginSource.OLD_INDEX
        if known is None or known.path != path:
            known, source = self.journaled.get(path), OriginSource.JOURNAL
            if known is not None and known.uid != p.uid:
                known = None
        if known is None:
            source = OriginSource.FILE
        row = InstanceRow(
            attributes=p.attributes,
            transfer_syntax=p.transfer_syntax,
            path=path,
            size=p.size,
            digest=self._digest(p, known, source),
            received_at=known.received_at if known else p.file.mtime,
            calling_ae=known.calling_ae if known else p.source_ae,
            called_ae=known.called_ae if known else "",
            peer_ip=known.peer_ip if known else "",
            header=p.header,
        )
        return row, source

    def _digest(self, p: Parsed, known: Known | None, source: OriginSource) -> str:
        """The digest of the dataset as received: the one recorded for this file, else
        the file's (its SHA-256 when its name says it was stored before BLAKE3)."""
        if known is not None and known.digest:
            transcoded = self.transcodes and p.transfer_syntax == ExplicitVRLittleEndian
            if known.digest not in (p.digest, p.legacy_digest) and not transcoded:
                self.report.changed.append(
                    f"{p.file.rel_path}: indexed, but its content is not what was stored (its"
                    f" digest differs from the {source.value}'s): damaged since?"
                )
            return known.digest
        name = files.parse_name(p.file.name)
        if name is not None and p.legacy_digest and p.legacy_digest.startswith(name.digest):
            return p.legacy_digest
        return p.digest

    # -- what only the old index knew ----------------------------------------------------

    def _finish(self) -> None:
        """Times, stability and the other tables; then the new index is made durable."""
        db = sqlite3.connect(uri(self.new_path), uri=True, isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            with _transaction(db):
                db.execute(
                    "UPDATE studies SET"
                    " created_at = (SELECT MIN(received_at) FROM instances i"
                    " WHERE i.study_uid = studies.study_uid),"
                    " updated_at = (SELECT MAX(received_at) FROM instances i"
                    " WHERE i.study_uid = studies.study_uid)"
                )
                db.execute(
                    "UPDATE series SET updated_at = (SELECT MAX(received_at) FROM instances i"
                    " WHERE i.series_uid = series.series_uid)"
                )
            from_old = self._from_old(db) if self.old.state is OldState.READ else False
            if QUARANTINE_TABLE not in self.report.copied:
                self._quarantine_from_notes(db)
            with _transaction(db):
                settled = time.time() - self.config.ingest.stable_age
                known = f" AND study_uid NOT IN (SELECT study_uid FROM {OLD}.studies)"
                cursor = db.execute(
                    "UPDATE studies SET stable_at = updated_at"
                    " WHERE stable_at IS NULL AND updated_at <= ?" + (known if from_old else ""),
                    (settled,),
                )
                self.report.marked_stable = cursor.rowcount
            if from_old:
                db.execute(f"DETACH DATABASE {OLD}")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()
        for suffix in COMPANIONS:
            companion(self.new_path, suffix).unlink(missing_ok=True)
        _fsync(self.new_path)

    def _from_old(self, db: sqlite3.Connection) -> bool:
        """Copy the old index's other tables, study and series times. Returns whether the
        old index stays attached (as ``OLD``) with its studies read."""
        try:
            db.execute(f"ATTACH DATABASE ? AS {OLD}", (uri(self.index_path, mode="ro"),))
            tables = [
                name
                for (name,) in db.execute(
                    f"SELECT name FROM {OLD}.sqlite_master WHERE type = 'table'"
                    " AND name NOT LIKE 'sqlite_%' ORDER BY name"
                )
            ]
            mine = {
                name
                for (name,) in db.execute(
                    "SELECT name FROM main.sqlite_master WHERE type = 'table'"
                )
            }
        except sqlite3.Error as exc:
            self.report.not_copied["*"] = f"the old index cannot be attached: {exc}"
            return False
        for table in tables:
            if table in DERIVED_TABLES:
                continue
            if table not in mine:
                self.report.not_copied[table] = "this engine's index has no such table"
                continue
            self._copy_table(db, table)
        try:
            with _transaction(db):
                self._times_from_old(db)
        except sqlite3.Error as exc:
            self.report.not_copied["studies"] = f"study times and stability: {exc}"
            with contextlib.suppress(sqlite3.Error):
                db.execute(f"DETACH DATABASE {OLD}")
            return False
        return True

    def _copy_table(self, db: sqlite3.Connection, table: str) -> None:
        name = _quoted(table)
        try:
            theirs = [row[1] for row in db.execute(f"PRAGMA {OLD}.table_info({name})")]
            mine = {row[1] for row in db.execute(f"PRAGMA main.table_info({name})")}
            columns = ", ".join(_quoted(c) for c in theirs if c in mine)
            with _transaction(db):
                db.execute(f"DELETE FROM main.{name}")
                cursor = db.execute(
                    f"INSERT INTO main.{name} ({columns}) SELECT {columns} FROM {OLD}.{name}"
                )
            self.report.copied[table] = cursor.rowcount
        except sqlite3.Error as exc:
            self.report.not_copied[table] = str(exc)

    def _times_from_old(self, db: sqlite3.Connection) -> None:
        columns = {row[1] for row in db.execute(f"PRAGMA {OLD}.table_info(studies)")}
        # An index older than stable studies: its studies count as settled (schema 004).
        stable = "o.stable_at" if "stable_at" in columns else "o.updated_at"
        db.execute(
            "UPDATE studies SET created_at = MIN(studies.created_at, o.created_at),"
            f" updated_at = MAX(studies.updated_at, o.updated_at), stable_at = {stable}"
            f" FROM {OLD}.studies AS o WHERE o.study_uid = studies.study_uid"
        )
        db.execute(
            "UPDATE series SET updated_at = MAX(series.updated_at, o.updated_at)"
            f" FROM {OLD}.series AS o WHERE o.series_uid = series.series_uid"
        )

    def _quarantine_from_notes(self, db: sqlite3.Connection) -> None:
        folder = self.config.storage.quarantine
        rows, skipped = quarantine_rows(folder)
        names = [f.name for f in fields(QuarantineRow)]
        insert = (
            f"INSERT INTO {QUARANTINE_TABLE} ({', '.join(names)})"
            f" VALUES ({', '.join('?' for _ in names)})"
        )
        with _transaction(db):
            db.execute(f"DELETE FROM {QUARANTINE_TABLE}")
            db.executemany(insert, [[getattr(r, n) for n in names] for r in rows])
        self.report.quarantine = (
            f"the quarantine table was rebuilt from {len(rows)} notes in {folder}"
        )
        if skipped:
            self.report.quarantine += (
                f" ({skipped} notes without a status left out: files set aside by the"
                " start-up recovery, which answered no one)"
            )

    # -- the swap ---------------------------------------------------------------------

    def swap(self) -> None:
        """The new index in the old one's place, in one rename; the old one aside."""
        index, old = self.index_path, self.old_path
        present = [s for s in ("", *COMPANIONS) if companion(index, s).exists()]
        if present:
            remove_database(old)
            if "" in present:
                try:
                    os.link(index, old)  # the old index stays in place until the rename
                except OSError:
                    os.replace(index, old)  # no hard links here; the lock keeps engines off
            for suffix in COMPANIONS:  # never beside the new index: they are the old one's
                if suffix in present:
                    os.replace(companion(index, suffix), companion(old, suffix))
        try:
            os.replace(self.new_path, index)
            _fsync(index.parent, directory=True)
        except OSError as exc:
            raise IndexDatabaseError(
                f"cannot put the new index {self.new_path} in place of {index}: {exc}"
                + (f"; the old index is {old}" if "" in present else "")
            ) from exc
        whole = self.report.old_index is OldState.READ and not self.report.not_copied
        if present and ("" not in present or whole):
            remove_database(old)  # read whole, or a write-ahead log without its index
        elif present:
            self.report.kept_old = old
        self.report.seconds = time.monotonic() - self._started


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def quarantine_rows(folder: Path) -> tuple[list[QuarantineRow], int]:
    """The quarantine table's rows, from the notes the engine writes beside each
    quarantined file; and how many notes have no row (files set aside by the start-up
    recovery, which answered nobody)."""
    rows: list[QuarantineRow] = []
    skipped = 0
    if not folder.is_dir():
        return rows, skipped
    for note_path in sorted(folder.rglob(f"*{NOTE_SUFFIX}")):
        try:
            note = orjson.loads(note_path.read_bytes())
            if not note.get("status"):
                skipped += 1
                continue
            received = calendar.timegm(time.strptime(str(note["received_at"]), NOTE_TIME))
            rel = note_path.parent.relative_to(folder).as_posix()
            rows.append(
                QuarantineRow(
                    path=f"{rel}/{note['file']}" if rel != "." else str(note["file"]),
                    outcome=str(note["outcome"]),
                    status=int(str(note["status"]), 16),
                    reason=str(note["reason"]),
                    sop_class_uid=str(note.get("sop_class_uid") or ""),
                    sop_instance_uid=str(note.get("sop_instance_uid") or ""),
                    transfer_syntax=str(note.get("transfer_syntax") or ""),
                    calling_ae=str(note.get("calling_ae") or ""),
                    called_ae=str(note.get("called_ae") or ""),
                    peer_ip=str(note.get("peer_ip") or ""),
                    received_at=float(received),
                )
            )
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("quarantine note %s left out: %s", note_path, exc)
    return rows, skipped
