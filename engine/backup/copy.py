"""One file copied and proven: read once (hashed while read), written to a temp file,
synced, dropped from the page cache, read back from the disk and compared.

A problem with the file being read (gone, unreadable, another size, changed while read)
is a ``SourceProblem``: the job notes it and goes on with the other files. A problem
writing (disk full, no permission, a copy that reads back different) is a
``BackupError``: nothing more can be written there, the job stops.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from blake3 import blake3

from engine.backup.folder import write_error
from engine.errors import BackupError
from engine.storage import part10

CHUNK = 1024 * 1024


class SourceProblem(Exception):
    """A file to copy is missing, unreadable or not what it should be."""

    def __init__(self, reason: str, missing: bool = False) -> None:
        super().__init__(reason)
        self.missing = missing


@dataclass(frozen=True, slots=True)
class Copied:
    size: int
    blake3: str  # of the whole file
    # Of the dataset after the Part 10 header (what the index's ``digest`` is of), when
    # asked for.
    dataset_blake3: str | None = None


def file_digest(path: Path) -> str:
    """BLAKE3 of a whole file, in hex."""
    hasher = blake3()
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def dataset_sha256(path: Path) -> str:
    """SHA-256 of the dataset of a Part 10 file: the digest indexes kept before BLAKE3."""
    data = path.read_bytes()
    return hashlib.sha256(memoryview(data)[part10.dataset_offset(data) :]).hexdigest()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def copy_verified(
    source: Path, temp: Path, into: Path, expected_size: int | None, dataset_digest: bool = False
) -> Copied:
    """Copy ``source`` to the new file ``temp`` and prove the copy; ``temp`` is removed
    on any failure. ``into``: the folder being filled, named in error messages.
    ``dataset_digest``: also hash the dataset after the Part 10 header."""
    try:
        reader = open(source, "rb", buffering=0)  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        raise SourceProblem("missing", missing=True) from None
    except OSError as exc:
        raise SourceProblem(f"cannot be read: {exc.strerror or exc}") from exc
    try:
        with reader:
            result = _copy(reader, temp, into, expected_size, dataset_digest)
        try:
            read_back = file_digest(temp)
        except OSError as exc:
            raise write_error(exc, into) from exc
        if read_back != result.blake3:
            raise BackupError(
                f"the copy of {source} in {into} reads back different from what was written:"
                " is that disk failing?"
            )
        return result
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _copy(
    reader: io.FileIO, temp: Path, into: Path, expected_size: int | None, dataset_digest: bool
) -> Copied:
    before = os.fstat(reader.fileno())
    if expected_size is not None and before.st_size != expected_size:
        raise SourceProblem(f"has {before.st_size} bytes where {expected_size} were expected")
    whole = blake3()
    dataset = blake3() if dataset_digest else None
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise write_error(exc, into) from exc
    size = 0
    try:
        while True:
            try:
                chunk = reader.read(CHUNK)
            except OSError as exc:
                raise SourceProblem(f"cannot be read: {exc.strerror or exc}") from exc
            if not chunk:
                break
            whole.update(chunk)
            if dataset is not None:
                if size == 0:
                    try:
                        dataset.update(memoryview(chunk)[part10.dataset_offset(chunk) :])
                    except (ValueError, struct.error):
                        raise SourceProblem("is not a DICOM Part 10 file") from None
                else:
                    dataset.update(chunk)
            size += len(chunk)
            try:
                _write_all(fd, chunk)
            except OSError as exc:
                raise write_error(exc, into) from exc
        try:
            os.fsync(fd)
        except OSError as exc:
            raise write_error(exc, into) from exc
        # The read-back must come from the disk, not from the pages just written.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    after = os.fstat(reader.fileno())
    if size != before.st_size or (after.st_size, after.st_mtime_ns) != (
        before.st_size,
        before.st_mtime_ns,
    ):
        raise SourceProblem("changed while it was being copied")
    return Copied(size, whole.hexdigest(), dataset.hexdigest() if dataset is not None else None)
