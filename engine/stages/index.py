"""The index stage: one writer, one transaction per batch; then every item is answered.

A success status leaves only after the batch's files are in place (and synced,
with fsync on) and its rows are committed. The index judges duplicates again
inside the transaction: it is the final word when two associations send the
same SOP Instance UID at once.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3

from engine import status
from engine.config import DuplicatePolicy
from engine.duplicates import Decision, decide
from engine.index.base import Decide, Index, InstanceRow, QuarantineRow
from engine.index.postgresql import is_disk_full
from engine.metrics import Metrics
from engine.model import Outcome, Result
from engine.stages.dedupe import DUPLICATE_MESSAGE, OUTCOME_OF
from engine.stages.flow import Item, Stop, take_batch
from engine.stages.write import InFlight, StorageThread, quarantine
from engine.storage.area import StorageArea, is_out_of_space

log = logging.getLogger(__name__)


def instance_row(item: Item) -> InstanceRow:
    v = item.validated
    assert v is not None and item.path is not None
    origin = item.received.origin
    return InstanceRow(
        attributes=v.attributes,
        transfer_syntax=v.payload_syntax,
        path=item.path,
        size=item.size,
        digest=v.digest,
        received_at=item.received.received_at,
        calling_ae=origin.calling_ae,
        called_ae=origin.called_ae,
        peer_ip=origin.peer_ip,
        header=v.header,
    )


def quarantine_row(item: Item) -> QuarantineRow:
    assert item.rejection is not None
    r = item.received
    return QuarantineRow(
        path=item.quarantine_path,
        outcome=item.rejection.outcome.value,
        status=status.for_outcome(item.rejection.outcome),
        reason=item.rejection.message,
        sop_class_uid=r.sop_class_uid,
        sop_instance_uid=r.sop_instance_uid,
        transfer_syntax=r.transfer_syntax,
        calling_ae=r.origin.calling_ae,
        called_ae=r.origin.called_ae,
        peer_ip=r.origin.peer_ip,
        received_at=r.received_at,
    )


class IndexStage:
    def __init__(
        self,
        index: Index,
        storage: StorageArea,
        thread: StorageThread,
        in_flight: InFlight,
        policy: DuplicatePolicy,
        metrics: Metrics,
    ) -> None:
        self.index = index
        self.metrics = metrics
        self.storage = storage
        self.thread = thread
        self.in_flight = in_flight
        self.decide: Decide = lambda existing, digest: decide(existing, digest, policy)
        self._cleanups: set[asyncio.Future[None]] = set()
        # SOP Instance UIDs of the batch being committed and flushed (dedupe.process).
        self.committing: set[str] = set()

    def _cleaned(self, task: asyncio.Future[None]) -> None:
        self._cleanups.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("clean-up after a commit failed", exc_info=task.exception())

    async def commit(self, batch: list[Item]) -> None:
        written = [i for i in batch if i.path is not None and i.rejection is None]
        refused = [i for i in batch if i.rejection is not None]
        quarantined = [i for i in refused if i.rejection and i.rejection.outcome.quarantines]
        try:
            rows = [instance_row(item) for item in written]
            self.committing = {row.sop_instance_uid for row in rows}
            try:
                report = await self.index.commit_batch(
                    rows, [quarantine_row(i) for i in quarantined], self.decide
                )
            finally:
                self.committing = set()
            self.metrics.quarantined.inc(len(quarantined))
        except Exception as exc:
            # Files stay, journals stay: the start-up recovery settles them. Nothing
            # here may delete a file another item could be committing right now.
            full = (
                getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                or is_disk_full(exc)
                or is_out_of_space(exc)
            )
            log.exception("index commit failed for a batch of %d", len(batch))
            outcome = Outcome.OUT_OF_RESOURCES if full else Outcome.PROCESSING_FAILURE
            for item in batch:
                if item.path is not None:
                    self.in_flight.release(item.path)
                    if item.journal is not None:
                        self.in_flight.kept_journals.add(item.journal)
                        self.in_flight.settle_journal(item.journal)
                item.resolve(Result(outcome, f"the index could not commit: {exc}"))
            return
        finished_journals: set[str] = set()
        for item in written:
            assert item.path is not None and item.journal is not None
            self.in_flight.release(item.path)
            if self.in_flight.settle_journal(item.journal):
                finished_journals.add(item.journal)
        duplicates: list[Item] = []
        for item, decision, existing in zip(
            written, report.decisions, report.existing, strict=True
        ):
            if decision is Decision.REJECT:
                item.reject(Outcome.DUPLICATE_REJECTED, DUPLICATE_MESSAGE)
                duplicates.append(item)
            elif decision in (Decision.SAME, Decision.KEEP) and existing is not None:
                item.resolve(Result(OUTCOME_OF[decision], "", existing.path))
            else:
                item.resolve(Result(OUTCOME_OF[decision], "", item.path))
        cleanup = self._clean_up(report.unreferenced, finished_journals, duplicates)
        if not duplicates:
            # Journal ends and removals wait in the storage order behind the next write
            # batch; the index stage goes on with its next batch meanwhile.
            self._cleanups.add(task := asyncio.ensure_future(cleanup))
            task.add_done_callback(self._cleaned)
            for item in refused:
                assert item.rejection is not None
                item.resolve(item.rejection)
            return
        await cleanup
        if duplicates:
            await self.index.commit_batch([], [quarantine_row(i) for i in duplicates], self.decide)
            self.metrics.quarantined.inc(len(duplicates))
        for item in refused + duplicates:
            assert item.rejection is not None
            item.resolve(item.rejection)

    async def _clean_up(
        self, unreferenced: list[str], journals: set[str], duplicates: list[Item]
    ) -> None:
        # Judged when the work is handed over, not at the commit: a write batch may have
        # claimed one of these paths since (and put its new file there). One claimed
        # later is written after this removal, in the storage thread's order.
        removable = [p for p in unreferenced if not self.in_flight.holds(p)]
        await self.thread.run(
            self._after_commit, removable, journals, duplicates, fast=not duplicates
        )

    def _after_commit(
        self, removable: list[str], journals: set[str], duplicates: list[Item]
    ) -> None:
        for item in duplicates:
            quarantine(self.storage, item)
        self.storage.remove(removable)
        for journal in journals:
            self.storage.end_journal(journal)

    async def run(self, inbox: asyncio.Queue[Item | Stop], batch_max: int) -> None:
        while True:
            batch, stop = await take_batch(inbox, batch_max)
            if batch:
                self.metrics.batch_size.observe(len(batch))
                try:
                    await self.commit(batch)
                except Exception as exc:  # a bug must not leave a scanner hanging
                    log.exception("index stage failed after the commit")
                    for item in batch:
                        item.resolve(Result(Outcome.PROCESSING_FAILURE, f"internal error: {exc!r}"))
            if stop:
                if self._cleanups:
                    await asyncio.gather(*self._cleanups, return_exceptions=True)
                return
