"""Datasets written to disk while their fragments arrive: the native transport's spool.

A C-STORE's dataset comes as P-DATA fragments. Instead of holding them until the
last one and then hashing and writing the whole dataset, the association hands
each batch of fragments to the ``Spooler``, which appends them to a temp file in the
storage folder's ``.incoming`` (after the Part 10 header) and feeds the digest, on
the loop itself or on a spool thread. When the last fragment arrives, only the tail
is left to write (and, with fsync on, the file to sync): the file is ready nearly as
soon as the data is.

- With ``threads = 0`` (the default on a local disk) the event loop itself writes and
  hashes each read's fragments as they come (one small thread only creates the empty
  temp files ahead, ``LOOP_SPARE_FILES``): a write into the page cache costs less
  than waking a thread for it, and every hand-off between threads costs two context
  switches and a wait for the GIL (on a 2-core VM about a third of the engine's CPU
  went to them). With threads, they do the I/O and the hashing, which release the GIL
  (for a NAS, where a write may block for milliseconds).
- One dataset's jobs all go to one thread, in order; datasets are spread over the
  threads.
- Memory per dataset is what is queued and not yet written (``pending``); the
  association stops reading from its socket past its limit and resumes when the
  spool has caught up (``on_drained``).
- The first ``HEAD_BYTES`` of the dataset are also kept in memory, for the header
  parse; everything after them is only on disk.
- The temp file belongs to the spool until ``finish`` hands it over as ``Spooled``
  (the pipeline then renames it into place, quarantines it or removes it), or
  ``discard`` removes it. A start-up clears ``.incoming`` of anything left.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import functools
import itertools
import logging
import os
import queue
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from engine import digest
from engine.storage import part10

log = logging.getLogger(__name__)

# Dataset bytes kept in memory for the header parse (the attributes before the pixel
# data of a CT or MR fit in a few KB; a larger header is read back from the file).
HEAD_BYTES = 64 * 1024
# Empty temp files each spool thread keeps ready.
SPARE_FILES = 2
# ... and the thread that only makes them, when the loop writes (one per association
# starting a dataset at once, for a few).
LOOP_SPARE_FILES = 8

Job = Callable[[], None]


@dataclass(frozen=True, slots=True)
class Spooled:
    """A dataset complete on disk: ``temp`` holds the Part 10 header, then the dataset."""

    temp: Path
    header_length: int  # 0 when no Part 10 header could be built (broken UIDs)
    size: int  # dataset bytes after the header
    digest: str  # of the dataset bytes (``engine/digest.py``)
    head: bytes  # the first dataset bytes (all of them for a small dataset)
    synced: bool  # fsynced (with [storage] fsync on)
    early: object = None  # what the spooler's ``inspect`` said of the head, if anything

    def read_dataset(self) -> bytes:
        """The whole dataset, read back (for a header longer than ``head``)."""
        with open(self.temp, "rb") as fh:
            fh.seek(self.header_length)
            return fh.read()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.temp.unlink(missing_ok=True)


def _nothing() -> None:
    """A job that only wakes a worker (to make spare files)."""


def _create(incoming: Path) -> tuple[int, Path]:
    """A new empty temp file in ``incoming``."""
    path = incoming / f"{uuid.uuid4().hex}.part"
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), path


class _Worker:
    """One thread running spool jobs in order.

    When it has nothing to do it creates the next temp files in advance
    (``SPARE_FILES``): creating a file costs a directory update, about 20 us on a
    quiet local disk but a millisecond on a busy one or a round trip on a NAS, and
    at C=1 the scanner waits for everything done after its command arrives.
    """

    def __init__(self, name: str, incoming: Path, spares: int = SPARE_FILES) -> None:
        self.incoming = incoming
        self.spares = spares
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.spare: collections.deque[tuple[int, Path]] = collections.deque()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def create(self) -> tuple[int, Path]:
        """A new empty temp file: a spare one if there is one, else made now."""
        while self.spare:
            fd, path = self.spare.popleft()
            if os.fstat(fd).st_nlink:
                return fd, path
            os.close(fd)  # removed under us (someone cleared .incoming): make a new one
        return _create(self.incoming)

    def take(self) -> tuple[int, Path]:
        """``create`` from another thread (the loop's). Once half the spares are taken,
        the thread is woken to make them again, all in one go (a wake-up per file cost
        the loop 5% of its throughput at four associations)."""
        made = self.create()
        if len(self.spare) <= self.spares // 2:
            self.jobs.put(_nothing)
        return made

    def _run(self) -> None:
        while True:
            if len(self.spare) < self.spares and self.jobs.empty():
                try:
                    self.spare.append(_create(self.incoming))
                    continue
                except OSError as exc:  # a full or read-only disk: jobs will say so
                    log.debug("cannot create a spare temp file: %s", exc)
            job = self.jobs.get()
            if job is None:
                break
            try:
                job()
            except Exception:  # jobs record their own errors; this is a bug
                log.exception("spool job failed")
        while self.spare:
            fd, path = self.spare.popleft()
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()


class SpoolFile:
    """One dataset being spooled. Methods are called on the loop's thread.

    With spool threads each hand-off wakes one, so there are few: the first ``add``
    also opens the file, the one that completes ``HEAD_BYTES`` also parses the header,
    and ``finish`` takes the last fragments with it. Without, the same jobs run at once.
    """

    def __init__(
        self,
        spooler: Spooler,
        worker: _Worker | None,
        header: Callable[[], bytes],
        transfer_syntax: str,
    ) -> None:
        self._spooler = spooler
        self._worker = worker
        self._loop = spooler.loop
        self._header = header
        self._transfer_syntax = transfer_syntax
        self._inspected = False  # (loop) a parse of the head is queued
        self._early: object = None
        self.temp: Path | None = None  # set on the worker's thread when opened
        self._fd = -1
        self._hash = digest.hasher()
        self._header_length = 0
        self._offset = 0  # dataset bytes written so far (worker thread)
        self._size = 0
        self._head: list[memoryview] = []
        self._head_size = 0
        self._error: OSError | None = None
        # Bytes queued by the loop and bytes written by the thread: each side writes
        # only its own counter, so no lock is needed to read the difference.
        self._queued = 0
        self._written = 0
        self.on_drained: Callable[[], None] | None = None
        self.low_water = 0
        spooler.active += 1

    @property
    def pending(self) -> int:
        """Bytes handed to the spool and not yet written."""
        return self._queued - self._written

    def add(self, parts: list[memoryview]) -> None:
        """Append fragments (views of received chunks, kept until written)."""
        size = self._take(parts)
        # Start the disk writes early only for a lone dataset (a scanner waiting for
        # each answer): with several arriving at once, the batch's one flush overlaps
        # the others' arrival anyway, and the early starts only cost CPU.
        writeback = self._spooler.writeback and self._spooler.active == 1
        head = None
        if self._head_size >= HEAD_BYTES and not self._inspected:
            # The header is (nearly always) here: parse it while the pixels arrive.
            self._inspected = True
            head = self._head_bytes()
        if self._worker is None:
            self._write(parts, size, head, writeback)
        else:
            self._worker.jobs.put(lambda: self._write(parts, size, head, writeback))

    def _take(self, parts: list[memoryview]) -> int:
        size = 0
        for part in parts:
            size += len(part)
            if self._head_size < HEAD_BYTES:
                self._head.append(part[: HEAD_BYTES - self._head_size])
                self._head_size += len(self._head[-1])
        self._queued += size
        self._size += size
        return size

    def _head_bytes(self) -> bytes:
        head = b"".join(self._head)  # at most HEAD_BYTES: the parts were cut to fit
        self._head = [memoryview(head)]
        return head

    def finish(self, parts: list[memoryview] | None = None) -> asyncio.Future[Spooled]:
        """The dataset is complete (``parts``: its last fragments): the future gets the
        file once it is written (and synced)."""
        size = self._take(parts or [])
        # The tail's pages start for the disk at once too, for a lone dataset: the batch's
        # flush, a few hundred microseconds later, then finds them written or on their way.
        writeback = self._spooler.writeback and self._spooler.active == 1
        self._spooler.active -= 1
        future: asyncio.Future[Spooled] = self._loop.create_future()
        head = self._head_bytes()
        self._head.clear()
        inspect = not self._inspected
        self._inspected = True
        job = functools.partial(self._finish, parts or [], size, head, inspect, future, writeback)
        if self._worker is None:
            job()
        else:
            self._worker.jobs.put(job)
        return future

    def discard(self) -> None:
        """The dataset will not complete (the peer left or aborted): remove the file."""
        self._spooler.active -= 1
        self._head.clear()
        if self._worker is None:
            self._discard()
        else:
            self._worker.jobs.put(self._discard)

    # -- on the worker thread (or the loop's, without workers) --------------------------

    def _resolve(self, callback: Callable[..., None], *args: object) -> None:
        if self._worker is None:
            callback(*args)
        else:
            self._loop.call_soon_threadsafe(callback, *args)

    def _open(self) -> None:
        try:
            head = self._header()
        except Exception as exc:  # UIDs too broken for a file meta header: raw bytes
            log.debug("no Part 10 header: %s", exc)
            head = b""
        try:
            self._fd, self.temp = (
                self._worker.create()
                if self._worker is not None
                else self._spooler.spare_file()
            )
            _write_all(self._fd, head)
            self._header_length = len(head)
        except OSError as exc:
            self._error = exc

    def _write(
        self, parts: list[memoryview], size: int, head: bytes | None, writeback: bool
    ) -> None:
        if self.temp is None and self._error is None:
            self._open()
        try:
            # One buffer, one hash update, one write: each call into C releases and
            # retakes the GIL, and every retake may wait for the event loop.
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            self._hash.update(data)
            if self._error is None:
                _write_all(self._fd, data)
            if writeback and self._error is None and size:
                # Start writing these pages to the disk now, while the rest arrives: the
                # flush before the answer then has little left to wait for.
                _start_writeback(self._fd, self._header_length + self._offset, size)
            self._offset += size
        except OSError as exc:
            self._error = exc
        finally:
            self._written += size
            if self.on_drained is not None and self.pending <= self.low_water:
                callback, self.on_drained = self.on_drained, None
                self._resolve(callback)
        if head is not None:
            self._inspect(head, complete=False)

    def _inspect(self, head: bytes, complete: bool) -> None:
        inspect = self._spooler.inspect
        if inspect is None:
            return
        try:
            self._early = inspect(head, self._transfer_syntax, complete)
        except Exception:  # judged again, from the file, in the validate stage
            log.exception("early parse failed")

    def _finish(
        self,
        parts: list[memoryview],
        size: int,
        head: bytes,
        inspect: bool,
        future: asyncio.Future[Spooled],
        writeback: bool,
    ) -> None:
        self._write(parts, size, None, writeback)
        if inspect:  # not parsed yet: the head is all of a small dataset, or its start
            self._inspect(head, complete=len(head) == self._size)
        synced = False
        if self._error is None and self._spooler.fsync:
            try:
                os.fdatasync(self._fd)
                synced = True
            except OSError as exc:
                self._error = exc
        self._close()
        if self._error is not None:
            error = self._error
            self._discard()
            self._resolve(_fail, future, error)
            return
        assert self.temp is not None  # opened, or ``_error`` would be set
        spooled = Spooled(
            self.temp,
            self._header_length,
            self._size,
            self._hash.hexdigest(),
            head,
            synced,
            self._early,
        )
        self._resolve(_succeed, future, spooled)

    def _discard(self) -> None:
        self._close()
        if self.temp is not None:
            with contextlib.suppress(OSError):
                self.temp.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_SYNC_FILE_RANGE = _load_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2  # start writeback of dirty pages, do not wait (Linux)


def _start_writeback(fd: int, offset: int, size: int) -> None:
    if _SYNC_FILE_RANGE is not None and _SYNC_FILE_RANGE(fd, offset, size, SYNC_FILE_RANGE_WRITE):
        code = ctypes.get_errno()
        raise OSError(code, f"sync_file_range: {os.strerror(code)}")


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _succeed(future: asyncio.Future[Spooled], spooled: Spooled) -> None:
    if future.cancelled():
        spooled.discard()
    else:
        future.set_result(spooled)


def _fail(future: asyncio.Future[Spooled], error: OSError) -> None:
    if not future.cancelled():
        future.set_exception(error)


class Spooler:
    """The spool threads of one engine; ``open`` starts a dataset."""

    def __init__(
        self,
        incoming: Path,
        fsync: bool,
        threads: int,
        inspect: Callable[[bytes, str, bool], object] | None = None,
        writeback: bool = False,
    ) -> None:
        """``inspect(head, transfer_syntax, complete)`` runs (where the writes do) as soon as
        ``HEAD_BYTES`` of a dataset (or all of a smaller one) are here; its result is
        ``Spooled.early``. ``fsync``: sync each file when it is complete. ``writeback``:
        start writing pages to the disk as they are written (any durable setting: the
        flush that follows, per file or per batch, then waits for less)."""
        self.incoming = incoming
        self.fsync = fsync
        self.writeback = writeback and _SYNC_FILE_RANGE is not None
        self.active = 0  # datasets being received (loop thread)
        self.inspect = inspect
        self.loop = asyncio.get_running_loop()
        # No threads: every job runs on the loop's thread, when it is handed over; one
        # thread still makes the temp files ahead (a create may wait for the disk: 20 us
        # on a quiet one, seen at 1 ms for minutes after many files were deleted).
        self._workers = [_Worker(f"spool-{n}", incoming) for n in range(threads)]
        self._next = itertools.cycle(self._workers or [None])
        self._spares = (
            None if threads else _Worker("spool-spares", incoming, spares=LOOP_SPARE_FILES)
        )

    def spare_file(self) -> tuple[int, Path]:
        """An empty temp file for the loop's own writes."""
        return self._spares.take() if self._spares is not None else _create(self.incoming)

    def open(
        self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str
    ) -> SpoolFile:
        def header() -> bytes:
            return part10.header(sop_class_uid, sop_instance_uid, transfer_syntax, source_ae)

        return SpoolFile(self, next(self._next), header, transfer_syntax)

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        if self._spares is not None:
            self._spares.stop()
