"""Restore a backup into an empty storage folder and index.

Every file the backup's index names is copied into the storage folder under its
relative path, checked against the manifest (BLAKE3 of the whole file) and read back
from the disk; the index comes last, so a restore cut short leaves no index naming
files that are not there. The storage folder is locked as the engine locks it: no
engine can start on it during a restore, and a restore refuses a folder an engine uses.

A storage folder or index that already holds something is refused unless ``force``:
then the index is replaced, files of the backup replace those with the same name
(the same instance and digest), and other files are left where they are.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.backup.copy import SourceProblem, copy_verified, file_digest
from engine.backup.create import BATCH_FILES
from engine.backup.folder import INDEX, BackupFolder, fsync_dir, write_error
from engine.backup.manifest import InstanceFile, Manifest, uri
from engine.errors import BackupError
from engine.index.sqlite import COMPANIONS, companion
from engine.progress import Progress
from engine.storage.area import CLEAN_MARK, INCOMING, LOCK, make_dirs

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Restored:
    files: int = 0
    nbytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, storage: Path, index: Path) -> dict[str, Any]:
        return {
            "storage": str(storage),
            "index": str(index),
            "ok": self.ok,
            "files": self.files,
            "bytes": self.nbytes,
            "problems": self.problems,
        }


@contextlib.contextmanager
def _storage_locked(storage: Path) -> Iterator[None]:
    """The engine's own lock on its storage folder (``StorageArea``)."""
    try:
        storage.mkdir(parents=True, exist_ok=True)
        fd = os.open(storage / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise write_error(exc, storage) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(
                f"an engine is running on the storage folder {storage}; stop it before restoring"
            ) from None
        yield
    finally:
        os.close(fd)


def _index_holds(index: Path) -> str | None:
    """What the index at ``index`` holds, if anything."""
    if not any(Path(f"{index}{s}").exists() for s in ("", "-wal")):
        return None
    try:
        db = sqlite3.connect(uri(index, mode="ro"), uri=True)
        try:
            (instances,) = db.execute("SELECT COUNT(*) FROM instances").fetchone()
            (quarantined,) = db.execute("SELECT COUNT(*) FROM quarantine").fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        return f"the index {index} is there but cannot be read ({exc})"
    if instances or quarantined:
        return f"the index {index} lists {instances} instances and {quarantined} quarantined"
    return None


def _storage_holds(storage: Path) -> str | None:
    """A file in the storage folder besides the engine's lock, mark and temp files."""
    for path in storage.rglob("*"):
        rel = path.relative_to(storage)
        if rel.parts[0] == INCOMING or str(rel) in (LOCK, CLEAN_MARK) or path.is_dir():
            continue
        return f"the storage folder {storage} holds files ({rel}, ...)"
    return None


def restore(
    folder: BackupFolder,
    storage: Path,
    index: Path,
    force: bool = False,
    progress: Progress | None = None,
) -> Restored:
    """Raises ``BackupError`` when nothing can be restored (no backup, a damaged index,
    a target in use or not empty, a target disk full); files of the backup that are
    missing or damaged are listed in the result's ``problems``."""
    with folder.locked(exclusive=False):
        manifest = Manifest.read(folder.manifest)
        if manifest is None:
            raise BackupError(f"no backup in {folder.root}: it has no {folder.manifest.name}")
        try:
            return _restore(folder, manifest, storage, index, force, progress)
        finally:
            manifest.close()


def _restore(
    folder: BackupFolder,
    manifest: Manifest,
    storage: Path,
    index: Path,
    force: bool,
    progress: Progress | None,
) -> Restored:
    index_entry = manifest.get(INDEX)
    if index_entry is None:
        raise BackupError(f"no backup in {folder.root}: no backup completed there")
    try:
        damaged = file_digest(folder.index) != index_entry.blake3
    except OSError as exc:
        raise BackupError(f"cannot read the backup's index {folder.index}: {exc}") from exc
    if damaged:
        raise BackupError(
            f"the backup's index {folder.index} is damaged (its digest is not the"
            " manifest's); cannot restore from this backup"
        )
    rows = manifest.instances(folder.index)
    with _storage_locked(storage):
        held = _index_holds(index) or _storage_holds(storage)
        if held is not None:
            if not force:
                raise BackupError(
                    f"refusing to restore: {held}. Restore into an empty storage folder"
                    " and index, or add --force to restore over them (the index is"
                    " replaced; files of the backup replace files of the same name;"
                    " other files are left in place)"
                )
            log.warning("restoring over what is there (--force): %s", held)
        result = Restored()
        incoming = storage / INCOMING
        try:
            incoming.mkdir(exist_ok=True)
            index.parent.mkdir(parents=True, exist_ok=True)
            (storage / CLEAN_MARK).unlink(missing_ok=True)
        except OSError as exc:
            raise write_error(exc, storage) from exc
        if progress is not None:
            progress.start("restore", rows.files + 1, rows.nbytes + index_entry.size)
        batch: list[tuple[Path, Path]] = []
        for chunk in rows.chunks():
            for row in chunk:
                problem = _restore_file(folder, row, storage, batch)
                if problem is not None:
                    result.problems.append(f"{folder.entry_name(row.path)}: {problem}")
                else:
                    result.files += 1
                    result.nbytes += row.size
                if len(batch) >= BATCH_FILES:
                    _install(batch, storage)
                if progress is not None:
                    progress.advance(1, row.size)
        _install(batch, storage)
        _install_index(folder, index, index_entry.blake3, index_entry.size)
        if progress is not None:
            progress.advance(1, index_entry.size)
            progress.finish()
        if result.ok:
            # Nothing half done: the engine's next start need not check every file.
            try:
                (storage / CLEAN_MARK).write_bytes(b"")
                fsync_dir(storage)
            except OSError as exc:
                raise write_error(exc, storage) from exc
        for line in result.problems:
            log.error("restore: %s", line)
    return result


def _restore_file(
    folder: BackupFolder, row: InstanceFile, storage: Path, batch: list[tuple[Path, Path]]
) -> str | None:
    """Copy one file of the backup to a temp file, checked; None, or what is wrong."""
    if row.listed is None:
        return "not in the backup"
    temp = storage / INCOMING / f"restore-{os.urandom(8).hex()}.part"
    try:
        copied = copy_verified(folder.file(row.path), temp, storage, row.listed.size)
    except SourceProblem as problem:
        return f"{problem} in the backup"
    if copied.blake3 != row.listed.blake3:
        temp.unlink(missing_ok=True)
        return "damaged in the backup"
    batch.append((temp, storage / row.path))
    return None


def _install(batch: list[tuple[Path, Path]], storage: Path) -> None:
    changed: set[Path] = set()
    try:
        for temp, final in batch:
            changed.update(make_dirs(final.parent))
            os.replace(temp, final)
            changed.add(final.parent)
        for directory in changed:
            fsync_dir(directory)
    except OSError as exc:
        raise write_error(exc, storage) from exc
    batch.clear()


def _install_index(folder: BackupFolder, index: Path, digest: str, size: int) -> None:
    temp = index.with_name(f".{index.name}.restore.part")
    temp.unlink(missing_ok=True)
    try:
        copied = copy_verified(folder.index, temp, index.parent, size)
    except SourceProblem as problem:
        raise BackupError(f"the backup's index {folder.index} {problem}") from None
    if copied.blake3 != digest:
        temp.unlink(missing_ok=True)
        raise BackupError(f"the backup's index {folder.index} changed while being restored")
    try:
        # A stale -wal left beside the replaced index would be replayed into it.
        for suffix in COMPANIONS:
            companion(index, suffix).unlink(missing_ok=True)
        os.replace(temp, index)
        fsync_dir(index.parent)
    except OSError as exc:
        raise write_error(exc, index.parent) from exc
