"""Reading the index from worker threads, whatever the backend.

The query services (C-FIND, C-MOVE, C-GET, QIDO-RS, WADO-RS) and the metrics are plain
blocking code run in worker threads. They read through ``Reads.connect()``: a
short-lived read-only connection with the DB-API surface they use (``execute`` with
``?`` parameters, a cursor with ``fetchone``/``fetchall``/iteration), and build their
SQL for ``Reads.dialect``. SQLite gives its own connection; PostgreSQL a pool connection
behind the same surface (``engine/index/postgresql.py``).

Errors: ``READ_ERRORS`` is what a read may raise (``sqlite3.Error``, and
``IndexDatabaseError`` from PostgreSQL or a lost server).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from engine.errors import IndexDatabaseError
from engine.index.dialect import SQLITE, Dialect

READ_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, IndexDatabaseError)
# How long a reader waits for SQLite's lock (seconds).
SQLITE_READ_TIMEOUT = 30.0


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...
    def close(self) -> None: ...


class Connection(Protocol):
    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...
    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any: ...


class Reads(Protocol):
    @property
    def dialect(self) -> Dialect: ...
    def connect(self) -> AbstractContextManager[Connection]: ...


class SQLiteReads:
    """Read-only connections to an index file (each opened for one use)."""

    dialect = SQLITE

    def __init__(self, path: Path, timeout: float = SQLITE_READ_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    @contextlib.contextmanager
    def connect(self) -> Iterator[Connection]:
        uri = f"file:{self.path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=self.timeout)) as db:
            yield db


def reads_of(source: Reads | Path) -> Reads:
    """A ``Reads``; a path stands for an SQLite index file."""
    return SQLiteReads(source) if isinstance(source, Path) else source
