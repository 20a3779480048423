"""The backup folder: its layout, its lock, and writes that are atomic and synced."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from engine.errors import BackupError

MANIFEST = "manifest.sqlite"
INDEX = "index.sqlite"
FILES = "storage"
SUMMARY = "backup.json"
INCOMING = ".incoming"
LOCK = ".lock"
BLOCK = 4096
SAME_DISK = (
    "the backup folder is on the same filesystem as the storage folder: it protects"
    " against mistakes and damaged files, not against the loss of that disk"
)

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)


def write_error(exc: OSError, folder: Path) -> BackupError:
    """A failed write into ``folder`` (a backup folder, or the storage folder a restore
    fills), as a message that says what to do about it."""
    reason = exc.strerror or str(exc)
    if exc.errno in _FULL:
        return BackupError(f"{folder} is full ({reason}): free some space or use another disk")
    if exc.errno in _REFUSED:
        return BackupError(f"cannot write to {folder} ({reason}): check its permissions and mount")
    return BackupError(f"cannot write to {folder}: {reason} ({exc.filename or folder})")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Temp file beside ``path``, fsync, rename, fsync of the folder."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(temp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class BackupFolder:
    """Where a backup goes (or a restore comes from); see ``engine.backup``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest = root / MANIFEST
        self.index = root / INDEX
        self.files = root / FILES
        self.summary = root / SUMMARY
        self.incoming = root / INCOMING

    def file(self, rel_path: str) -> Path:
        """An instance file of the backup, by its path relative to the storage folder."""
        return self.files / rel_path

    @staticmethod
    def entry_name(rel_path: str) -> str:
        """The manifest's name of an instance file (relative to the backup folder)."""
        return f"{FILES}/{rel_path}"

    def check_exists(self) -> None:
        """The folder must be there: an unmounted backup disk is an error, never an
        empty folder created on the disk underneath."""
        if not self.root.exists():
            raise BackupError(
                f"the backup folder {self.root} does not exist; create it (or mount its disk)"
            )
        if not self.root.is_dir():
            raise BackupError(f"the backup folder {self.root} is not a folder")

    def prepare(self) -> None:
        """Before a backup (with the lock held): the folder takes files; temp files of
        an interrupted run are cleared."""
        try:
            self.incoming.mkdir(exist_ok=True)
            self.clear_incoming()
            probe = self.incoming / f"probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise write_error(exc, self.root) from exc

    def clear_incoming(self) -> None:
        for temp in self.incoming.iterdir():
            temp.unlink(missing_ok=True)

    def temp(self) -> Path:
        return self.incoming / f"{uuid.uuid4().hex}.part"

    @contextlib.contextmanager
    def locked(self, exclusive: bool) -> Iterator[None]:
        """Exclusive for a backup (one writer); shared for a verification or a restore,
        which must not read a folder a backup is changing."""
        self.check_exists()
        path = self.root / LOCK
        try:
            if exclusive:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            else:
                fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            yield  # shared: no backup ever wrote here (or a copy without the lock file)
            return
        except OSError as exc:
            raise write_error(exc, self.root) from exc
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BackupError(
                    f"a backup is being written to {self.root} right now; try again when it ends"
                ) from None
            yield
        finally:
            os.close(fd)

    def check_space(self, nbytes: int) -> None:
        free = shutil.disk_usage(self.root).free
        if nbytes > free:
            raise BackupError(
                f"not enough space in {self.root}: {nbytes / 1e6:.1f} MB to copy,"
                f" {free / 1e6:.1f} MB free"
            )


def same_filesystem(one: Path, other: Path) -> bool:
    """Whether two existing folders are on one filesystem (a backup there does not
    survive the loss of that disk)."""
    try:
        return one.stat().st_dev == other.stat().st_dev
    except OSError:
        return False


def disk_size(size: int) -> int:
    """What a file takes on disk, about: whole blocks."""
    return -(-size // BLOCK) * BLOCK
