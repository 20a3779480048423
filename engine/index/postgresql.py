"""The index on PostgreSQL through asyncpg: several engine nodes may share it.

The same design as the SQLite index (``engine/index/sqlite.py``): one writer per node,
a batch in one transaction, the same schema versions (the SQLite scripts in
PostgreSQL's types, ``engine/index/dialect.py``) and the same SQL (``batch.py``,
``forward_queue.py``, the query planner), turned into PostgreSQL's form in one place.

Connections:

- the writer: its own connection, on a thread of its own with a private event loop.
  Every change to the index (batches, stable studies, the forwarding queue) runs
  there as blocking code over a small DB-API facade (``SyncConnection``): the same
  functions as on SQLite, no second copy for an async driver.
- a pool (``[index] pool_size``) on the engine's loop for duplicate look-ups, stats
  and the reads of worker threads (``reads``: C-FIND, C-MOVE, QIDO-RS, WADO-RS).

Between nodes, a batch takes transaction-level advisory locks on the instances,
studies and patients it touches (in one order: no deadlock between batches), so
the database decides duplicates across nodes; claims of stable studies and forwards
skip rows another node holds (``FOR UPDATE SKIP LOCKED``).

Durability follows ``[storage] fsync`` like SQLite's ``synchronous``: on, a commit
returns once PostgreSQL has it on disk (``synchronous_commit = on``); off, PostgreSQL
may write its last commits late (``off``; a crash of PostgreSQL's machine, not of the
engine, can lose them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import os
import re
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import asyncpg
import uvloop

from engine.duplicates import Existing
from engine.errors import IndexDatabaseError
from engine.index import batch
from engine.index.base import CommitReport, Decide, InstanceRow, QuarantineRow
from engine.index.batch import STATS_SQL, stats_from
from engine.index.dialect import POSTGRESQL
from engine.index.reads import Connection
from engine.index.sqlite import SCHEMA_VERSION, schema_scripts

log = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds a statement may take before it is given up (a lost server, a stuck lock).
COMMAND_TIMEOUT = 120.0
CONNECT_TIMEOUT = 30.0
# The advisory lock held while a node applies schema versions (others wait).
MIGRATION_LOCK = 0x656E67696E65  # "engine"
_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)"
_RETURNS_ROWS = re.compile(r"^\s*(SELECT|WITH|VALUES)\b|\bRETURNING\b", re.IGNORECASE)
# Errors a transaction is tried again after (another node's lock order, a lost race).
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})
RETRIES = 5
DISK_FULL_SQLSTATE = "53100"


def safe_url(url: str) -> str:
    """The URL without a password, for log lines."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def lock_id(key: str) -> int:
    """A signed 64-bit advisory lock id for a text key."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@functools.lru_cache(maxsize=1024)
def _translated(sql: str) -> tuple[str, bool]:
    return POSTGRESQL.sql(sql), bool(_RETURNS_ROWS.search(sql))


def _rowcount(status: str) -> int:
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else -1


class SyncCursor:
    """The rows of one statement, read already."""

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self._next = 0
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        if self._next >= len(self._rows):
            return None
        row = self._rows[self._next]
        self._next += 1
        return row

    def fetchall(self) -> list[Any]:
        rows = self._rows[self._next :]
        self._next = len(self._rows)
        return rows

    def __iter__(self) -> Iterator[Any]:
        while (row := self.fetchone()) is not None:
            yield row

    def close(self) -> None:
        self._next = len(self._rows)


class SyncConnection:
    """An asyncpg connection seen as a blocking DB-API connection (SQLite's SQL in).

    ``run`` drives one coroutine to its end from the calling thread: the writer's
    private loop, or the engine's loop for a worker thread. Database errors come out
    as ``IndexDatabaseError`` (``sqlstate`` kept), like a lost server.
    """

    def __init__(
        self, connection: asyncpg.Connection, run: Callable[[Awaitable[Any]], Any]
    ) -> None:
        self.connection = connection
        self._run = run
        self._begin = False

    def begin(self) -> None:
        """Start a transaction with the next statement (one round trip less when that
        statement goes by ``script``)."""
        self._begin = True

    def script(self, sql: str) -> None:
        """Statements without parameters or rows, in one round trip (PostgreSQL's own SQL)."""
        if self._begin:
            sql, self._begin = f"BEGIN; {sql}", False
        try:
            self._run(self.connection.execute(sql))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise _database_error(exc) from exc

    def _begun(self) -> None:
        if self._begin:
            self.script("BEGIN")

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> SyncCursor:
        self._begun()
        text, returns_rows = _translated(sql)
        try:
            if returns_rows:
                rows = self._run(self.connection.fetch(text, *parameters))
                return SyncCursor(rows, len(rows))
            status = self._run(self.connection.execute(text, *parameters))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise _database_error(exc) from exc
        return SyncCursor([], _rowcount(status or ""))

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> None:
        rows = [tuple(p) for p in parameters]
        if not rows:
            return
        self._begun()
        text, _ = _translated(sql)
        try:
            self._run(self.connection.executemany(text, rows))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise _database_error(exc) from exc


class DatabaseError(IndexDatabaseError):
    """A PostgreSQL error, with its SQLSTATE ("" when the connection itself failed)."""

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _database_error(exc: BaseException) -> DatabaseError:
    sqlstate = str(getattr(exc, "sqlstate", "") or "")
    return DatabaseError(f"PostgreSQL: {exc}", sqlstate)


def is_disk_full(exc: BaseException) -> bool:
    return getattr(exc, "sqlstate", None) == DISK_FULL_SQLSTATE


def advisory_lock(db: Connection, keys: Iterable[str]) -> None:
    """Transaction locks on ``keys``, taken in one order by every node (a SELECT list is
    evaluated left to right). The ids are integers this code computed: written into the
    statement, it goes with the transaction's BEGIN in one round trip."""
    ids = sorted({lock_id(key) for key in keys})
    if not ids:
        return
    locks = "SELECT " + ", ".join(f"pg_advisory_xact_lock({n})" for n in ids)
    if isinstance(db, SyncConnection):
        db.script(locks)
    else:
        db.execute(locks)


async def _apply(connection: asyncpg.Connection, script: str, version: int) -> None:
    """One schema version, in one transaction with its number."""
    async with connection.transaction():
        await connection.execute(script)
        await connection.execute("DELETE FROM schema_version")
        await connection.execute("INSERT INTO schema_version (version) VALUES ($1)", version)


class PgReads:
    """Read connections from the pool, for worker threads (never the loop's own)."""

    dialect = POSTGRESQL

    def __init__(self, index: PostgresIndex) -> None:
        self.index = index

    @contextlib.contextmanager
    def connect(self) -> Iterator[Connection]:
        loop, pool = self.index.loop, self.index.pool
        if threading.get_ident() == self.index.loop_thread:
            raise RuntimeError("PgReads.connect is for worker threads, not the event loop")

        def run(work: Awaitable[Any]) -> Any:
            async def wrapped() -> Any:
                return await work

            return asyncio.run_coroutine_threadsafe(wrapped(), loop).result(COMMAND_TIMEOUT)

        try:
            connection = run(pool.acquire(timeout=CONNECT_TIMEOUT))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise _database_error(exc) from exc
        try:
            yield SyncConnection(connection, run)
        finally:
            run(pool.release(connection))


class PostgresIndex:
    """The index on a PostgreSQL server; the interface of ``SQLiteIndex``."""

    dialect = POSTGRESQL

    def __init__(
        self,
        url: str,
        durable: bool,
        flush: Callable[[], None] | None = None,
        *,
        password_env: str = "ENGINE_INDEX_PASSWORD",
        pool_size: int = 4,
    ) -> None:
        self.url = url
        self.durable = durable
        self.flush = flush
        self.password = os.environ.get(password_env) or None
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread = 0
        self._write_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._writer_loop: asyncio.AbstractEventLoop | None = None
        self._writer: asyncpg.Connection | None = None

    @property
    def location(self) -> str:
        return safe_url(self.url)

    @property
    def reads(self) -> PgReads:
        return PgReads(self)

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise IndexDatabaseError("the index is not open")
        return self._pool

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise IndexDatabaseError("the index is not open")
        return self._loop

    # -- lifecycle ----------------------------------------------------------------

    async def _setup(self, connection: asyncpg.Connection) -> None:
        await connection.execute(
            f"SET synchronous_commit = {'on' if self.durable else 'off'}"
        )

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                password=self.password,
                min_size=1,
                max_size=self.pool_size,
                command_timeout=COMMAND_TIMEOUT,
                timeout=CONNECT_TIMEOUT,
                init=self._setup,
            )
            self._write_thread = concurrent.futures.ThreadPoolExecutor(1, "index-writer")
            await self._on_writer(self._connect_writer)
            await self._on_writer(self._migrate)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            await self.close()
            raise IndexDatabaseError(f"cannot open the index {self.location}: {exc}") from exc
        except BaseException:
            await self.close()
            raise

    def _connect_writer(self) -> None:
        """On the writer's thread: its loop and connection."""
        if self._writer_loop is None:
            # uvloop: each statement is a few turns of this loop; the default loop's
            # turns cost several times more CPU.
            self._writer_loop = uvloop.new_event_loop()
        loop = self._writer_loop

        async def connect() -> asyncpg.Connection:
            connection = await asyncpg.connect(
                self.url,
                password=self.password,
                command_timeout=COMMAND_TIMEOUT,
                timeout=CONNECT_TIMEOUT,
            )
            await self._setup(connection)
            return connection

        self._writer = loop.run_until_complete(connect())

    def _sync_writer(self) -> SyncConnection:
        """The writer as a blocking connection (on the writer's thread); reconnects a
        connection the server dropped."""
        if self._writer is None or self._writer.is_closed():
            log.warning("index writer: connecting to %s again", self.location)
            try:
                self._connect_writer()
            except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
                raise _database_error(exc) from exc
        assert self._writer is not None and self._writer_loop is not None
        return SyncConnection(self._writer, self._writer_loop.run_until_complete)

    async def _on_writer(self, fn: Callable[..., T], *args: Any) -> T:
        if self._write_thread is None:
            raise IndexDatabaseError("the index is not open")
        return await asyncio.get_running_loop().run_in_executor(self._write_thread, fn, *args)

    def _migrate(self) -> None:
        db = self._sync_writer()
        db.execute("SELECT pg_advisory_lock(?)", (MIGRATION_LOCK,))
        try:
            db.execute(_VERSION_TABLE)
            row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            version = int(row[0]) if row and row[0] is not None else 0
            if version > SCHEMA_VERSION:
                raise IndexDatabaseError(
                    f"the index {self.location} has schema version {version}; "
                    f"this engine knows up to {SCHEMA_VERSION}"
                )
            for number, script in schema_scripts():
                if number > version:
                    log.info("applying index schema version %d", number)
                    assert self._writer_loop is not None and self._writer is not None
                    self._writer_loop.run_until_complete(
                        _apply(self._writer, POSTGRESQL.ddl(script), number)
                    )
        finally:
            db.execute("SELECT pg_advisory_unlock(?)", (MIGRATION_LOCK,))

    async def close(self) -> None:
        if self._write_thread is not None:
            with contextlib.suppress(Exception):
                await self._on_writer(self._close_writer)
            self._write_thread.shutdown(wait=True)
            self._write_thread = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), CONNECT_TIMEOUT)

    def _close_writer(self) -> None:
        loop = self._writer_loop
        if self._writer is not None and loop is not None:
            with contextlib.suppress(Exception):
                loop.run_until_complete(self._writer.close(timeout=CONNECT_TIMEOUT))
        self._writer = None
        if loop is not None:
            loop.close()
            self._writer_loop = None

    # -- reads --------------------------------------------------------------------

    async def read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[Any]:
        text, _ = _translated(sql)
        try:
            return list(await self.pool.fetch(text, *parameters))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise _database_error(exc) from exc

    async def lookup(self, sop_instance_uids: list[str]) -> dict[str, Existing]:
        if not sop_instance_uids:
            return {}
        rows = await self.read(
            "SELECT sop_instance_uid, digest, path FROM instances"
            " WHERE sop_instance_uid = ANY(?::text[])",
            (list(dict.fromkeys(sop_instance_uids)),),
        )
        return {uid: Existing(digest, path) for uid, digest, path in rows}

    def lookup_now(self, sop_instance_uids: list[str]) -> dict[str, Existing] | None:
        """No look-up without a round trip to the server: always ``lookup``."""
        return None

    async def has_instances(self) -> bool:
        rows = await self.read("SELECT EXISTS (SELECT 1 FROM instances)")
        return bool(rows[0][0])

    async def stats(self) -> dict[str, int]:
        rows = await self.read(STATS_SQL)
        return stats_from(rows[0])

    async def paths(self, suffix: str = "") -> list[tuple[str, str]]:
        """(SOP Instance UID, path) of every instance whose path ends with ``suffix``
        (a node's own files: ``.<node>.dcm``)."""
        if not suffix:
            rows = await self.read("SELECT sop_instance_uid, path FROM instances")
        else:
            pattern = POSTGRESQL.pattern("*" + suffix)
            rows = await self.read(
                "SELECT sop_instance_uid, path FROM instances WHERE path LIKE ?", (pattern,)
            )
        return [(uid, path) for uid, path in rows]

    # -- writes (each one transaction on the writer's thread) ----------------------

    async def commit_batch(
        self, rows: list[InstanceRow], quarantined: list[QuarantineRow], decide: Decide
    ) -> CommitReport:
        return await self._on_writer(
            self._transaction,
            lambda db: batch.commit(db, rows, quarantined, decide, advisory_lock),
        )

    async def write(self, body: Callable[[Connection], T]) -> T:
        """Run ``body(connection)`` as one transaction on the writer's thread."""
        return await self._on_writer(self._transaction, body)

    async def forget(self, sop_instance_uids: list[str]) -> None:
        await self._on_writer(
            self._transaction, lambda db: batch.forget(db, sop_instance_uids, advisory_lock)
        )

    def _transaction(self, body: Callable[[Connection], T]) -> T:
        """``body`` in one transaction; tried again after a deadlock or serialization
        failure between nodes (nothing of a failed attempt stays)."""
        for attempt in range(1, RETRIES + 1):
            db = self._sync_writer()
            db.begin()
            try:
                result = body(db)
                db.execute("COMMIT")
            except BaseException as exc:
                try:
                    db.execute("ROLLBACK")
                except IndexDatabaseError:
                    log.debug("rollback after a failed transaction failed too")
                if getattr(exc, "sqlstate", None) in _RETRY_SQLSTATES and attempt < RETRIES:
                    log.warning("index transaction tried again (%s)", exc)
                    continue
                raise
            if self.flush is not None:
                self.flush()
            return result
        raise AssertionError("unreachable")  # pragma: no cover


async def stats_of(url: str, password_env: str = "ENGINE_INDEX_PASSWORD") -> dict[str, int]:
    """Counts from a PostgreSQL index, read-only; works while engines write to it."""
    try:
        connection = await asyncpg.connect(
            url, password=os.environ.get(password_env) or None, timeout=CONNECT_TIMEOUT
        )
    except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
        raise IndexDatabaseError(f"cannot reach the index {safe_url(url)}: {exc}") from exc
    try:
        row = await connection.fetchrow(POSTGRESQL.sql(STATS_SQL))
    except asyncpg.PostgresError as exc:
        raise IndexDatabaseError(
            f"cannot read the index {safe_url(url)}: {exc}; an index left by an older engine"
            " is upgraded when the engine starts"
        ) from exc
    finally:
        await connection.close()
    return stats_from(row)
