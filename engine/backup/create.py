"""Make a backup into a backup folder, incrementally, while the engine runs.

It needs neither the engine's lock nor its cooperation: it reads the storage folder
and the index, and writes only into the backup folder.

Why the copy is consistent while the engine writes:

1. The index is copied first, with SQLite's online backup API in one step: one read
   transaction, so the copy is the index exactly as of one commit (WAL mode: the
   engine's writer goes on meanwhile, it is not blocked by a reader).
2. The files to copy are those that copy names. The engine renames a file into place
   before the commit that indexes it, and files are never changed in place (a file's
   name carries its digest; an overwrite writes another file), so each of them is
   complete on disk. Files written after the snapshot belong to the next backup.
3. A file can vanish after the snapshot only when the engine stopped referencing it
   (a duplicate overwritten under ``duplicate_policy = "overwrite"``): it is then no
   longer in the live index, and the backup starts over with a new snapshot (only the
   files not yet copied are copied). A file that is gone while the live index still
   names it is reported as missing.
4. Each file is checked against its index row while it is read (size, and the dataset's
   digest), hashed, written, synced, and read back from the disk; a manifest line is
   appended only once its file is in place and synced; the copy of the index becomes
   the backup's ``index.sqlite`` only after every file it names is in the folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from pydicom.uid import ExplicitVRLittleEndian

from engine.backup.copy import SourceProblem, copy_verified, dataset_sha256, file_digest
from engine.backup.folder import (
    BLOCK,
    INDEX,
    BackupFolder,
    disk_size,
    fsync_dir,
    write_atomically,
    write_error,
)
from engine.backup.manifest import Entry, InstanceFile, Joined, Manifest, uri
from engine.config import Config, Transcode
from engine.errors import BackupError
from engine.progress import MB, Progress
from engine.storage.area import make_dirs

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 60_000
# Copies made in a row whose files are then synced and listed in the manifest together.
BATCH_FILES = 32
BATCH_BYTES = 32 * MB
# Snapshots taken when files vanish (replaced by the engine) while they are copied.
ROUNDS = 3
SNAPSHOT = INDEX + ".part"


@dataclass(frozen=True, slots=True)
class Source:
    """What is backed up: the engine's storage folder and index."""

    storage: Path
    index: Path
    # The engine may store images decompressed ([ingest] transcode): the index's digest of
    # such a file is of the bytes received, not of those stored.
    transcodes: bool = False

    @classmethod
    def of(cls, config: Config) -> Source:
        return cls(
            config.storage.path,
            config.index.path,
            config.ingest.transcode is not Transcode.NONE,
        )


class Interrupted(BackupError):
    """Stopped on request (the engine is stopping); the next backup resumes."""


def still_indexed(index_file: Path, paths: list[str]) -> set[str]:
    """Which of ``paths`` the live index names now."""
    db = sqlite3.connect(uri(index_file, mode="ro"), uri=True)
    try:
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        found: set[str] = set()
        for start in range(0, len(paths), 500):
            chunk = paths[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            found.update(
                p
                for (p,) in db.execute(f"SELECT path FROM instances WHERE path IN ({marks})", chunk)
            )
        return found
    except sqlite3.Error as exc:
        raise BackupError(f"cannot read the index {index_file}: {exc}") from exc
    finally:
        db.close()


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(slots=True)
class _Batch:
    files: list[tuple[Path, str, Entry]] = field(default_factory=list)
    nbytes: int = 0

    @property
    def full(self) -> bool:
        return len(self.files) >= BATCH_FILES or self.nbytes >= BATCH_BYTES


class Backup:
    """One backup run; its counters tell what it did, even when it failed."""

    def __init__(
        self,
        source: Source,
        destination: Path,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.source = source
        self.folder = BackupFolder(destination)
        self.progress = progress
        self.cancel = cancel
        self.started_at = time.time()
        self.finished_at = 0.0
        self.instances = 0  # in the index copied
        self.files_copied = 0
        self.bytes_copied = 0
        self.files_kept = 0  # in the backup folder after this run
        self.bytes_kept = 0
        self.problems: list[str] = []  # source files that could not be backed up
        self.completed = False  # the backup's index and manifest are in place

    @property
    def ok(self) -> bool:
        return self.completed and not self.problems

    def run(self) -> None:
        """Raises ``BackupError`` when the backup cannot go on; files that could not be
        copied are listed in ``problems`` (the backup is then not ``ok``)."""
        self.started_at = time.time()
        try:
            self._check_apart()
            with self.folder.locked(exclusive=True):
                self.folder.prepare()
                manifest = Manifest.open(self.folder.manifest)
                try:
                    self._run(manifest)
                finally:
                    manifest.close()
                    with contextlib.suppress(OSError):
                        self.folder.clear_incoming()  # a snapshot left by a failure takes room
                self.completed = True
                self.finished_at = time.time()
                self._write_summary()
        finally:
            self.finished_at = self.finished_at or time.time()

    def _check_apart(self) -> None:
        """The backup folder and the storage folder must not hold one another (the
        backup's ``storage/`` would be the archive's own files)."""
        self.folder.check_exists()
        backup, storage = self.folder.root.resolve(), self.source.storage.resolve()
        if backup.is_relative_to(storage) or storage.is_relative_to(backup):
            raise BackupError(
                f"the backup folder {backup} must be outside the storage folder {storage}"
                " (and not hold it)"
            )

    def _run(self, manifest: Manifest) -> None:
        snapshot = self.folder.incoming / SNAPSHOT
        for attempt in range(1, ROUNDS + 1):
            self._snapshot(snapshot)
            todo = manifest.instances(snapshot, missing_only=True)
            self.instances = todo.instances
            replaced = self._missing(self._copy_files(manifest, todo))
            if not replaced:
                break
            if attempt == ROUNDS:
                self.problems.extend(
                    f"{row.path}: removed by the engine while being copied (replaced by"
                    " another copy); run the backup again"
                    for row in replaced
                )
            else:
                log.info("%d files were replaced while being copied; a new snapshot", len(replaced))
        self._install_index(manifest, snapshot)
        self.files_kept, self.bytes_kept = manifest.totals()

    # -- the index ------------------------------------------------------------------

    def _snapshot(self, target: Path) -> None:
        """The index as of one commit, into ``target``, synced and checked from the disk."""
        index = self.source.index
        if not index.is_file():
            raise BackupError(f"no index at {index}")
        target.unlink(missing_ok=True)
        wal = Path(f"{index}-wal")
        self.folder.check_space(
            disk_size(index.stat().st_size) + (disk_size(wal.stat().st_size) if wal.exists() else 0)
        )
        try:
            src = sqlite3.connect(uri(index, mode="ro"), uri=True)
        except sqlite3.Error as exc:
            raise BackupError(f"cannot open the index {index}: {exc}") from exc
        try:
            src.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            src.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            src.close()
            raise BackupError(f"cannot read the index {index}: {exc}") from exc
        try:
            dst = sqlite3.connect(target)
            try:
                # One step (pages=-1): a single read transaction. In steps, SQLite
                # restarts the copy whenever another process commits in between: under
                # a steady ingest it might never end.
                src.backup(dst)
                # A single file, no -wal beside it (the engine sets WAL when it opens it).
                dst.execute("PRAGMA journal_mode = DELETE")
            finally:
                dst.close()
        except sqlite3.Error as exc:
            target.unlink(missing_ok=True)
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                raise BackupError(f"{self.folder.root} is full: cannot copy the index") from exc
            raise BackupError(f"cannot copy the index into {self.folder.root}: {exc}") from exc
        finally:
            src.close()
        try:
            with open(target, "rb") as fh:
                os.fsync(fh.fileno())
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise write_error(exc, self.folder.root) from exc
        try:
            db = sqlite3.connect(uri(target, mode="ro", immutable="1"), uri=True)
            try:
                (check,) = db.execute("PRAGMA quick_check").fetchone()
            finally:
                db.close()
        except sqlite3.Error as exc:
            check = str(exc)
        if check != "ok":
            raise BackupError(
                f"the copy of the index in {self.folder.root} reads back damaged ({check}):"
                " is that disk failing?"
            )

    def _install_index(self, manifest: Manifest, snapshot: Path) -> None:
        try:
            size = snapshot.stat().st_size
            digest = file_digest(snapshot)
            os.replace(snapshot, self.folder.index)
            fsync_dir(self.folder.root)
        except OSError as exc:
            raise write_error(exc, self.folder.root) from exc
        manifest.add([Entry(INDEX, size, digest)])

    # -- the files ------------------------------------------------------------------

    def _copy_files(self, manifest: Manifest, todo: Joined) -> list[InstanceFile]:
        """Copy what the backup lacks; returns the rows whose file was gone."""
        self.folder.check_space(todo.files * BLOCK + todo.nbytes)
        if self.progress is not None:
            self.progress.start("backup", todo.files, todo.nbytes)
        gone: list[InstanceFile] = []
        batch = _Batch()
        for chunk in todo.chunks():
            for row in chunk:
                if self.cancel is not None and self.cancel.is_set():
                    self._commit(manifest, batch)
                    raise Interrupted(
                        "interrupted: the engine is stopping; the next backup resumes"
                    )
                self._copy_file(row, batch, gone)
                if batch.full:
                    self._commit(manifest, batch)
                if self.progress is not None:
                    self.progress.advance(1, row.size)
        self._commit(manifest, batch)
        if self.progress is not None:
            self.progress.finish()
        return gone

    def _copy_file(self, row: InstanceFile, batch: _Batch, gone: list[InstanceFile]) -> None:
        temp = self.folder.temp()
        try:
            copied = copy_verified(
                self.source.storage / row.path,
                temp,
                self.folder.root,
                row.size,
                dataset_digest=True,
            )
            self._check_content(row, copied.dataset_blake3)
        except SourceProblem as problem:
            temp.unlink(missing_ok=True)
            if problem.missing:
                gone.append(row)
            else:
                self._problem(f"{row.path}: {problem}")
            return
        entry = Entry(self.folder.entry_name(row.path), copied.size, copied.blake3)
        batch.files.append((temp, row.path, entry))
        batch.nbytes += copied.size

    def _check_content(self, row: InstanceFile, dataset_digest: str | None) -> None:
        """The file holds what was stored: its dataset's digest is the index's."""
        if dataset_digest == row.digest:
            return
        if self.source.transcodes and row.transfer_syntax == ExplicitVRLittleEndian:
            return  # maybe stored decompressed: the index's digest is of what was received
        try:
            if dataset_sha256(self.source.storage / row.path) == row.digest:
                return  # indexed before the engine used BLAKE3 (engine/digest.py)
        except (OSError, ValueError, struct.error):
            pass
        raise SourceProblem(
            "its content is not what was stored (its digest differs from the index's):"
            " damaged or changed since"
        )

    def _commit(self, manifest: Manifest, batch: _Batch) -> None:
        """Rename a batch of checked copies into place, sync, and list them."""
        if not batch.files:
            return
        changed: set[Path] = set()
        try:
            for temp, rel_path, _ in batch.files:
                final = self.folder.file(rel_path)
                changed.update(make_dirs(final.parent))
                os.replace(temp, final)
                changed.add(final.parent)
            for directory in changed:
                fsync_dir(directory)
        except OSError as exc:
            raise write_error(exc, self.folder.root) from exc
        manifest.add([entry for _, _, entry in batch.files])
        self.files_copied += len(batch.files)
        self.bytes_copied += batch.nbytes
        batch.files.clear()
        batch.nbytes = 0

    def _missing(self, gone: list[InstanceFile]) -> list[InstanceFile]:
        """Sort out vanished files: missing (still indexed: a problem) or replaced by the
        engine since the snapshot (returned: worth a new snapshot)."""
        if not gone:
            return []
        indexed = still_indexed(self.source.index, [row.path for row in gone])
        replaced = []
        for row in gone:
            if row.path in indexed:
                self._problem(f"{row.path}: missing from the storage folder")
            else:
                replaced.append(row)
        return replaced

    def _problem(self, text: str) -> None:
        if text not in self.problems:  # a file is tried again in each round
            log.error("cannot back up %s", text)
            self.problems.append(text)

    # -- the result -------------------------------------------------------------------

    def message(self) -> str:
        if self.problems:
            more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            return f"{len(self.problems)} files not backed up: {self.problems[0]}{more}"
        return (
            f"{self.instances} instances; {self.files_copied} files copied"
            f" ({self.bytes_copied / MB:.1f} MB)"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "destination": str(self.folder.root),
            "ok": self.ok,
            "started_at": iso(self.started_at),
            "seconds": round(self.finished_at - self.started_at, 3),
            "instances": self.instances,
            "files_copied": self.files_copied,
            "bytes_copied": self.bytes_copied,
            "files_in_backup": self.files_kept,
            "bytes_in_backup": self.bytes_kept,
            "problems": self.problems,
        }

    def _write_summary(self) -> None:
        try:
            write_atomically(
                self.folder.summary, orjson.dumps(self.summary(), option=orjson.OPT_INDENT_2)
            )
        except OSError as exc:
            raise write_error(exc, self.folder.root) from exc
