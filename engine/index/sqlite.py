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
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from engine.attributes import INSTANCE_KEYS, PATIENT_KEYS, SERIES_KEYS, STUDY_KEYS
from engine.duplicates import Decision, Existing
from engine.errors import IndexDatabaseError
from engine.index.base import CommitReport, Decide, InstanceRow, QuarantineRow

log = logging.getLogger(__name__)
T = TypeVar("T")

# SQLite's default limit on host parameters is 32766 (since 3.32); stay far below.
CHUNK = 500
BUSY_TIMEOUT_MS = 60_000

_PATIENT_COLS = list(PATIENT_KEYS)
_STUDY_COLS = [c for c in STUDY_KEYS] + ["patient_id", "issuer_of_patient_id"]
_SERIES_COLS = [c for c in SERIES_KEYS] + ["study_uid"]
_INSTANCE_COLS = [c for c in INSTANCE_KEYS] + ["series_uid", "study_uid"]
_FILE_COLS = [
    "transfer_syntax",
    "path",
    "size",
    "digest",
    "received_at",
    "calling_ae",
    "called_ae",
    "peer_ip",
]


def _insert(table: str, columns: list[str], extra: str = "") -> str:
    names = ", ".join(columns)
    marks = ", ".join("?" for _ in columns)
    return f"INSERT INTO {table} ({names}) VALUES ({marks}) {extra}"


_INSERT_PATIENT = _insert("patients", _PATIENT_COLS, "ON CONFLICT DO NOTHING")
_INSERT_STUDY = _insert(
    "studies", [*_STUDY_COLS, "created_at", "updated_at"], "ON CONFLICT DO NOTHING"
)
_INSERT_SERIES = _insert("series", [*_SERIES_COLS, "updated_at"], "ON CONFLICT DO NOTHING")
_INSERT_INSTANCE = _insert("instances", [*_INSTANCE_COLS, *_FILE_COLS])
_REPLACE_INSTANCE = (
    "UPDATE instances SET "
    + ", ".join(f"{c} = ?" for c in [*_INSTANCE_COLS, *_FILE_COLS])
    + " WHERE sop_instance_uid = ?"
)
_PUT_HEADER = "INSERT OR REPLACE INTO instance_headers (sop_instance_uid, header) VALUES (?, ?)"
_DROP_HEADER = "DELETE FROM instance_headers WHERE sop_instance_uid = ?"
_INSERT_QUARANTINE = _insert(
    "quarantine",
    [
        "path",
        "outcome",
        "status",
        "reason",
        "sop_class_uid",
        "sop_instance_uid",
        "transfer_syntax",
        "calling_ae",
        "called_ae",
        "peer_ip",
        "received_at",
    ],
)
_RECOUNT_SERIES = """
UPDATE series SET
    num_instances = (SELECT COUNT(*) FROM instances WHERE instances.series_uid = ?1),
    updated_at = MAX(updated_at, ?2)
WHERE series_uid = ?1
"""
_RECOUNT_STUDY = """
UPDATE studies SET
    num_series = (SELECT COUNT(*) FROM series WHERE series.study_uid = ?1 AND num_instances > 0),
    num_instances = (
        SELECT COALESCE(SUM(num_instances), 0) FROM series WHERE series.study_uid = ?1),
    modalities = (SELECT GROUP_CONCAT(modality, '\\') FROM (
        SELECT DISTINCT modality FROM series
        WHERE series.study_uid = ?1 AND modality IS NOT NULL AND num_instances > 0
        ORDER BY modality)),
    updated_at = MAX(updated_at, ?2)
WHERE study_uid = ?1
"""
# A study that receives an instance (new or replacing one) is no longer stable; the
# stability task (engine/stability.py) marks it again once it has settled.
_UNSETTLE_STUDY = (
    "UPDATE studies SET stable_at = NULL WHERE study_uid = ? AND stable_at IS NOT NULL"
)


def schema_scripts() -> list[tuple[int, str]]:
    """(version, SQL) for every schema file, in order."""
    folder = resources.files("engine.index") / "schema"
    scripts = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            scripts.append((int(entry.name.split("_", 1)[0]), entry.read_text("utf-8")))
    return sorted(scripts)


SCHEMA_VERSION = schema_scripts()[-1][0]


def _select_sql(count: int) -> str:
    marks = ", ".join("?" for _ in range(count))
    return (
        "SELECT sop_instance_uid, digest, path, series_uid, study_uid FROM instances "
        f"WHERE sop_instance_uid IN ({marks})"
    )


def _chunks(uids: list[str]) -> list[list[str]]:
    unique = list(dict.fromkeys(uids))
    return [unique[start : start + CHUNK] for start in range(0, len(unique), CHUNK)]


Found = dict[str, tuple[str, str, str, str]]  # uid -> (digest, path, series_uid, study_uid)


class SQLiteIndex:
    """The index: one writer thread, one reader connection.

    The writer is a plain ``sqlite3`` connection owned by one thread, and a batch's
    whole transaction (look-ups, inserts, recounts, commit) runs there in a single
    hand-off from the loop: at one image per batch, a dozen separate round trips to
    a connection thread cost more than the SQL itself. Reads (duplicate look-ups,
    stats) go through aiosqlite, one round trip each.
    """

    def __init__(self, path: Path, durable: bool, flush: Callable[[], None] | None = None) -> None:
        """``durable``: a commit is on disk when it returns (SQLite's synchronous=FULL).

        ``flush``: the caller makes commits durable instead: it is called on the
        writer's thread after each COMMIT (the storage area's one ``syncfs`` per batch,
        which also covers the WAL), and SQLite itself does not sync (NORMAL).
        """
        self.path = path
        self.durable = durable
        self.flush = flush
        self._writer: sqlite3.Connection | None = None
        self._write_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._reader: aiosqlite.Connection | None = None
        self._quick: sqlite3.Connection | None = None

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
        for chunk in _chunks(sop_instance_uids):
            rows = await self.reader.execute_fetchall(_select_sql(len(chunk)), chunk)
            for uid, digest, path, _, _ in rows:
                found[uid] = Existing(digest, path)
        return found

    def lookup_now(self, sop_instance_uids: list[str]) -> dict[str, Existing] | None:
        """``lookup`` without leaving the loop's thread; None if the index is busy."""
        if self._quick is None:
            return None
        found: dict[str, Existing] = {}
        try:
            for chunk in _chunks(sop_instance_uids):
                for uid, digest, path, _, _ in self._quick.execute(_select_sql(len(chunk)), chunk):
                    found[uid] = Existing(digest, path)
        except sqlite3.OperationalError as exc:
            log.debug("quick look-up skipped: %s", exc)
            return None
        return found

    def _select_existing(self, uids: list[str]) -> Found:
        """On the writer's thread, inside its transaction."""
        found: Found = {}
        for chunk in _chunks(uids):
            for uid, digest, path, series_uid, study_uid in self.writer.execute(
                _select_sql(len(chunk)), chunk
            ):
                found[uid] = (digest, path, series_uid, study_uid)
        return found

    async def has_instances(self) -> bool:
        rows = await self.reader.execute_fetchall("SELECT EXISTS (SELECT 1 FROM instances)")
        return bool(next(iter(rows))[0])

    async def stats(self) -> dict[str, int]:
        return await read_stats(self.reader)

    async def paths(self) -> list[tuple[str, str]]:
        """(SOP Instance UID, path) of every instance; for the start-up consistency check."""
        rows = await self.reader.execute_fetchall("SELECT sop_instance_uid, path FROM instances")
        return [(uid, path) for uid, path in rows]

    # -- writes (each one transaction on the writer's thread) ----------------------

    async def commit_batch(
        self, rows: list[InstanceRow], quarantined: list[QuarantineRow], decide: Decide
    ) -> CommitReport:
        """Index a batch in one transaction, judging duplicates against what is stored.

        Rows are judged in order, each against the index as this transaction has
        left it, so two copies of one UID in the same batch are settled too.
        """
        return await self._on_writer(self._transaction, self._commit, rows, quarantined, decide)

    async def write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body(connection)`` as one transaction on the writer's thread.

        For the engine's other writers (stable studies, the forwarding queue): every
        change to the index goes through this one connection, between two batches.
        """
        return await self._on_writer(self._transaction, lambda: body(self.writer))

    async def forget(self, sop_instance_uids: list[str]) -> None:
        """Remove rows (whose files are gone) and recount their series and studies."""
        await self._on_writer(self._transaction, self._forget, sop_instance_uids)

    def _transaction(self, body: Callable[..., T], *args: Any) -> T:
        db = self.writer
        db.execute("BEGIN IMMEDIATE")
        try:
            result = body(*args)
            db.execute("COMMIT")
        except BaseException:
            try:
                if db.in_transaction:  # not after SQLite rolled back itself (a full disk)
                    db.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback failed")
            raise
        if self.flush is not None:
            self.flush()  # an OSError here: committed but not known to be on disk
        return result

    def _commit(
        self, rows: list[InstanceRow], quarantined: list[QuarantineRow], decide: Decide
    ) -> CommitReport:
        db = self.writer
        report = CommitReport()
        found = self._select_existing([r.sop_instance_uid for r in rows])
        inserts: list[InstanceRow] = []
        replaces: list[InstanceRow] = []
        touched_series: dict[str, float] = {}
        touched_studies: dict[str, float] = {}
        for row in rows:
            uid = row.sop_instance_uid
            before = found.get(uid)
            existing = Existing(before[0], before[1]) if before else None
            decision = decide(existing, row.digest)
            report.decisions.append(decision)
            report.existing.append(existing)
            if decision is Decision.NEW:
                inserts.append(row)
            elif decision is Decision.OVERWRITE:
                assert before is not None
                replaces.append(row)
                touched_series[before[2]] = row.received_at
                touched_studies[before[3]] = row.received_at
                if before[1] != row.path:
                    report.unreferenced.append(before[1])
            elif existing is not None and existing.path != row.path:
                report.unreferenced.append(row.path)  # SAME, KEEP, REJECT: new file unused
            if decision in (Decision.NEW, Decision.OVERWRITE):
                a = row.attributes
                found[uid] = (row.digest, row.path, a["series_uid"], a["study_uid"])
                touched_series[a["series_uid"]] = row.received_at
                touched_studies[a["study_uid"]] = row.received_at
        # A candidate path may have become the kept one again later in the batch.
        kept = {entry[1] for entry in found.values()}
        report.unreferenced = [p for p in dict.fromkeys(report.unreferenced) if p not in kept]
        written = inserts + replaces
        if written:
            db.executemany(
                _INSERT_PATIENT, [[r.attributes[c] for c in _PATIENT_COLS] for r in written]
            )
            db.executemany(
                _INSERT_STUDY,
                [
                    [*(r.attributes[c] for c in _STUDY_COLS), r.received_at, r.received_at]
                    for r in written
                ],
            )
            db.executemany(
                _INSERT_SERIES,
                [[*(r.attributes[c] for c in _SERIES_COLS), r.received_at] for r in written],
            )
        if inserts:
            db.executemany(_INSERT_INSTANCE, [_instance_values(r) for r in inserts])
        if replaces:
            db.executemany(
                _REPLACE_INSTANCE, [[*_instance_values(r), r.sop_instance_uid] for r in replaces]
            )
        if written:
            db.executemany(
                _PUT_HEADER, [(r.sop_instance_uid, r.header) for r in written if r.header]
            )
            db.executemany(
                _DROP_HEADER, [(r.sop_instance_uid,) for r in replaces if not r.header]
            )
        if touched_series:
            db.executemany(_RECOUNT_SERIES, list(touched_series.items()))
            db.executemany(_RECOUNT_STUDY, list(touched_studies.items()))
            db.executemany(_UNSETTLE_STUDY, [(study,) for study in touched_studies])
        if quarantined:
            db.executemany(_INSERT_QUARANTINE, [_quarantine_values(q) for q in quarantined])
        return report

    def _forget(self, sop_instance_uids: list[str]) -> None:
        db = self.writer
        found = self._select_existing(sop_instance_uids)
        db.executemany("DELETE FROM instances WHERE sop_instance_uid = ?", [[u] for u in found])
        db.executemany(_DROP_HEADER, [[u] for u in found])
        series = {v[2] for v in found.values()}
        studies = {v[3] for v in found.values()}
        db.executemany(_RECOUNT_SERIES, [(s, 0.0) for s in series])
        db.executemany(
            "DELETE FROM series WHERE series_uid = ? AND num_instances = 0", [[s] for s in series]
        )
        db.executemany(_RECOUNT_STUDY, [(s, 0.0) for s in studies])
        db.executemany(
            "DELETE FROM studies WHERE study_uid = ? AND num_instances = 0", [[s] for s in studies]
        )
        db.execute(
            "DELETE FROM patients WHERE NOT EXISTS (SELECT 1 FROM studies WHERE "
            "studies.patient_id = patients.patient_id AND "
            "studies.issuer_of_patient_id = patients.issuer_of_patient_id)"
        )


def _instance_values(row: InstanceRow) -> list[Any]:
    a = row.attributes
    return [
        *(a[c] for c in _INSTANCE_COLS),
        row.transfer_syntax,
        row.path,
        row.size,
        row.digest,
        row.received_at,
        row.calling_ae,
        row.called_ae,
        row.peer_ip,
    ]


def _quarantine_values(q: QuarantineRow) -> list[Any]:
    return [
        q.path,
        q.outcome,
        q.status,
        q.reason,
        q.sop_class_uid,
        q.sop_instance_uid,
        q.transfer_syntax,
        q.calling_ae,
        q.called_ae,
        q.peer_ip,
        q.received_at,
    ]


STATS_SQL = """
SELECT
    (SELECT COUNT(*) FROM patients),
    (SELECT COUNT(*) FROM studies),
    (SELECT COUNT(*) FROM series),
    (SELECT COUNT(*) FROM instances),
    (SELECT COALESCE(SUM(size), 0) FROM instances),
    (SELECT COUNT(*) FROM quarantine),
    (SELECT COUNT(*) FROM studies WHERE stable_at IS NOT NULL),
    (SELECT COUNT(*) FROM forward_queue WHERE state = 'pending'),
    (SELECT COUNT(*) FROM forward_queue WHERE state = 'failed')
"""
STATS_KEYS = (
    "patients",
    "studies",
    "series",
    "instances",
    "bytes",
    "quarantined",
    "stable_studies",
    "forward_pending",
    "forward_failed",
)


async def read_stats(db: aiosqlite.Connection) -> dict[str, int]:
    async with db.execute(STATS_SQL) as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return dict(zip(STATS_KEYS, (int(v) for v in row), strict=True))


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
