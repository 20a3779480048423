"""Scheduled backups from the running engine: ``[backup] interval``.

One task, owned by ``engine serve``, runs the same backup as ``python -m engine backup``
in a thread of its own every ``interval`` seconds (counted from the start of the last
one, also across restarts), records each attempt in the index (``backups`` table, shown
by ``engine stats``), and logs a WARNING whenever the last good backup is older than
``warn_after``. At shutdown the backup in progress stops after the file it is copying
(what it copied is kept: the next one resumes) and is recorded as interrupted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from engine.backup.create import Backup, Source
from engine.backup.folder import SAME_DISK, same_filesystem
from engine.config import BackupConfig, Config
from engine.errors import BackupError
from engine.index import backups
from engine.index.backups import BackupRecord
from engine.index.base import Index
from engine.progress import LogProgress

log = logging.getLogger(__name__)


class Schedule:
    def __init__(
        self, settings: BackupConfig, destination: Path, source: Source, index: Index
    ) -> None:
        self.settings = settings
        self.destination = destination
        self.source = source
        self.index = index
        self.warn_after = settings.warn_after or 2 * settings.interval
        self._cancel = threading.Event()  # seen by the backup's thread between files
        self._stopping = asyncio.Event()
        self._began = time.time()

    def stop(self) -> None:
        self._cancel.set()
        self._stopping.set()

    async def run(self) -> None:
        try:
            await self._run()
        except Exception:  # a bug must not stop the engine: ingest goes on without backups
            log.exception("scheduled backups stopped by an internal error")

    async def _run(self) -> None:
        thread = concurrent.futures.ThreadPoolExecutor(1, "backup")
        try:
            last = await self.index.write(backups.last)
            due = time.time() if last is None else last.started_at + self.settings.interval
            log.info(
                "scheduled backups to %s every %gs; the next in %.0fs",
                self.destination,
                self.settings.interval,
                max(0.0, due - time.time()),
            )
            if same_filesystem(self.destination, self.source.storage):
                log.warning("%s", SAME_DISK)
            stale_since = await self._warn_if_stale()
            while True:
                # Wake for the next backup, or when the last good one becomes too old
                # (once for each last good one: each failed attempt warns again anyway).
                wake = due if stale_since is not None else min(due, await self._stale_at())
                if await self._sleep_until(wake):
                    return
                if time.time() < due:
                    stale_since = await self._warn_if_stale()
                    continue
                record = await self._back_up(thread)
                try:
                    await self.index.write(functools.partial(backups.insert, record=record))
                    stale_since = await self._warn_if_stale()
                except Exception:  # the index is closing, or a bug: ingest goes on
                    log.exception("cannot record the backup in the index")
                due = record.started_at + self.settings.interval
        finally:
            thread.shutdown(wait=True)

    async def _sleep_until(self, due: float) -> bool:
        """Wait until ``due``; True if the engine is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), max(0.0, due - time.time()))
        return self._stopping.is_set()

    async def _back_up(self, thread: concurrent.futures.ThreadPoolExecutor) -> BackupRecord:
        job = Backup(self.source, self.destination, LogProgress(log), self._cancel)
        message = ""
        try:
            await asyncio.get_running_loop().run_in_executor(thread, job.run)
        except BackupError as exc:
            message = str(exc)
        except Exception as exc:  # a bug must not stop the engine
            log.exception("backup to %s failed", self.destination)
            message = f"internal error: {exc!r}"
        ok = job.ok and not message
        message = message or job.message()
        if ok:
            log.info("backup to %s done: %s", self.destination, message)
        else:
            log.error("backup to %s failed: %s", self.destination, message)
        return BackupRecord(
            started_at=job.started_at,
            finished_at=job.finished_at or time.time(),
            destination=str(self.destination),
            ok=ok,
            files_copied=job.files_copied,
            bytes_copied=job.bytes_copied,
            message=message,
        )

    async def _last_good(self) -> float:
        """When the last good backup ended (or scheduled backups began, if none did)."""
        good = await self.index.write(backups.last_good_at)
        return good if good is not None else self._began

    async def _stale_at(self) -> float:
        return await self._last_good() + self.warn_after

    async def _warn_if_stale(self) -> float | None:
        """A WARNING if the last good backup is older than ``warn_after``; returns
        since when it has been stale (None: it is not)."""
        good = await self.index.write(backups.last_good_at)
        since = good if good is not None else self._began
        age = time.time() - since
        if age <= self.warn_after:
            return None
        if good is None:
            log.warning(
                "no good backup to %s yet, %.0fs after scheduled backups began"
                " ([backup] warn_after = %g)",
                self.destination,
                age,
                self.warn_after,
            )
        else:
            log.warning(
                "the last good backup is %.0fs old (finished %s; [backup] warn_after = %g)",
                age,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(good)),
                self.warn_after,
            )
        return since


@contextlib.asynccontextmanager
async def running(config: Config, index: Index) -> AsyncIterator[None]:
    """Scheduled backups while the body runs (nothing, with ``interval = 0``)."""
    settings = config.backup
    if settings.interval <= 0 or settings.destination is None:
        yield
        return
    schedule = Schedule(settings, settings.destination, Source.of(config), index)
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(schedule.run(), name="backup-schedule")
        try:
            yield
        finally:
            schedule.stop()
