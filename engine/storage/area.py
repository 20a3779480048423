"""The storage folder: where instance files live, and how they get there safely.

Layout under the configured root (local disk or a NAS mount)::

    ab/cd/<StudyInstanceUID>/<SOPInstanceUID>.<digest16>.dcm   instance files
                             (<SOPInstanceUID>.<digest16>.<node>.dcm for a named node)
    .incoming/                                                 temp files being written
    .journal/<run>.log                                         batches renamed into place, one JSON
                                                               line each, and their "done" lines
    .quarantine/<YYYYMMDD>/<time>-<id>.dcm + .json             rejected input (default place)
    .clean-shutdown                                            present only while stopped cleanly
    .lock                                                      flock held by the running engine

Several engine nodes may share one folder (with a PostgreSQL index): each has a name
(``[index] node``), written into its file names so that two nodes never write the same
name, and its own ``.incoming-<node>``, ``.journal-<node>``, ``.clean-shutdown-<node>``
and ``.lock-<node>``: a node's start-up clears and replays only its own unfinished work.

Invariants:

- A file appears under its final name only by ``rename`` from ``.incoming``, so
  a reader never sees half a file.
- Before any file of a batch is renamed into place, the batch's journal entry
  lists it. After the index commit the entry is marked done; a run's journal log
  is removed when all its batches are done. At start, the entries left without
  "done" name exactly the files that may lack an index row.
- With ``fsync`` on, every file, the journal and the directories that changed
  are synced (one by one, or all at once by one ``syncfs`` of the filesystem)
  before the batch goes to the index, so a success status (sent after
  the commit) survives a power cut. With it off, the bytes are in the OS cache:
  they survive a crash of the engine, not of the machine (as dcmtk's storescp).
- The file name carries the content digest: two copies with the same UID and
  different bytes never overwrite each other; the index decides which stays.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from engine.config import SyncMethod
from engine.errors import StorageError

log = logging.getLogger(__name__)

INCOMING = ".incoming"
JOURNAL = ".journal"
CLEAN_MARK = ".clean-shutdown"
LOCK = ".lock"
SUFFIX = ".dcm"
DIGEST_IN_NAME = 16
JOURNAL_LOG = ".log"
JOURNAL_BATCH_SEPARATOR = "#"
# A journal log longer than this is replaced by a new one at the next batch.
JOURNAL_ROTATE_BYTES = 16 * 1024 * 1024


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

    @classmethod
    def spooled(cls, rel_path: str, temp: Path, journal_entry: dict[str, Any]) -> PendingFile:
        """A file already written to a temp file in ``.incoming`` (and synced if fsync is on)."""
        return cls(rel_path, (), journal_entry, _temp=temp)


def make_dirs(directory: Path) -> list[Path]:
    """mkdir -p; returns the parents whose entries changed (to fsync)."""
    missing: list[Path] = []
    walk = directory
    while not walk.is_dir():
        missing.append(walk)
        walk = walk.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
    return [folder.parent for folder in missing]


class StorageArea:
    def __init__(
        self,
        root: Path,
        quarantine: Path,
        fsync: bool,
        sync_method: SyncMethod = SyncMethod.FSYNC,
        node: str = "",
    ) -> None:
        self.root = root
        self.node = node
        own = f"-{node}" if node else ""
        self.quarantine_root = quarantine
        self.fsync = fsync
        if fsync and sync_method is SyncMethod.SYNCFS and _SYNCFS is None:
            log.warning("syncfs is not available here; syncing every file instead")
            sync_method = SyncMethod.FSYNC
        # With syncfs, one flush of the filesystem per batch covers the files, the
        # journal and the directories: nothing is synced one by one.
        self.sync_each = fsync and sync_method is SyncMethod.FSYNC
        self.sync_batch = fsync and sync_method is SyncMethod.SYNCFS
        self.incoming = root / f"{INCOMING}{own}"
        self.journal_dir = root / f"{JOURNAL}{own}"
        self.clean_mark = root / f"{CLEAN_MARK}{own}"
        self.lock_path = root / f"{LOCK}{own}"
        self._lock_fd: int | None = None
        # The journal log of this run (see ``_write_journal``) and the batches in each
        # log not yet ended; the logs of an interrupted run being replayed.
        self._log_path: Path | None = None
        self._log_fd = -1
        self._log_size = 0
        self._batch_log: dict[str, Path] = {}
        self._open_batches: dict[Path, set[str]] = {}
        self._replaying: dict[str, set[str]] = {}

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
        mark = self.clean_mark
        was_clean = mark.exists()
        mark.unlink(missing_ok=True)
        return was_clean

    def _lock(self) -> None:
        """One engine per storage folder: a second one would clear the first's temp files
        and replay its live journals. The lock lives as long as the process."""
        self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            who = f"another engine named {self.node}" if self.node else "another engine"
            raise StorageError(f"{who} is using the storage folder {self.root}") from None

    def release(self) -> None:
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def mark_clean(self) -> None:
        """At a clean stop, after the last commit: no file was left half-done."""
        self.close_journal()
        self.clean_mark.write_bytes(b"")

    def flusher(self, index_path: Path | None) -> Callable[[], None] | None:
        """With syncfs: the one flush per batch, run after the index commit.

        It syncs the storage folder's filesystem, and the index's if that is another
        one: the batch's files, journal entry, directories and index rows reach the
        disk together, in one flush instead of one per file and one for the commit.
        A success is sent only after it. A crash before it ends leaves any part of the
        batch; nothing was acknowledged, and the start-up recovery (journal replay,
        rows whose file is missing dropped after an unclean stop) settles it.
        """
        if not self.sync_batch:
            return None
        folders: list[Path] = []
        found = threading.Lock()  # flushes may come from two threads (index.sqlite)

        def flush() -> None:
            with found:
                if not folders:  # first commit: both folders exist by now
                    found_now = [self.root]
                    if index_path is not None:  # None: the index is on a server
                        index_folder = index_path.resolve().parent
                        if index_folder.stat().st_dev != self.root.stat().st_dev:
                            found_now.append(index_folder)
                    folders.extend(found_now)  # only once both are known
            for folder in folders:
                _syncfs(folder)

        return flush

    # -- paths ----------------------------------------------------------------

    @staticmethod
    def instance_path(study_uid: str, sop_instance_uid: str, digest: str, node: str = "") -> str:
        """Where an instance goes (relative); ``node``: the name of the node writing it."""
        shard = hashlib.sha1(study_uid.encode(), usedforsecurity=False).hexdigest()
        named = f".{node}" if node else ""
        name = f"{sop_instance_uid}.{digest[:DIGEST_IN_NAME]}{named}{SUFFIX}"
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
            if pending._temp is None:
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
                synced_dirs.update(make_dirs(final.parent))
                assert pending._temp is not None
                os.replace(pending._temp, final)
                pending._temp = None
                synced_dirs.add(final.parent)
            except OSError as exc:
                self._fail(pending, exc)
        if self.sync_each:
            for directory in synced_dirs:
                _fsync_dir(directory)
        # With syncfs, the index commit's flush (``flusher``) makes the batch durable.
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
                if self.sync_each:
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

    def _write_journal(self, name: str, entries: list[dict[str, Any]]) -> None:
        """Append the batch to this run's journal log; with fsync on, sync it.

        One file per run, appended to and synced per batch (cheaper than a new file
        per batch: no file to create, no directory to sync, no file to remove). A
        batch's "done" line is appended after its commit without a sync: if it is
        lost, recovery only finds the batch's files already indexed.
        """
        if self._log_fd < 0 or self._log_size > JOURNAL_ROTATE_BYTES:
            self._rotate_log()
        line = orjson.dumps({"batch": name, "files": entries}) + b"\n"
        self._append(line)
        if self.sync_each:
            os.fdatasync(self._log_fd)
        assert self._log_path is not None
        self._batch_log[name] = self._log_path
        self._open_batches[self._log_path].add(name)

    def _append(self, line: bytes) -> None:
        """Append whole lines only: a line cut short (a full disk) is cut off again, or
        the next line would be glued to it and both would be unreadable at recovery."""
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(self._log_fd, view) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._log_fd, self._log_size)  # O_APPEND: the next line goes here
            raise
        self._log_size += len(line)

    def _rotate_log(self) -> None:
        """Start a new journal log; the old one goes once its batches are all done."""
        old = self._log_path
        if self._log_fd >= 0:
            os.close(self._log_fd)
        self._log_path = (
            self.journal_dir
            / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}{JOURNAL_LOG}"
        )
        self._log_fd = os.open(self._log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._log_size = 0
        self._open_batches[self._log_path] = set()
        if self.fsync:
            _fsync_dir(self.journal_dir)
        if old is not None and not self._open_batches.get(old):
            self._drop_log(old)

    def _drop_log(self, log_path: Path) -> None:
        self._open_batches.pop(log_path, None)
        log_path.unlink(missing_ok=True)

    def end_journal(self, name: str) -> None:
        """The batch is committed (or undone): its journal entry is no longer needed."""
        log_path = self._batch_log.pop(name, None)
        if log_path is not None:  # a batch of this run
            pending = self._open_batches.get(log_path)
            if pending is not None:
                pending.discard(name)
            if log_path == self._log_path and self._log_fd >= 0:
                try:
                    self._append(orjson.dumps({"done": name}) + b"\n")
                except OSError as exc:  # a full disk: recovery finds the batch indexed
                    log.warning("cannot mark batch %s done in the journal: %s", name, exc)
            elif not pending:
                self._drop_log(log_path)
            return
        log_name, _, batch = name.partition(JOURNAL_BATCH_SEPARATOR)
        if not batch:  # a per-batch JSON journal (engines before the journal log)
            (self.journal_dir / f"{name}.json").unlink(missing_ok=True)
            return
        left = self._replaying.get(log_name)  # a batch of an interrupted run's log
        if left is not None:
            left.discard(batch)
            if not left:
                del self._replaying[log_name]
                (self.journal_dir / log_name).unlink(missing_ok=True)

    def close_journal(self) -> bool:
        """At a clean stop: remove this run's journal log if every batch in it is done.

        Returns whether no batch is left open.
        """
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        open_left = any(self._open_batches.values())
        for log_path, pending in list(self._open_batches.items()):
            if not pending:
                self._drop_log(log_path)
        return not open_left

    def clear_settled_journals(self) -> None:
        """After the start-up replay: remove old journal logs with no batch left open."""
        for log_name, left in list(self._replaying.items()):
            if not left:
                del self._replaying[log_name]
                (self.journal_dir / log_name).unlink(missing_ok=True)

    def journals(self) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        """Journaled batches left by an interrupted run, oldest first, as (name, files).

        Pass each name to ``end_journal`` once the batch is settled.
        """
        paths = sorted(
            [*self.journal_dir.glob("*.json"), *self.journal_dir.glob(f"*{JOURNAL_LOG}")],
            key=lambda p: p.stat().st_mtime,
        )
        for path in paths:
            if path == self._log_path:
                continue
            if path.suffix == ".json":
                try:
                    entries = orjson.loads(path.read_bytes())
                except (OSError, orjson.JSONDecodeError) as exc:
                    # With fsync on, a journal is synced before any rename: an unreadable
                    # one named no file in place. With fsync off a power cut can tear it;
                    # the files it named then stay on disk without rows.
                    log.warning("ignoring unreadable journal %s: %s", path.name, exc)
                    entries = []
                yield path.stem, entries
                continue
            batches = _read_log(path)
            self._replaying[path.name] = set(batches)
            for batch, entries in batches.items():
                yield f"{path.name}{JOURNAL_BATCH_SEPARATOR}{batch}", entries

    def remove(self, rel_paths: Iterable[str]) -> None:
        """Remove files the index does not reference (losing duplicates, replaced copies)."""
        for rel_path in rel_paths:
            try:
                (self.root / rel_path).unlink(missing_ok=True)
            except OSError as exc:
                log.error("cannot remove %s: %s", rel_path, exc)

    # -- quarantine -------------------------------------------------------------

    def quarantine(
        self, chunks: tuple[bytes, ...] | Path, note: dict[str, Any], suffix: str
    ) -> str:
        """Keep rejected bytes with a JSON note saying why. Returns the relative path.

        ``chunks`` is the bytes, or a temp file of ours that holds them (moved).
        """
        now = time.time()
        day = time.strftime("%Y%m%d", time.gmtime(now))
        stem = f"{time.strftime('%H%M%S', time.gmtime(now))}-{uuid.uuid4().hex[:12]}"
        folder = self.quarantine_root / day
        folder.mkdir(parents=True, exist_ok=True)
        data_path = folder / f"{stem}{suffix}"
        if isinstance(chunks, Path):
            self._move(chunks, data_path)
        else:
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

    def _move(self, temp: Path, target: Path) -> None:
        """Rename a temp file to ``target``; copy it if that is another filesystem."""
        try:
            os.replace(temp, target)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        with open(temp, "rb") as source, open(target, "wb") as fh:
            shutil.copyfileobj(source, fh)
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        temp.unlink(missing_ok=True)


def _read_log(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The batches of a journal log that have no "done" line, in order.

    A line cut short by a crash (the last one) is ignored: its batch was not synced,
    so none of its files was renamed into place.
    """
    batches: dict[str, list[dict[str, Any]]] = {}
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        log.warning("ignoring unreadable journal %s: %s", path.name, exc)
        return batches
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
            if "done" in record:
                batches.pop(str(record["done"]), None)
            else:
                batches[str(record["batch"])] = list(record["files"])
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("ignoring line %d of journal %s: %s", number, path.name, exc)
    return batches


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return function


_SYNCFS = _load_syncfs()


def _syncfs(folder: Path) -> None:
    """Flush everything pending on the filesystem holding ``folder`` (syncfs(2))."""
    assert _SYNCFS is not None
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"syncfs: {os.strerror(code)}")
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
