"""Write (the first stage's last step): Part 10 files into the storage area, journaled,
synced per batch.

All storage I/O runs in one order (``StorageThread``: its thread, or the loop for quick
work while nothing waits on the thread): writes, quarantine and removals happen in
order, so a removal can never race a rename of the same path.
``InFlight`` counts files written but not yet committed; the index stage
removes a file no row references only when no item in flight needs that path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from engine import status
from engine.model import Outcome, Received
from engine.stages.flow import Item
from engine.storage import part10
from engine.storage.area import SUFFIX, PendingFile, StorageArea, is_out_of_space
from engine.storage.spool import Spooled

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageThread:
    """Where storage work runs, one piece after the other: on a thread of its own, or
    (``inline``, for a local disk) on the event loop itself when the work is quick
    (``fast``: renames and appends take microseconds, less than a hand-off to a thread)
    and nothing is waiting on the thread, which keeps the order. Slow work (quarantine
    with its syncs, whole datasets held in memory, copies) always goes to the thread."""

    def __init__(self, inline: bool = False) -> None:
        self.inline = inline
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="storage")
        self._queued = 0  # work handed to the thread and not finished (loop thread only)

    async def run(self, fn: Callable[..., T], *args: Any, fast: bool = False) -> T:
        if self.inline and fast and not self._queued:
            return fn(*args)
        self._queued += 1
        future = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        future.add_done_callback(self._finished)  # when the thread is done, even if the
        return await future  # caller was cancelled meanwhile

    def _finished(self, _: asyncio.Future[Any]) -> None:
        self._queued -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class InFlight:
    """Files and journals between the write stage and the index commit (loop thread only).

    ``paths`` counts items being written or waiting for their rows, by path;
    ``journals`` counts the uncommitted items of each write batch's journal, which
    is removed only when all of them are committed.
    """

    def __init__(self) -> None:
        self.paths: Counter[str] = Counter()
        self.journals: Counter[str] = Counter()
        self.kept_journals: set[str] = set()  # a commit failed: leave them to recovery

    def claim(self, path: str) -> None:
        self.paths[path] += 1

    def release(self, path: str) -> None:
        self.paths[path] -= 1
        if self.paths[path] <= 0:
            del self.paths[path]

    def holds(self, path: str) -> bool:
        return path in self.paths

    def settle_journal(self, journal: str) -> bool:
        """One more item of this journal is committed; True when it was the last."""
        self.journals[journal] -= 1
        if self.journals[journal] > 0:
            return False
        del self.journals[journal]
        if journal in self.kept_journals:
            self.kept_journals.discard(journal)
            return False
        return True


def quarantine_note(received: Received, outcome: Outcome, reason: str) -> dict[str, Any]:
    origin = received.origin
    return {
        "reason": reason,
        "outcome": outcome.value,
        "status": f"0x{status.for_outcome(outcome):04X}",
        "sop_class_uid": received.sop_class_uid,
        "sop_instance_uid": received.sop_instance_uid,
        "transfer_syntax": received.transfer_syntax,
        "calling_ae": origin.calling_ae,
        "called_ae": origin.called_ae,
        "peer_ip": origin.peer_ip,
        "peer_port": origin.peer_port,
        "received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(received.received_at)),
        "size": received.size,
    }


def quarantine(storage: StorageArea, item: Item) -> None:
    """Keep a rejected item's bytes, as a Part 10 file when its header can be built."""
    assert item.rejection is not None
    received = item.received
    note = quarantine_note(received, item.rejection.outcome, item.rejection.message)
    spooled = received.spooled
    if spooled is not None and item.path is not None:
        # Refused by the index after its file was renamed into place: copy that file
        # (the index stage removes it, unless another item claims the path meanwhile).
        try:
            data = storage.absolute(item.path).read_bytes()
            item.quarantine_path = storage.quarantine((data,), note, SUFFIX)
        except OSError as exc:
            log.error("cannot quarantine %s: %s", received.sop_instance_uid, exc)
        _log_rejection(item)
        return
    if spooled is not None:  # the temp file already has the header, if one could be built
        try:
            suffix = ".dcm" if spooled.header_length else ".raw"
            item.quarantine_path = storage.quarantine(spooled.temp, note, suffix)
        except OSError as exc:
            log.error("cannot quarantine %s: %s", received.sop_instance_uid, exc)
            spooled.discard()
        _log_rejection(item)
        return
    try:
        head = part10.header(
            received.sop_class_uid,
            received.sop_instance_uid,
            received.transfer_syntax,
            received.origin.calling_ae,
        )
        chunks: tuple[bytes, ...] = (head, received.data)
        suffix = ".dcm"
    except Exception:  # UIDs too broken to write a file meta header: keep the raw bytes
        chunks, suffix = (received.data,), ".raw"
    try:
        item.quarantine_path = storage.quarantine(chunks, note, suffix)
    except OSError as exc:
        log.error("cannot quarantine %s: %s", received.sop_instance_uid, exc)
    _log_rejection(item)


def _log_rejection(item: Item) -> None:
    assert item.rejection is not None
    received = item.received
    log.warning(
        "rejected %s from %s (%s): %s",
        received.sop_instance_uid,
        received.origin.calling_ae,
        received.origin.peer_ip,
        item.rejection.message,
    )


def pending_file(storage: StorageArea, item: Item) -> PendingFile:
    validated = item.validated
    assert validated is not None
    received = validated.received
    origin = received.origin
    rel_path = item.path
    assert rel_path is not None
    journal_entry = {
        "path": rel_path,
        "sop_instance_uid": received.sop_instance_uid,
        "digest": validated.digest,
        "received_at": received.received_at,
        "calling_ae": origin.calling_ae,
        "called_ae": origin.called_ae,
        "peer_ip": origin.peer_ip,
    }
    if validated.spooled is not None:
        return PendingFile.spooled(rel_path, validated.spooled.temp, journal_entry)
    head = part10.header(
        received.sop_class_uid,
        received.sop_instance_uid,
        validated.payload_syntax,
        origin.calling_ae,
    )
    return PendingFile(
        rel_path=rel_path, chunks=(head, validated.payload), journal_entry=journal_entry
    )


def _headless(spooled: Spooled | None) -> bool:
    return spooled is not None and spooled.header_length == 0


def write_batch(storage: StorageArea, items: list[Item]) -> None:
    """Quarantine the rejected items, write the others; record results on the items."""
    writes: list[tuple[Item, PendingFile]] = []
    for item in items:
        if item.rejection is not None:
            if item.rejection.outcome.quarantines:
                quarantine(storage, item)
            else:
                item.received.discard()
        elif item.validated is not None and _headless(item.validated.spooled):
            log.error("no file meta header for %s", item.received.sop_instance_uid)
            item.reject(Outcome.PROCESSING_FAILURE, "no file meta header could be built")
            item.received.discard()
        elif item.path is not None:
            writes.append((item, pending_file(storage, item)))
        else:
            item.received.discard()
    journal = storage.write_batch([pending for _, pending in writes])
    for item, pending in writes:
        if pending.error is None:
            item.journal = journal
            spooled = item.validated.spooled if item.validated is not None else None
            if spooled is not None:
                item.size = spooled.header_length + spooled.size
            else:
                item.size = sum(len(chunk) for chunk in pending.chunks)
            continue
        outcome = (
            Outcome.OUT_OF_RESOURCES
            if is_out_of_space(pending.error)
            else Outcome.PROCESSING_FAILURE
        )
        log.error("cannot write %s: %s", pending.rel_path, pending.error)
        item.reject(outcome, f"cannot write the file: {pending.error.strerror or pending.error}")


async def process(
    batch: list[Item], storage: StorageArea, thread: StorageThread, in_flight: InFlight
) -> None:
    """Write a batch's files, quarantine its rejected items (the first stage's last step)."""
    # Claim the paths before the storage thread sees the batch: from here on
    # the index stage will not remove a file at these paths.
    for item in batch:
        if item.rejection is None and item.validated is not None:
            v = item.validated
            item.path = storage.instance_path(
                v.attributes["study_uid"], item.received.sop_instance_uid, v.digest, storage.node
            )
            in_flight.claim(item.path)
    # Quick enough for the loop: datasets already on disk (spooled), nothing to quarantine.
    fast = all(
        item.rejection is None and item.validated is not None and item.validated.spooled
        for item in batch
    )
    try:
        await thread.run(write_batch, storage, batch, fast=fast)
    except Exception as exc:  # a bug must not leave a scanner hanging
        log.exception("write stage failed")
        for item in batch:
            item.reject(Outcome.PROCESSING_FAILURE, f"internal error in the write stage: {exc!r}")
    for item in batch:
        if item.path is None:
            continue
        if item.journal is None:
            in_flight.release(item.path)  # not written
            item.path = None
        else:
            in_flight.journals[item.journal] += 1
