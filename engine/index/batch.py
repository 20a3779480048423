"""What one index transaction does, for every backend: a batch commit, a removal, the counts.

Plain functions over a DB-API style connection (``engine/index/reads.py``) running
inside a transaction the backend opened: ``sqlite3`` for SQLite, the synchronous
facade over asyncpg for PostgreSQL. The SQL is written once in SQLite's form and
turned into the backend's by the connection (``engine/index/dialect.py``).

Several engine nodes may share one PostgreSQL index. There, before judging anything,
a batch takes a transaction lock on each SOP Instance UID, study and patient it
touches (``lock``): two nodes given the same instance at the same moment commit one
after the other, and the second judges its copy against the first's row, exactly as
one node judges a re-sent instance; the counts of a study written from two nodes are
recounted under the lock. SQLite has one writer at a time and needs no such lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from engine.attributes import INSTANCE_KEYS, PATIENT_KEYS, SERIES_KEYS, STUDY_KEYS
from engine.duplicates import Decision, Existing
from engine.index.base import CommitReport, Decide, InstanceRow, QuarantineRow
from engine.index.reads import Connection

# Parameters per statement: far below SQLite's limit (32766) and PostgreSQL's (65535).
CHUNK = 500

# Takes the transaction locks for these keys (texts), in one order for every node.
Lock = Callable[[Connection, Iterable[str]], None]

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
_PUT_HEADER = (
    "INSERT INTO instance_headers (sop_instance_uid, header) VALUES (?, ?)"
    " ON CONFLICT (sop_instance_uid) DO UPDATE SET header = excluded.header"
)
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
    updated_at = CASE WHEN updated_at > ?2 THEN updated_at ELSE ?2 END
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
        ORDER BY modality) AS present),
    updated_at = CASE WHEN updated_at > ?2 THEN updated_at ELSE ?2 END{unsettle}
WHERE study_uid = ?1
"""
# A study that receives an instance (new or replacing one) is no longer stable; the
# stability task (engine/stability.py) marks it again once it has settled.
_RECOUNT_RECEIVING_STUDY = _RECOUNT_STUDY.format(unsettle=",\n    stable_at = NULL")
_RECOUNT_STUDY = _RECOUNT_STUDY.format(unsettle="")

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


def stats_from(row: Any) -> dict[str, int]:
    return dict(zip(STATS_KEYS, (int(v) for v in row), strict=True))


def select_sql(count: int) -> str:
    marks = ", ".join("?" for _ in range(count))
    return (
        "SELECT sop_instance_uid, digest, path, series_uid, study_uid FROM instances "
        f"WHERE sop_instance_uid IN ({marks})"
    )


def chunks(uids: list[str]) -> list[list[str]]:
    unique = list(dict.fromkeys(uids))
    return [unique[start : start + CHUNK] for start in range(0, len(unique), CHUNK)]


Found = dict[str, tuple[str, str, str, str]]  # uid -> (digest, path, series_uid, study_uid)


def select_existing(db: Connection, uids: list[str]) -> Found:
    """Inside the caller's transaction."""
    found: Found = {}
    for chunk in chunks(uids):
        for uid, digest, path, series_uid, study_uid in db.execute(select_sql(len(chunk)), chunk):
            found[uid] = (digest, path, series_uid, study_uid)
    return found


def lock_keys(rows: Iterable[InstanceRow]) -> list[str]:
    """What a batch locks on a shared index: its instances, studies and patients."""
    keys: list[str] = []
    for row in rows:
        a = row.attributes
        keys.append(f"instance {row.sop_instance_uid}")
        keys.append(f"study {a['study_uid']}")
        keys.append(_patient_key(a["patient_id"], a["issuer_of_patient_id"]))
    return keys


def commit(
    db: Connection,
    rows: list[InstanceRow],
    quarantined: list[QuarantineRow],
    decide: Decide,
    lock: Lock | None = None,
) -> CommitReport:
    """Index a batch, judging duplicates against what is stored (inside a transaction).

    Rows are judged in order, each against the index as this transaction has
    left it, so two copies of one UID in the same batch are settled too.
    """
    if lock is not None and rows:
        lock(db, lock_keys(rows))
    report = CommitReport()
    found = select_existing(db, [r.sop_instance_uid for r in rows])
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
    headers = [(r.sop_instance_uid, r.header) for r in written if r.header]
    if headers:
        db.executemany(_PUT_HEADER, headers)
    dropped = [(r.sop_instance_uid,) for r in replaces if not r.header]
    if dropped:
        db.executemany(_DROP_HEADER, dropped)
    if touched_series:
        db.executemany(_RECOUNT_SERIES, sorted(touched_series.items()))
        db.executemany(_RECOUNT_RECEIVING_STUDY, sorted(touched_studies.items()))
    if quarantined:
        db.executemany(_INSERT_QUARANTINE, [_quarantine_values(q) for q in quarantined])
    return report


def forget(db: Connection, sop_instance_uids: list[str], lock: Lock | None = None) -> None:
    """Remove rows (whose files are gone), recount their series and studies, and remove
    the series, studies and patients left without instances.

    On a shared index it locks what it may remove, as a batch locks what it writes (the
    instances, their studies and patients, in one call): a batch adding a study to one of
    these patients meanwhile on another node never finds its patient row gone.
    """
    found = select_existing(db, sop_instance_uids)
    if not found:
        return
    studies = sorted({v[3] for v in found.values()})
    patients = _patients_of(db, studies)
    if lock is not None:
        keys = [f"instance {u}" for u in found] + [f"study {s}" for s in studies]
        lock(db, keys + [_patient_key(*p) for p in patients])
        found = select_existing(db, list(found))
        if not found:
            return
        studies = sorted({v[3] for v in found.values()})
    db.executemany("DELETE FROM instances WHERE sop_instance_uid = ?", [[u] for u in found])
    db.executemany(_DROP_HEADER, [[u] for u in found])
    series = sorted({v[2] for v in found.values()})
    db.executemany(_RECOUNT_SERIES, [(s, 0.0) for s in series])
    db.executemany(
        "DELETE FROM series WHERE series_uid = ? AND num_instances = 0", [[s] for s in series]
    )
    db.executemany(_RECOUNT_STUDY, [(s, 0.0) for s in studies])
    db.executemany(
        "DELETE FROM studies WHERE study_uid = ? AND num_instances = 0", [[s] for s in studies]
    )
    db.executemany(
        "DELETE FROM patients WHERE patient_id = ?1 AND issuer_of_patient_id = ?2"
        " AND NOT EXISTS (SELECT 1 FROM studies WHERE"
        " studies.patient_id = ?1 AND studies.issuer_of_patient_id = ?2)",
        patients,
    )


def _patient_key(patient_id: str, issuer: str) -> str:
    return f"patient {patient_id}\\{issuer}"


def _patients_of(db: Connection, studies: list[str]) -> list[tuple[str, str]]:
    """(PatientID, IssuerOfPatientID) of these studies."""
    patients: set[tuple[str, str]] = set()
    for chunk in chunks(studies):
        marks = ", ".join("?" for _ in chunk)
        rows = db.execute(
            "SELECT patient_id, issuer_of_patient_id FROM studies"
            f" WHERE study_uid IN ({marks})",
            chunk,
        )
        patients.update((str(p), str(i)) for p, i in rows)
    return sorted(patients)


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
