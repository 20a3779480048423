"""The index a reindex replaces, read-only: what only it knew of each instance (when it
was received, from whom, its digest), read before the new index is built beside it."""

from __future__ import annotations

import enum
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from engine.backup.manifest import uri
from engine.errors import IndexDatabaseError
from engine.index.batch import chunks
from engine.index.sqlite import BUSY_TIMEOUT_MS, SCHEMA_VERSION, companion

log = logging.getLogger(__name__)

_KNOWN_COLUMNS = "sop_instance_uid, path, digest, received_at, calling_ae, called_ae, peer_ip"


class OldState(enum.StrEnum):
    NONE = "none"
    READ = "read"
    UNREADABLE = "unreadable"


@dataclass(frozen=True, slots=True)
class Known:
    """What the old index (or a journal entry) says of an instance and its file."""

    uid: str
    path: str
    digest: str
    received_at: float
    calling_ae: str
    called_ae: str
    peer_ip: str


class OldIndex:
    """The index being replaced, read-only: what only it knows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state = OldState.NONE
        self.problem = ""
        self.instances = 0
        self._db: sqlite3.Connection | None = None

    @classmethod
    def open(cls, path: Path) -> OldIndex:
        """Raises ``IndexDatabaseError`` for an index of a newer engine."""
        old = cls(path)
        if not path.exists():
            return old
        checkpoint(path)
        try:
            db = sqlite3.connect(uri(path, mode="ro"), uri=True, check_same_thread=False)
        except sqlite3.Error as exc:
            old.unreadable(exc)
            return old
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise IndexDatabaseError(
                    f"the index {path} has schema version {version}; this engine knows up to"
                    f" {SCHEMA_VERSION}: reindex with the engine that wrote it"
                )
            (old.instances,) = db.execute("SELECT COUNT(*) FROM instances").fetchone()
        except sqlite3.Error as exc:
            db.close()
            old.unreadable(exc)
            return old
        except BaseException:
            db.close()
            raise
        old._db = db
        old.state = OldState.READ
        return old

    def unreadable(self, exc: BaseException) -> None:
        log.warning("the old index %s cannot be read: %s", self.path, exc)
        self.state = OldState.UNREADABLE
        self.problem = str(exc)
        self.close()

    def known(self, uids: list[str]) -> dict[str, Known]:
        """What the old index says of these instances (nothing once it fails)."""
        found: dict[str, Known] = {}
        if self._db is None:
            return found
        try:
            for chunk in chunks(uids):
                marks = ", ".join("?" for _ in chunk)
                for row in self._db.execute(
                    f"SELECT {_KNOWN_COLUMNS} FROM instances WHERE sop_instance_uid IN ({marks})",
                    chunk,
                ):
                    uid, path, digest, received_at, calling, called, peer = row
                    found[uid] = Known(
                        uid,
                        str(path),
                        str(digest),
                        float(received_at),
                        calling or "",
                        called or "",
                        peer or "",
                    )
        except (sqlite3.Error, TypeError, ValueError) as exc:
            self.unreadable(exc)
            return {}
        return found

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def checkpoint(path: Path) -> None:
    """Move what the old index's write-ahead log holds into it (left by a crash), so
    that the index file alone is the whole old index when it is renamed aside."""
    wal = companion(path, "-wal")
    try:
        if not wal.exists() or wal.stat().st_size == 0:
            return
        db = sqlite3.connect(path)
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()
    except (OSError, sqlite3.Error) as exc:
        log.warning("cannot checkpoint the old index %s: %s", path, exc)
