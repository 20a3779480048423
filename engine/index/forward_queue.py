"""Stable studies and the forwarding queue in the index (schema 4): the SQL only.

The functions that change the index take the writer connection inside a transaction:
they run through ``Index.write``, on the writer's thread, between two batches of the
pipeline (SQLite or PostgreSQL: the SQL is written once, ``engine/index/dialect.py``).
The async ones only read (``Index.read``).

Several engine nodes may share a PostgreSQL index: a check marks a study stable, and
queues its forwards, only if no other node holds it (``FOR UPDATE SKIP LOCKED``; the
mark is then seen by the others), and a claim skips items another node is claiming,
so each study is forwarded once per arrival whichever node checks first.

Invariants of the queue (``forward_queue``, ``forward_sent``):

- An item is (study, destination); 'pending' until it is 'done' or 'failed'.
- Of the pending items of one (study, destination), only the oldest (lowest id) may
  be claimed: one attempt at a time per pair, in order.
- Claiming an item counts its attempt and sets ``next_attempt_at`` to when it would
  be retried if the engine died during the attempt (its lease); the engine renews the
  lease while the attempt runs (``renew``), and the attempt's end sets it again. So an
  engine node sharing the index takes an item over only from a node that has died.
- An item never attempted (``attempts = 0``) reads the study's instances when it
  starts, so a study that becomes stable again while such an item waits adds nothing
  to the queue. Otherwise (the item is being sent, or waits for a retry) it gets a new
  item, which will send the study as it is then.
- A successful attempt ends, besides its own item, every pending item of the pair
  queued before the attempt started (``Claim.covers``): the instances it read include
  everything those items were queued for.
- ``forward_sent`` holds the instances the destination acknowledged in an unfinished
  item's attempts; a retry skips them. Removed when the item ends.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.index.dialect import SQLITE, Dialect
from engine.index.reads import Connection


class Reader(Protocol):
    async def read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[Any]: ...


PENDING = "pending"
DONE = "done"
FAILED = "failed"

# The separator of multi-valued columns (studies.modalities), as in a DICOM value.
VALUE_SEPARATOR = "\\"


@dataclass(frozen=True, slots=True)
class StudyFacts:
    """What forwarding rules look at in a study that has just become stable."""

    study_uid: str
    modalities: tuple[str, ...]
    calling_aes: tuple[str, ...]
    study_description: str


# The destinations (peer AE titles) a stable study goes to.
Route = Callable[[StudyFacts], Iterable[str]]


@dataclass(slots=True)
class Settled:
    """What one stability check did."""

    stable: list[StudyFacts] = field(default_factory=list)
    queued: list[tuple[str, str]] = field(default_factory=list)  # (study UID, destination)


@dataclass(frozen=True, slots=True)
class Claim:
    """An item taken for one attempt."""

    id: int
    study_uid: str
    destination: str
    attempt: int  # this attempt's number, from 1
    covers: int  # the highest item id when the attempt started
    acknowledged: frozenset[str]  # SOP Instance UIDs sent in earlier attempts


_UNSETTLED = "SELECT EXISTS (SELECT 1 FROM studies WHERE stable_at IS NULL AND updated_at <= ?)"
_SETTLING = """
SELECT study_uid, modalities, study_description FROM studies
WHERE stable_at IS NULL AND updated_at <= ?
ORDER BY updated_at LIMIT ?"""
_CALLING_AES = (
    "SELECT DISTINCT calling_ae FROM instances WHERE study_uid = ? AND calling_ae IS NOT NULL"
)
_MARK_STABLE = "UPDATE studies SET stable_at = ? WHERE study_uid = ?"
_ENQUEUE = """
INSERT INTO forward_queue (study_uid, destination, state, attempts, next_attempt_at, created_at)
SELECT ?1, ?2, 'pending', 0, CAST(?3 AS DOUBLE PRECISION), CAST(?3 AS DOUBLE PRECISION)
WHERE NOT EXISTS (
    SELECT 1 FROM forward_queue
    WHERE study_uid = ?1 AND destination = ?2 AND state = 'pending' AND attempts = 0)
"""


def _eligible_sql(busy: int) -> str:
    """The next item that may be claimed, skipping ``busy`` ids (attempts under way)."""
    skip = f"AND q.id NOT IN ({', '.join('?' * busy)})" if busy else ""
    return f"""
SELECT q.id, q.study_uid, q.destination, q.attempts, q.next_attempt_at FROM forward_queue q
WHERE q.state = 'pending' {skip}
AND NOT EXISTS (
    SELECT 1 FROM forward_queue p
    WHERE p.study_uid = q.study_uid AND p.destination = q.destination
    AND p.state = 'pending' AND p.id < q.id)
ORDER BY q.next_attempt_at, q.id LIMIT 1"""


# -- reads (the index's reader connection) ------------------------------------------


async def has_settled(db: Reader, cutoff: float) -> bool:
    """Whether a study not yet stable received its last instance at ``cutoff`` or before."""
    rows = await db.read(_UNSETTLED, (cutoff,))
    return bool(rows[0][0])


async def next_due(db: Reader, busy: Collection[int]) -> float | None:
    """When the next claimable item is due (None: nothing to send)."""
    rows = await db.read(_eligible_sql(len(busy)), tuple(busy))
    return float(rows[0][4]) if rows else None


# -- writes (the writer connection, inside a transaction) ----------------------------


def settle(
    db: Connection,
    now: float,
    cutoff: float,
    route: Route,
    limit: int,
    dialect: Dialect = SQLITE,
) -> Settled:
    """Mark stable up to ``limit`` studies whose last instance came at ``cutoff`` or
    before, and queue each for the destinations ``route`` gives."""
    settled = Settled()
    settling = _SETTLING + dialect.lock_rows
    for study_uid, modalities, description in db.execute(settling, (cutoff, limit)).fetchall():
        calling_aes = [ae for (ae,) in db.execute(_CALLING_AES, (study_uid,))]
        facts = StudyFacts(
            study_uid=study_uid,
            modalities=tuple(m for m in (modalities or "").split(VALUE_SEPARATOR) if m),
            calling_aes=tuple(sorted(ae.strip() for ae in calling_aes)),
            study_description=description or "",
        )
        settled.stable.append(facts)
        for destination in dict.fromkeys(route(facts)):
            if db.execute(_ENQUEUE, (study_uid, destination, now)).rowcount:
                settled.queued.append((study_uid, destination))
    db.executemany(_MARK_STABLE, [(now, facts.study_uid) for facts in settled.stable])
    return settled


def claim(
    db: Connection,
    now: float,
    busy: Collection[int],
    lease: Callable[[int], float],
    dialect: Dialect = SQLITE,
) -> Claim | None:
    """Take the next due item for an attempt; ``lease(attempt)``: seconds until it is
    retried should the attempt never report (the engine killed meanwhile)."""
    eligible = _eligible_sql(len(busy)) + dialect.lock_rows
    row = db.execute(eligible, tuple(busy)).fetchone()
    if row is None or row[4] > now:
        return None
    item_id, study_uid, destination, attempts, _ = row
    attempt = attempts + 1
    db.execute(
        "UPDATE forward_queue SET attempts = ?, next_attempt_at = ? WHERE id = ?",
        (attempt, now + lease(attempt), item_id),
    )
    (covers,) = db.execute("SELECT MAX(id) FROM forward_queue").fetchone()
    sent = db.execute("SELECT sop_instance_uid FROM forward_sent WHERE queue_id = ?", (item_id,))
    return Claim(
        item_id, study_uid, destination, attempt, covers, frozenset(uid for (uid,) in sent)
    )


def renew(db: Connection, claim: Claim, until: float) -> bool:
    """The attempt goes on: its item is not due again before ``until``. Nothing changes
    once the item has ended or another attempt has taken it over."""
    cursor = db.execute(
        "UPDATE forward_queue SET next_attempt_at = ?"
        " WHERE id = ? AND state = 'pending' AND attempts = ?",
        (until, claim.id, claim.attempt),
    )
    return bool(cursor.rowcount)


def finish_done(db: Connection, claim: Claim, now: float) -> int:
    """The study reached its destination: end the item and those it covers; how many."""
    ids = [
        (item_id,)
        for (item_id,) in db.execute(
            "SELECT id FROM forward_queue WHERE study_uid = ? AND destination = ?"
            " AND state = 'pending' AND id <= ?",
            (claim.study_uid, claim.destination, claim.covers),
        )
    ]
    db.executemany(
        "UPDATE forward_queue SET state = 'done', done_at = ?, last_error = NULL WHERE id = ?",
        [(now, item_id) for (item_id,) in ids],
    )
    db.executemany("DELETE FROM forward_sent WHERE queue_id = ?", ids)
    return len(ids)


def finish_retry(
    db: Connection,
    claim: Claim,
    acknowledged: Iterable[str],
    next_attempt_at: float,
    error: str,
) -> None:
    """The attempt fell short: keep what was acknowledged, try again at ``next_attempt_at``."""
    db.executemany(
        "INSERT INTO forward_sent (queue_id, sop_instance_uid) VALUES (?, ?)"
        " ON CONFLICT DO NOTHING",
        [(claim.id, uid) for uid in acknowledged],
    )
    db.execute(
        "UPDATE forward_queue SET next_attempt_at = ?, last_error = ? WHERE id = ?",
        (next_attempt_at, error, claim.id),
    )


def finish_failed(db: Connection, claim: Claim, now: float, error: str) -> None:
    """Given up: the item ends 'failed' with its last error."""
    db.execute(
        "UPDATE forward_queue SET state = 'failed', done_at = ?, last_error = ? WHERE id = ?",
        (now, error, claim.id),
    )
    db.execute("DELETE FROM forward_sent WHERE queue_id = ?", (claim.id,))
