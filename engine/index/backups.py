"""The ``backups`` table (schema version 3): one row per backup the running engine made.

Plain functions over a ``sqlite3`` connection: ``SQLiteIndex`` runs the writes on its
writer thread; ``summary_of`` reads an index file read-only for ``engine stats``.
The metrics gauge reads ``SELECT MAX(finished_at) FROM backups WHERE ok != 0`` (``LAST_GOOD_SQL``).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.index.reads import Connection

BUSY_TIMEOUT_MS = 60_000

LAST_GOOD_SQL = "SELECT MAX(finished_at) FROM backups WHERE ok != 0"
_LAST_SQL = (
    "SELECT started_at, finished_at, destination, ok, files_copied, bytes_copied, message"
    " FROM backups ORDER BY finished_at DESC, id DESC LIMIT 1"
)
_INSERT_SQL = (
    "INSERT INTO backups (started_at, finished_at, destination, ok, files_copied,"
    " bytes_copied, message) VALUES (?, ?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True, slots=True)
class BackupRecord:
    """One backup attempt: when, where, whether it succeeded and what it copied."""

    started_at: float
    finished_at: float
    destination: str
    ok: bool
    files_copied: int
    bytes_copied: int
    message: str


def insert(db: Connection, record: BackupRecord) -> None:
    db.execute(
        _INSERT_SQL,
        (
            record.started_at,
            record.finished_at,
            record.destination,
            int(record.ok),
            record.files_copied,
            record.bytes_copied,
            record.message,
        ),
    )


def last(db: Connection) -> BackupRecord | None:
    """The most recent attempt, good or not."""
    row = db.execute(_LAST_SQL).fetchone()
    if row is None:
        return None
    started, finished, destination, ok, files, nbytes, message = row
    return BackupRecord(
        started_at=float(started),
        finished_at=float(finished),
        destination=str(destination),
        ok=bool(ok),
        files_copied=int(files),
        bytes_copied=int(nbytes),
        message=str(message),
    )


def last_good_at(db: Connection) -> float | None:
    """When the last successful backup finished (seconds since the epoch), or None."""
    (value,) = db.execute(LAST_GOOD_SQL).fetchone()
    return None if value is None else float(value)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def summary(db: Connection, now: float | None = None) -> dict[str, Any] | None:
    """The last backup for ``engine stats``; None when none was ever recorded."""
    record = last(db)
    if record is None:
        return None
    now = time.time() if now is None else now
    good = last_good_at(db)
    return {
        "time": _iso(record.finished_at),
        "ok": record.ok,
        "age": round(now - record.finished_at),
        "last_ok_age": None if good is None else round(now - good),
        "destination": record.destination,
        "files_copied": record.files_copied,
        "bytes_copied": record.bytes_copied,
        "message": record.message,
    }


def summary_of(index_path: Path) -> dict[str, Any] | None:
    """``summary`` read from an index file, read-only (works while an engine writes to it).

    An index older than schema version 3 has no ``backups`` table: None.
    """
    db = sqlite3.connect(f"file:{index_path}?mode=ro", uri=True)
    try:
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        exists = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'backups'"
        ).fetchone()
        return summary(db) if exists else None
    finally:
        db.close()
