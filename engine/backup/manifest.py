"""The manifest of a backup folder: what it holds, one row per file copied.

A SQLite file, ``manifest.sqlite``, table ``files``: ``path`` (relative to the backup
folder: ``storage/<path in the storage folder>``, ``index.sqlite``), ``size``, and
``blake3``, the digest of the whole file. A backup adds the rows of a batch of copies
in one transaction, after those files are synced in place: the manifest is updated as
the backup goes, each update atomic, so a backup stopped at any point (Ctrl-C, kill,
power cut) is resumed by running it again: the files listed are not copied again.

SQLite rather than a text file, because an archive holds millions of files: what a
backup lacks is found by a join with the index copy, streamed in chunks, without
holding either list in memory. Rollback journal and ``synchronous = FULL``, not WAL:
a backup folder is often a NAS mount, where WAL's shared memory does not work. The
digest of the index's instances is not the manifest's (see ``engine.backup``); the
index's own columns are joined in where they are needed.
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import BackupError

CHUNK = 1000
BUSY_TIMEOUT_MS = 60_000
FILES_PREFIX = "storage/"  # folder.FILES + "/"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path    TEXT PRIMARY KEY,   -- relative to the backup folder
    size    INTEGER NOT NULL,
    blake3  TEXT NOT NULL       -- of the whole file, hex
) WITHOUT ROWID;
"""
# The instances of an index (attached as ``idx``) and their manifest rows, if any.
_LISTED = f"""
SELECT i.path, i.size, i.digest, i.transfer_syntax, f.size, f.blake3
FROM idx.instances AS i LEFT JOIN files AS f ON f.path = '{FILES_PREFIX}' || i.path
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """A manifest row."""

    path: str
    size: int
    blake3: str


@dataclass(frozen=True, slots=True)
class InstanceFile:
    """An instance file an index names, and what the manifest says of it."""

    path: str  # relative to the storage folder
    size: int  # in the index
    digest: str  # of the dataset (engine/digest.py), in the index
    transfer_syntax: str
    listed: Entry | None  # the manifest's row: None when the backup lacks the file


class Manifest:
    """A manifest file, written by a backup, read by a verification or a restore."""

    def __init__(self, path: Path, db: sqlite3.Connection) -> None:
        self.path = path
        self.db = db

    @classmethod
    def open(cls, path: Path) -> Manifest:
        """For a backup, which holds the folder's lock: created if missing."""
        try:
            # URIs on: ``instances`` attaches an index read-only by URI.
            db = sqlite3.connect(uri(path), uri=True, isolation_level=None)
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = DELETE")
            db.execute("PRAGMA synchronous = FULL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise _error(exc, path) from exc
        return cls(path, db)

    @classmethod
    def read(cls, path: Path) -> Manifest | None:
        """For reading (verify, restore); None when there is no manifest.

        Opened read-write when the file allows it (SQLite falls back to read-only on
        read-only media), though nothing is written: a backup killed in the middle of a
        commit leaves a rollback journal that SQLite must play back before anyone reads.
        """
        if not path.is_file():
            return None
        try:
            db = sqlite3.connect(uri(path, mode="rw"), uri=True, isolation_level=None)
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("SELECT COUNT(*) FROM files").fetchone()
        except sqlite3.Error as exc:
            raise _error(exc, path) from exc
        return cls(path, db)

    def close(self) -> None:
        self.db.close()

    # -- reading ----------------------------------------------------------------------

    def get(self, path: str) -> Entry | None:
        row = self._one("SELECT path, size, blake3 FROM files WHERE path = ?", (path,))
        return None if row is None else Entry(str(row[0]), int(row[1]), str(row[2]))

    def totals(self) -> tuple[int, int]:
        """(files, bytes) listed."""
        totals = self._one("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files")
        return (int(totals[0]), int(totals[1])) if totals else (0, 0)

    def entries(self) -> Iterator[list[Entry]]:
        """Every row, by path, in chunks."""
        after = ""
        while True:
            rows = self._all(
                "SELECT path, size, blake3 FROM files WHERE path > ? ORDER BY path LIMIT ?",
                (after, CHUNK),
            )
            if not rows:
                return
            yield [Entry(str(p), int(s), str(d)) for p, s, d in rows]
            after = str(rows[-1][0])

    def check(self) -> str:
        """SQLite's quick_check of the manifest file: "ok" or what is wrong."""
        try:
            return str(self.db.execute("PRAGMA quick_check").fetchone()[0])
        except sqlite3.Error as exc:
            return str(exc)

    def instances(self, index_file: Path, missing_only: bool = False) -> Joined:
        """The instance files an index file names (one nobody writes to: a snapshot, a
        backup's index), with their manifest rows; ``missing_only``: those the manifest
        does not list. Collected once into a temp table, then read in chunks."""
        where = "WHERE f.path IS NULL" if missing_only else ""
        try:
            self.db.execute(
                "ATTACH DATABASE ? AS idx", (uri(index_file, mode="ro", immutable="1"),)
            )
            try:
                self.db.execute("DROP TABLE IF EXISTS temp.joined")
                self.db.execute(f"CREATE TEMP TABLE joined AS {_LISTED} {where} ORDER BY i.path")
                (instances,) = self.db.execute("SELECT COUNT(*) FROM idx.instances").fetchone()
            finally:
                self.db.execute("DETACH DATABASE idx")
        except sqlite3.Error as exc:
            raise BackupError(f"cannot read the index {index_file}: {exc}") from exc
        return Joined(self, int(instances))

    # -- writing (a backup) --------------------------------------------------------------

    def add(self, entries: list[Entry]) -> None:
        """List files already synced in place: one transaction, synced when it returns."""
        if not entries:
            return
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany(
                    "INSERT OR REPLACE INTO files (path, size, blake3) VALUES (?, ?, ?)",
                    [(e.path, e.size, e.blake3) for e in entries],
                )
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise _error(exc, self.path) from exc

    # -- helpers --------------------------------------------------------------------------

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        try:
            row: tuple[Any, ...] | None = self.db.execute(sql, args).fetchone()
        except sqlite3.Error as exc:
            raise _error(exc, self.path) from exc
        return row

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return list(self.db.execute(sql, args).fetchall())
        except sqlite3.Error as exc:
            raise _error(exc, self.path) from exc


class Joined:
    """The result of ``Manifest.instances``: how many, and the rows in chunks."""

    def __init__(self, manifest: Manifest, instances: int) -> None:
        self.manifest = manifest
        self.instances = instances  # in the index, listed or not
        totals = manifest._one("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM joined")
        self.files, self.nbytes = (int(totals[0]), int(totals[1])) if totals else (0, 0)

    def chunks(self) -> Iterator[list[InstanceFile]]:
        after = 0
        while True:
            rows = self.manifest._all(
                "SELECT rowid, * FROM joined WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (after, CHUNK),
            )
            if not rows:
                return
            yield [_instance_file(row[1:]) for row in rows]
            after = int(rows[-1][0])


def _instance_file(row: tuple[Any, ...]) -> InstanceFile:
    path, size, digest, syntax, listed_size, blake3 = row
    listed = None
    if listed_size is not None:
        listed = Entry(FILES_PREFIX + str(path), int(listed_size), str(blake3))
    return InstanceFile(str(path), int(size), str(digest), str(syntax), listed)


def uri(path: Path, **params: str) -> str:
    """An SQLite URI for ``path`` (quoted: a folder name may hold ? or #)."""
    query = "&".join(f"{key}={value}" for key, value in params.items())
    return f"file:{urllib.parse.quote(str(path))}" + (f"?{query}" if query else "")


def _error(exc: sqlite3.Error, path: Path) -> BackupError:
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return BackupError(f"{path.parent} is full: cannot update the manifest")
    return BackupError(f"the manifest {path} cannot be used: {exc}")
