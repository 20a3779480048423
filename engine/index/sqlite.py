"""The SQLite index through aiosqlite: WAL mode, one writer, batched transactions.

Two connections: the writer (one transaction per batch of the index stage, and
``write`` for the engine's other writers: stable studies, the forwarding queue) and
a reader (duplicate look-ups, stats). WAL lets the reader, and other
processes such as ``engine stats``, read while a batch commits.

``synchronous`` follows ``[storage] fsync``: FULL syncs the WAL at each commit
(an acknowledged instance survives a power cut), NORMAL leaves it to checkpoints
(it survives a crash of the engine, not of the machine).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import threading
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from engine.duplicates import Existing
from engine.errors import IndexDatabaseError
from engine.index import batch
from engine.index.base import CommitReport, Decide, InstanceRow, QuarantineRow
from engine.index.batch import STATS_SQL, chunks, select_sql, stats_from
from engine.index.dialect import SQLITE
from engine.index.reads import Connection, SQLiteReads

log = logging.getLogger(__name__)
T = TypeVar("T")

BUSY_TIMEOUT_MS = 60_000
# Batches committed on the loop's thread between two checkpoints of the WAL (on the
# writer's thread): SQLite's own checkpoint, every 1000 pages, would run inside a
# commit, and with it its syncs.
CHECKPOINT_EVERY = 256
# SQLite's own files beside a database.
COMPANIONS = ("-wal", "-shm", "-journal")


def schema_scripts() -> list[tuple[int, str]]:
    """(version, SQL) for every schema file, in order."""
    folder = resources.files("engine.index") / "schema"
    scripts = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            scripts.append((int(entry.name.split("_", 1)[0]), entry.read_text("utf-8")))
    return sorted(scripts)


SCHEMA_VERSION = schema_scripts()[-1][0]


def companion(path: Path, suffix: str) -> Path:
    """A file SQLite keeps beside the database ``path`` (``-wal``), or one named like it."""
    return Path(f"{path}{suffix}")


def remove_database(path: Path) -> None:
    """An SQLite database and its journal files."""
    for suffix in ("", *COMPANIONS):
        companion(path, suffix).unlink(missing_ok=True)


class SQLiteIndex:
    """The index: one writer thread, one reader connection.

    The writer is a plain ``sqlite3`` connection, used by one thread at a time (under
    ``_writing``). A batch's whole transaction (look-ups, inserts, recounts, commit)
    runs in one go: on the loop's own thread when the commit does not wait for the
    disk (synchronous NORMAL: fsync off, or the storage area's one flush per batch,
    which then runs on a thread), else on the writer's thread in a single hand-off.
    A batch takes 0.1-0.3 ms of SQL; a hand-off to a thread and back cost about 1 ms
    under load (the loop, busy with the sockets, sees the result late). The other
    writers (stable studies, the forwarding queue, checkpoints) use the writer's
    thread. Reads (duplicate look-ups, stats) go through aiosqlite.
    """

    dialect = SQLITE

    def __init__(self, path: Path, durable: bool, flush: Callable[[], None] | None = None) -> None:
        """``durable``: a commit is on disk when it returns (SQLite's synchronous=FULL).

        ``flush``: the caller makes commits durable instead: it is called on a thread
        after each COMMIT (the storage area's one ``syncfs`` per batch, which also covers
        the WAL), and SQLite itself does not sync (NORMAL).
        """
        self.path = path
        self.durable = durable
        self.flush = flush
        self._writer: sqlite3.Connection | None = None
        self._write_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._reader: aiosqlite.Connection | None = None
        self._quick: sqlite3.Connection | None = None
        self._writing = threading.Lock()  # the writer connection is in use
        # Commit batches on the loop's thread (see the class docstring).
        self.inline = not durable or flush is not None
        self._since_checkpoint = 0
        self._checkpoint: asyncio.Future[None] | None = None
        # The batch's flush after an inline commit: one thread, so flushes never overlap
        # (one running already covers most of what a second one would flush).
        self._flush_thread = concurrent.futures.ThreadPoolExecutor(1, "index-flush")

    @property
    def location(self) -> str:
        """Where the index is, for log lines."""
        return str(self.path)

    @property
    def reads(self) -> SQLiteReads:
        """Read-only connections for worker threads (queries, metrics)."""
        return SQLiteReads(self.path)

    # -- lifecycle ----------------------------------------------------------------

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_thread = concurrent.futures.ThreadPoolExecutor(1, "index-writer")
        try:
            self._writer = await self._on_writer(self._connect_writer)
            await self._on_writer(self._migrate)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            for pragma in self._pragmas():
                await self._reader.execute(pragma)
            # Look-ups on the loop's own thread, for the hot path: a read by primary key
            # in WAL mode takes microseconds, less than a hand-off to a thread. It never
            # waits for a lock (busy_timeout 0): when busy, the caller uses ``lookup``.
            self._quick = sqlite3.connect(self.path, isolation_level=None)
            self._quick.execute("PRAGMA busy_timeout = 0")
            self._quick.execute("PRAGMA query_only = ON")
        except sqlite3.Error as exc:
            await self.close()
            raise IndexDatabaseError(f"cannot open the index {self.path}: {exc}") from exc

    def _pragmas(self) -> list[str]:
        return [
            f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
            "PRAGMA journal_mode = WAL",
            f"PRAGMA synchronous = {'FULL' if self.durable and not self.flush else 'NORMAL'}",
            "PRAGMA foreign_keys = OFF",  # batches insert parents first; no cost
        ]

    def _connect_writer(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in self._pragmas():
            db.execute(pragma)
        if self.inline:
            db.execute("PRAGMA wal_autocheckpoint = 0")  # ours: ``_checkpoint_wal``
        return db

    async def _on_writer(self, fn: Callable[..., T], *args: Any) -> T:
        if self._write_thread is None:
            raise IndexDatabaseError("the index is not open")
        return await asyncio.get_running_loop().run_in_executor(self._write_thread, fn, *args)

    def _migrate(self) -> None:
        db = self.writer
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise IndexDatabaseError(
                f"the index {self.path} has schema version {version}; "
                f"this engine knows up to {SCHEMA_VERSION}"
            )
        for number, script in schema_scripts():
            if number > version:
                log.info("applying index schema version %d", number)
                db.executescript(
                    f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;"
                )

    async def close(self) -> None:
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
            self._checkpoint = None
        if self._quick is not None:
            self._quick.close()
            self._quick = None
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await self._on_writer(writer.close)
        if self._write_thread is not None:
            self._write_thread.shutdown(wait=True)
            self._write_thread = None
        self._flush_thread.shutdown(wait=True)

    @property
    def writer(self) -> sqlite3.Connection:
        if self._writer is None:
            raise IndexDatabaseError("the index is not open")
        return self._writer

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise IndexDatabaseError("the index is not open")
        return self._reader

    # -- reads --------------------------------------------------------------------

    async def lookup(self, sop_instance_uids: list[str]) -> dict[str, Existing]:
        found: dict[str, Existing] = {}
        for chunk in chunks(sop_instance_uids):
            rows = await self.reader.execute_fetchall(select_sql(len(chunk)), chunk)
            for uid, digest, path, _, _ in rows:
                found[uid] = Existing(digest, path)
        return found

    def lookup_now(self, sop_instance_uids: list[str]) -> dict[str, Existing] | None:
        """``lookup`` without leaving the loop's thread; None if the index is busy."""
        if self._quick is None:
            return None
        found: dict[str, Existing] = {}
        try:
            for chunk in chunks(sop_instance_uids):
                for uid, digest, path, _, _ in self._quick.execute(select_sql(len(chunk)), chunk):
                    found[uid] = Existing(digest, path)
        except sqlite3.OperationalError as exc:
            log.debug("quick look-up skipped: %s", exc)
            return None
        return found

    async def read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[Any]:
        """The rows of a SELECT, on the reader connection."""
        return list(await self.reader.execute_fetchall(sql, parameters))

    async def has_instances(self) -> bool:
        rows = await self.reader.execute_fetchall("SELECT EXISTS (SELECT 1 FROM instances)")
        return bool(next(iter(rows))[0])

    async def stats(self) -> dict[str, int]:
        return await read_stats(self.reader)

    async def paths(self, suffix: str = "") -> list[tuple[str, str]]:
        """(SOP Instance UID, path) of every instance whose path ends with ``suffix``;
        for the start-up consistency check."""
        rows = await self.reader.execute_fetchall("SELECT sop_instance_uid, path FROM instances")
        return [(uid, path) for uid, path in rows if path.endswith(suffix)]

    # -- writes (each one transaction: a batch on the loop if it can, else the thread) --

    async def commit_batch(
        self, rows: list[InstanceRow], quarantined: list[QuarantineRow], decide: Decide
    ) -> CommitReport:
        """Index a batch in one transaction, judging duplicates against what is stored.

        Rows are judged in order, each against the index as this transaction has
        left it, so two copies of one UID in the same batch are settled too.
        """
        report: CommitReport | None = None
        if self.inline and self._writing.acquire(blocking=False):
            db = self.writer
            try:  # on the loop's thread, if SQLite's lock is free too (never wait here)
                db.execute("PRAGMA busy_timeout = 0")
                if self._begin_now():
                    report = self._run(batch.commit, db, rows, quarantined, decide)
            finally:
                db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                self._writing.release()
        if report is None:
            return await self._on_writer(
                self._transaction, batch.commit, self.writer, rows, quarantined, decide
            )
        if self.flush is not None:
            # An OSError here: committed but not known to be on disk (as on the thread).
            await asyncio.get_running_loop().run_in_executor(self._flush_thread, self.flush)
        if self._since_checkpoint >= CHECKPOINT_EVERY and self._checkpoint is None:
            self._checkpoint = asyncio.ensure_future(self._on_writer(self._checkpoint_wal))
            self._checkpoint.add_done_callback(self._checkpointed)
        return report

    def _begin_now(self) -> bool:
        """BEGIN IMMEDIATE without waiting (busy_timeout is 0 meanwhile: the transaction
        never waits on the loop): False if another connection (another program) holds
        the write lock; the thread, which may wait, takes the batch."""
        try:
            self.writer.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:  # extended codes too
                raise
            log.debug("index busy; committing on the writer's thread")
            return False
        return True

    def _checkpoint_wal(self) -> None:
        """Copy the WAL into the database (PASSIVE: it never waits for readers)."""
        with self._writing:
            self._since_checkpoint = 0
            self.writer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _checkpointed(self, future: asyncio.Future[None]) -> None:
        self._checkpoint = None
        if not future.cancelled() and future.exception() is not None:
            log.warning("WAL checkpoint failed: %s", future.exception())

    async def write(self, body: Callable[[Connection], T]) -> T:
        """Run ``body(connection)`` as one transaction on the writer's thread.

        For the engine's other writers (stable studies, the forwarding queue): every
        change to the index goes through this one connection, between two batches.
        """
        return await self._on_writer(self._transaction, lambda: body(self.writer))

    async def forget(self, sop_instance_uids: list[str]) -> None:
        """Remove rows (whose files are gone) and recount their series and studies."""
        await self._on_writer(self._transaction, batch.forget, self.writer, sop_instance_uids)

    def _transaction(self, body: Callable[..., T], *args: Any) -> T:
        """One transaction on the writer's thread, then the flush (if any)."""
        with self._writing:
            self.writer.execute("BEGIN IMMEDIATE")
            result = self._run(body, *args)
            if self.inline and self._since_checkpoint >= CHECKPOINT_EVERY:
                self._since_checkpoint = 0
                self.writer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        if self.flush is not None:
            self.flush()  # an OSError here: committed but not known to be on disk
        return result

    def _run(self, body: Callable[..., T], *args: Any) -> T:
        """The rest of a transaction begun: ``body``, then COMMIT (ROLLBACK on error)."""
        db = self.writer
        try:
            result = body(*args)
            db.execute("COMMIT")
            self._since_checkpoint += 1  # commits since the last checkpoint (under _writing)
        except BaseException:
            try:
                if db.in_transaction:  # not after SQLite rolled back itself (a full disk)
                    db.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback failed")
            raise
        return result


async def read_stats(db: aiosqlite.Connection) -> dict[str, int]:
    async with db.execute(STATS_SQL) as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return stats_from(row)


async def stats_of(path: Path) -> dict[str, int]:
    """Counts from an index file, read-only; works while an engine writes to it."""
    if not path.exists():
        raise IndexDatabaseError(f"no index at {path}")
    uri = f"file:{path}?mode=ro"
    async with aiosqlite.connect(uri, uri=True) as db:
        await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        try:
            return await read_stats(db)
        except sqlite3.OperationalError as exc:  # e.g. no stable_at yet: an older schema
            raise IndexDatabaseError(
                f"cannot read the index {path}: {exc}; an index left by an older engine is"
                " upgraded when the engine starts"
            ) from exc
