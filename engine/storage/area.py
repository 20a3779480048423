"""The storage folder: where instance files live, and how they get there safely.

Layout under the configured root (local disk or a NAS mount)::

    ab/cd/<StudyInstanceUID>/<SOPInstanceUID>.<digest16>.dcm   instance files
    .incoming/                                                 temp files being written
    .journal/<batch>.json                                      files renamed, rows not yet committed
    .quarantine/<YYYYMMDD>/<time>-<id>.dcm + .json             rejected input (default place)
    .clean-shutdown                                            present only while stopped cleanly
    .lock                                                      flock held by the running engine

Invariants:

- A file appears under its final name only by ``rename`` from ``.incoming``, so
  a reader never sees half a file.
- Before any file of a batch is renamed into place, the batch's journal lists
  it. The journal is removed after the index commit. At start, a journal left
  behind names exactly the files that may lack an index row.
- With ``fsync`` on, every file, the journal and the directories that changed
  are synced before the batch goes to the index, so a success status (sent after
  the commit) survives a power cut. With it off, the bytes are in the OS cache:
  they survive a crash of the engine, not of the machine (as dcmtk's storescp).
- The file name carries the content digest: two copies with the same UID and
  different bytes never overwrite each other; the index decides which stays.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from engine.errors import StorageError

log = logging.getLogger(__name__)

INCOMING = ".incoming"
JOURNAL = ".journal"
CLEAN_MARK = ".clean-shutdown"
LOCK = ".lock"
SUFFIX = ".dcm"
DIGEST_IN_NAME = 16


def is_out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass(slots=True)
class PendingFile:
    """One file the write stage wants in place: where, what, and what the journal says."""

    rel_path: str
    chunks: tuple[bytes, ...]
    journal_entry: dict[str, Any]
    error: OSError | None = None
    _temp: Path | None = field(default=None, repr=False)


class StorageArea:
    def __init__(self, root: Path, quarantine: Path, fsync: bool) -> None:
        self.root = root
        self.quarantine_root = quarantine
        self.fsync = fsync
        self.incoming = root / INCOMING
        self.journal_dir = root / JOURNAL
        self._lock_fd: int | None = None

    # -- start and stop -------------------------------------------------------

    def prepare(self, expect_existing: bool) -> bool:
        """Lock the folder, create what is missing, clear temp files.

        ``expect_existing``: the index already lists files, so the root must exist;
        a missing root (an unmounted NAS) is an error, never a fresh empty folder.
        Returns whether the last stop was clean.
        """
        if expect_existing and not self.root.is_dir():
            raise StorageError(
                f"the storage folder {self.root} does not exist but the index lists files in it;"
                " is the disk or NAS mounted?"
            )
        try:
            for folder in (self.root, self.incoming, self.journal_dir, self.quarantine_root):
                folder.mkdir(parents=True, exist_ok=True)
            self._lock()
            probe = self.incoming / f"probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"storage folder {self.root} is not usable: {exc}") from exc
        removed = 0
        for temp in self.incoming.iterdir():
            temp.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.warning("removed %d temp files left by an interrupted write", removed)
        mark = self.root / CLEAN_MARK
        was_clean = mark.exists()
        mark.unlink(missing_ok=True)
        return was_clean

    def _lock(self) -> None:
        """One engine per storage folder: a second one would clear the first's temp files
        and replay its live journals. The lock lives as long as the process."""
        self._lock_fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StorageError(f"another engine is using the storage folder {self.root}") from None

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def mark_clean(self) -> None:
        (self.root / CLEAN_MARK).write_bytes(b"")

    # -- paths ----------------------------------------------------------------

    @staticmethod
    def instance_path(study_uid: str, sop_instance_uid: str, digest: str) -> str:
        shard = hashlib.sha1(study_uid.encode(), usedforsecurity=False).hexdigest()
        name = f"{sop_instance_uid}.{digest[:DIGEST_IN_NAME]}{SUFFIX}"
        return f"{shard[:2]}/{shard[2:4]}/{study_uid}/{name}"

    def absolute(self, rel_path: str) -> Path:
        return self.root / rel_path

    # -- the batch write --------------------------------------------------------

    def write_batch(self, files: list[PendingFile]) -> str | None:
        """Put a batch of files in place, journaled. Failures are set per file.

        Returns the journal's name (to pass to ``end_journal`` after the index
        commit), or None if no file made it.
        """
        for pending in files:
            self._write_temp(pending)
        ready = [f for f in files if f.error is None]
        if not ready:
            return None
        journal = uuid.uuid4().hex
        try:
            self._write_journal(journal, [f.journal_entry for f in ready])
        except OSError as exc:
            log.error("cannot write the batch journal: %s", exc)
            for pending in ready:
                self._fail(pending, exc)
            return None
        synced_dirs: set[Path] = set()
        for pending in ready:
            final = self.root / pending.rel_path
            try:
                synced_dirs.update(self._make_dirs(final.parent))
                assert pending._temp is not None
                os.replace(pending._temp, final)
                pending._temp = None
                synced_dirs.add(final.parent)
            except OSError as exc:
                self._fail(pending, exc)
        if self.fsync:
            for directory in synced_dirs:
                _fsync_dir(directory)
        if all(f.error is not None for f in files):
            self.end_journal(journal)
            return None
        return journal

    def _write_temp(self, pending: PendingFile) -> None:
        temp = self.incoming / f"{uuid.uuid4().hex}.part"
        pending._temp = temp
        try:
            with open(temp, "wb") as fh:
                for chunk in pending.chunks:
                    fh.write(chunk)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
        except OSError as exc:
            self._fail(pending, exc)

    @staticmethod
    def _fail(pending: PendingFile, exc: OSError) -> None:
        pending.error = exc
        if pending._temp is not None:
            with contextlib.suppress(OSError):
                pending._temp.unlink(missing_ok=True)
            pending._temp = None

    def _make_dirs(self, directory: Path) -> list[Path]:
        """mkdir -p; returns the parents whose entries changed (to fsync)."""
        if directory.is_dir():
            return []
        missing: list[Path] = []
        walk = directory
        while not walk.is_dir():
            missing.append(walk)
            walk = walk.parent
        for folder in reversed(missing):
            with contextlib.suppress(FileExistsError):
                folder.mkdir()
        return [folder.parent for folder in missing]

    def _write_journal(self, name: str, entries: list[dict[str, Any]]) -> None:
        path = self.journal_dir / f"{name}.json"
        with open(path, "wb") as fh:
            fh.write(orjson.dumps(entries))
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        if self.fsync:
            _fsync_dir(self.journal_dir)

    def end_journal(self, name: str) -> None:
        """The batch is committed (or undone): its journal is no longer needed."""
        (self.journal_dir / f"{name}.json").unlink(missing_ok=True)

    def journals(self) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        """Journals left by an interrupted run, oldest first."""
        paths = sorted(self.journal_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for path in paths:
            try:
                entries = orjson.loads(path.read_bytes())
            except (OSError, orjson.JSONDecodeError) as exc:
                # With fsync on, a journal is synced before any rename: an unreadable one
                # named no file in place. With fsync off a power cut can tear it; the files
                # it named then stay on disk without rows.
                log.warning("ignoring unreadable journal %s: %s", path.name, exc)
                entries = []
            yield path.stem, entries

    def remove(self, rel_paths: Iterable[str]) -> None:
        """Remove files the index does not reference (losing duplicates, replaced copies)."""
        for rel_path in rel_paths:
            try:
                (self.root / rel_path).unlink(missing_ok=True)
            except OSError as exc:
                log.error("cannot remove %s: %s", rel_path, exc)

    # -- quarantine -------------------------------------------------------------

    def quarantine(self, chunks: tuple[bytes, ...], note: dict[str, Any], suffix: str) -> str:
        """Keep rejected bytes with a JSON note saying why. Returns the relative path."""
        now = time.time()
        day = time.strftime("%Y%m%d", time.gmtime(now))
        stem = f"{time.strftime('%H%M%S', time.gmtime(now))}-{uuid.uuid4().hex[:12]}"
        folder = self.quarantine_root / day
        folder.mkdir(parents=True, exist_ok=True)
        data_path = folder / f"{stem}{suffix}"
        with open(data_path, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        (folder / f"{stem}.json").write_bytes(
            orjson.dumps({**note, "file": data_path.name}, option=orjson.OPT_INDENT_2)
        )
        if self.fsync:
            _fsync_dir(folder)
        return f"{day}/{data_path.name}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
