"""kill -9 in the middle of a multi-association send, restart: nothing acknowledged is lost.

Every instance that received a success status is on disk and in the index after the
restart; there is no index row without its file, no instance file without a row, no
temp file and no journal left. The recovery steps are also driven directly, from the
state a crash at one exact point leaves: a journal left between rename and commit is
replayed (a journaled file that does not parse is quarantined; the copy an overwrite
replaced is removed), and a row whose file vanished while the engine was down is
dropped after an unclean stop.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import orjson
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import encode

from engine import digest as content_digest
from engine import status
from engine.storage import part10
from tests.burst import Burst, burst_datasets, check_store, index_rows, leftovers, query, restart
from tests.helpers import Engine, ct_dataset
from tests.postgres import NATIVE_RUN_BACKENDS, POSTGRES

SENDERS = 4
PER_SENDER = 80
SIZE = 256  # 128 KB of pixel data: a burst takes a few seconds
WAIT = 60.0

# Every test runs on SQLite and PostgreSQL (PostgreSQL in the native-transport run only:
# tests/postgres.py). The kill points (answers before the kill, fsync) on each backend:
# on PostgreSQL, a kill mid-burst with commits synchronous and not (the early kill
# tests the start of a burst, which does not depend on the index).
KILLS = {"early": (1, True), "middle-no-fsync": (40, False), "late": (150, True)}
KILLS_ON = {POSTGRES: ("middle-no-fsync", "late")}


@pytest.mark.parametrize(
    ("backend", "kill_after", "fsync"),
    [
        pytest.param(backend, *KILLS[name], id=f"{backend}-{name}")
        for backend in NATIVE_RUN_BACKENDS
        for name in KILLS_ON.get(backend, tuple(KILLS))
    ],
    indirect=["backend"],
)
def test_kill_during_burst_loses_nothing_acknowledged(
    tmp_path: Path, kill_after: int, fsync: bool, index_url: str
) -> None:
    """Several associations send; kill -9 once ``kill_after`` requests were answered.

    With fsync off the bytes are only in the OS cache, which survives a crash of the
    engine (not of the machine): the promise holds for kill -9 either way.
    """
    engine = Engine(
        tmp_path / "engine", overrides={"storage": {"fsync": fsync}}, index_url=index_url
    ).start()
    burst = Burst(engine, burst_datasets(SENDERS, PER_SENDER, SIZE))
    try:
        burst.start()
        answered = burst.wait_for_answers(kill_after, WAIT)
        assert answered >= kill_after, f"only {answered} answers before the senders ended"
        engine.kill()
        burst.join(WAIT)
        # The kill interrupted the burst: not every request was answered.
        assert len(burst.answers) < burst.total
        acked = burst.acked
        assert len(acked) >= kill_after
        assert set(burst.answers.values()) == {status.SUCCESS}
        # The senders saw the engine go: at most a broken association each.
        assert all(isinstance(e, RuntimeError | OSError) for e in burst.errors), burst.errors

        restart_log = restart(engine)
        assert "last stop was not clean" in restart_log
        rows = check_store(engine, acked, burst.datasets)
        # Only instances that were sent (some committed without their answer arriving).
        assert set(rows) <= set(burst.datasets)

        # The scanners re-send everything: all succeed, each instance stored once.
        again = Burst(engine, burst.batches).start()
        again.join(WAIT)
        assert again.errors == []
        acked = again.acked
        # pynetdicom's client now and then stalls on one request (seen on both
        # transports, with the engine's answer already written); a scanner whose
        # association timed out sends again, and so does this one, once.
        missing = [ds for uid, ds in burst.datasets.items() if uid not in acked]
        if missing:
            retry = Burst(engine, [missing]).start()
            retry.join(WAIT)
            assert retry.errors == []
            acked |= retry.acked
        assert acked == set(burst.datasets)
        rows = check_store(engine, acked, burst.datasets)
        assert set(rows) == set(burst.datasets)
        assert len(engine.stored_files()) == burst.total
        assert engine.stop() == 0, engine.log()
    finally:
        engine.kill()


def _stored_bytes(ds: Dataset, calling_ae: str) -> tuple[bytes, bytes]:
    """(the dataset as sent, the Part 10 file the engine would write for it)."""
    data = encode(ds, is_implicit_vr=False, is_little_endian=True)
    assert data is not None
    head = part10.header(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian, calling_ae
    )
    return data, head + data


def test_journal_left_between_rename_and_commit_is_replayed(tmp_path: Path, index_url: str) -> None:
    """The state a crash after the renames and before the commit leaves, settled at start."""
    engine = Engine(tmp_path / "engine", index_url=index_url).start()
    study_uid, series_uid = generate_uid(), generate_uid()
    first = ct_dataset(study_uid, series_uid, 1)
    burst = Burst(engine, [[first]]).start()
    burst.join(WAIT)
    assert burst.acked == {str(first.SOPInstanceUID)}
    assert engine.stop() == 0
    first_path = index_rows(engine)[str(first.SOPInstanceUID)].path
    area = engine.area()

    entries = []
    # A new instance, renamed into place, no row yet: recovery indexes it.
    fresh = ct_dataset(study_uid, series_uid, 2)
    data, file_bytes = _stored_bytes(fresh, "CRASHED")
    digest = content_digest.of(data)
    fresh_path = engine.instance_path(study_uid, str(fresh.SOPInstanceUID), digest)
    # Another copy of the first instance (other bytes): it lost to the indexed one.
    rival = ct_dataset(study_uid, series_uid, 1, seed=7)
    rival.SOPInstanceUID = first.SOPInstanceUID
    rival.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    rival_data, rival_bytes = _stored_bytes(rival, "CRASHED")
    rival_digest = content_digest.of(rival_data)
    rival_path = engine.instance_path(study_uid, str(first.SOPInstanceUID), rival_digest)
    assert rival_path != first_path
    # A file the journal lists but whose rename never happened.
    never_uid = generate_uid()
    never_path = engine.instance_path(study_uid, never_uid, "0" * 64)
    for rel, body in ((fresh_path, file_bytes), (rival_path, rival_bytes)):
        target = engine.storage / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    received_at = time.time() - 60
    for rel, uid, dig in (
        (fresh_path, str(fresh.SOPInstanceUID), digest),
        (rival_path, str(first.SOPInstanceUID), rival_digest),
        (never_path, never_uid, "0" * 64),
    ):
        entries.append(
            {
                "path": rel,
                "sop_instance_uid": uid,
                "digest": dig,
                "received_at": received_at,
                "calling_ae": "CRASHED",
                "called_ae": "ENGINE",
                "peer_ip": "127.0.0.1",
            }
        )
    (area.journal_dir / "0123456789abcdef.json").write_bytes(orjson.dumps(entries))
    (area.incoming / "deadbeef.part").write_bytes(b"half a file")
    area.clean_mark.unlink()

    log = restart(engine)
    try:
        assert "removed 1 temp files" in log
        assert "indexed 1 files written before an interrupted commit" in log
        assert leftovers(engine) == ([], [])
        rows = check_store(
            engine,
            {str(first.SOPInstanceUID), str(fresh.SOPInstanceUID)},
            {str(first.SOPInstanceUID): first, str(fresh.SOPInstanceUID): fresh},
        )
        assert set(rows) == {str(first.SOPInstanceUID), str(fresh.SOPInstanceUID)}
        assert rows[str(first.SOPInstanceUID)].path == first_path
        assert rows[str(fresh.SOPInstanceUID)].path == fresh_path
        assert rows[str(fresh.SOPInstanceUID)].digest == digest
        assert not (engine.storage / rival_path).exists()
        ((calling_ae, when),) = query(
            engine,
            "SELECT calling_ae, received_at FROM instances "
            f"WHERE sop_instance_uid = '{fresh.SOPInstanceUID}'",
        )
        assert (calling_ae, when) == ("CRASHED", received_at)
        assert engine.stop() == 0
    finally:
        engine.kill()


def test_row_whose_file_vanished_is_dropped_after_an_unclean_stop(
    tmp_path: Path, index_url: str
) -> None:
    engine = Engine(tmp_path / "engine", index_url=index_url).start()
    study_uid, kept_series, gone_series = generate_uid(), generate_uid(), generate_uid()
    datasets = [
        ct_dataset(study_uid, kept_series, 1),
        ct_dataset(study_uid, kept_series, 2),
        ct_dataset(study_uid, gone_series, 1),
    ]
    datasets[2].SeriesNumber = 2
    burst = Burst(engine, [datasets]).start()
    burst.join(WAIT)
    assert len(burst.acked) == 3
    engine.kill()  # unclean: no .clean-shutdown marker
    assert not engine.area().clean_mark.exists()

    rows = index_rows(engine)
    lost = [str(datasets[1].SOPInstanceUID), str(datasets[2].SOPInstanceUID)]
    for uid in lost:
        (engine.storage / rows[uid].path).unlink()

    log = restart(engine)
    try:
        assert "last stop was not clean" in log
        for uid in lost:
            assert f"the file of {uid} is missing; removing its index row" in log
        survivor = str(datasets[0].SOPInstanceUID)
        rows = check_store(engine, {survivor}, {survivor: datasets[0]})
        assert set(rows) == {survivor}
        # The emptied series is gone; the study counts what is left.
        assert query(engine, "SELECT series_uid, num_instances FROM series") == [(kept_series, 1)]
        assert query(engine, "SELECT num_series, num_instances FROM studies") == [(1, 1)]
        assert engine.stats()["patients"] == 1
        assert engine.stop() == 0
    finally:
        engine.kill()


def test_journal_log_left_by_a_crash_is_replayed(tmp_path: Path, index_url: str) -> None:
    """The run's journal log (one JSON line per batch, "done" lines after commits) as a
    crash leaves it: a batch not marked done is replayed, a done one is not, a line cut
    short is ignored, and a journaled file that never reached the disk while its row was
    committed (a crash during the batch's flush) has its row forgotten; the log goes."""
    engine = Engine(tmp_path / "engine", index_url=index_url).start()
    study_uid, series_uid = generate_uid(), generate_uid()
    first, lost = ct_dataset(study_uid, series_uid, 1), ct_dataset(study_uid, series_uid, 3)
    burst = Burst(engine, [[first, lost]]).start()
    burst.join(WAIT)
    assert burst.acked == {str(first.SOPInstanceUID), str(lost.SOPInstanceUID)}
    assert engine.stop() == 0
    rows = index_rows(engine)
    first_path, lost_path = (rows[str(d.SOPInstanceUID)].path for d in (first, lost))
    (engine.storage / lost_path).unlink()  # committed, but its flush never finished
    area = engine.area()

    fresh = ct_dataset(study_uid, series_uid, 2)
    data, file_bytes = _stored_bytes(fresh, "CRASHED")
    digest = content_digest.of(data)
    fresh_path = engine.instance_path(study_uid, str(fresh.SOPInstanceUID), digest)
    (engine.storage / fresh_path).write_bytes(file_bytes)

    def entry(rel: str, uid: str, dig: str) -> dict[str, object]:
        return {"path": rel, "sop_instance_uid": uid, "digest": dig, "received_at": time.time()}

    lines = [
        {"batch": "b1", "files": [entry(fresh_path, str(fresh.SOPInstanceUID), digest)]},
        {"batch": "b2", "files": [entry(first_path, str(first.SOPInstanceUID), "x")]},
        {"done": "b2"},
        {"batch": "b3", "files": [entry(lost_path, str(lost.SOPInstanceUID), "y")]},
    ]
    log_path = area.journal_dir / "20261127-000000-deadbeef.log"
    body = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    log_path.write_bytes(body + b'{"batch": "b4", "fi')  # the last line, cut by the crash

    log = restart(engine)
    try:
        assert "indexed 1 files written before an interrupted commit" in log
        assert f"{lost_path} was indexed but its file is missing" in log
        assert "ignoring line 5" in log
        rows = check_store(
            engine,
            {str(first.SOPInstanceUID), str(fresh.SOPInstanceUID)},
            {str(first.SOPInstanceUID): first, str(fresh.SOPInstanceUID): fresh},
        )
        assert set(rows) == {str(first.SOPInstanceUID), str(fresh.SOPInstanceUID)}
        assert rows[str(first.SOPInstanceUID)].path == first_path
        assert not log_path.exists()
    finally:
        engine.stop()


def test_journaled_file_that_does_not_parse_is_quarantined(tmp_path: Path, index_url: str) -> None:
    """A file renamed into place whose bytes are broken (say, a power cut with fsync off)
    is not indexed and not thrown away: it goes to the quarantine with a note."""
    engine = Engine(tmp_path / "engine", index_url=index_url).start()
    assert engine.stop() == 0
    study_uid, uid = generate_uid(), generate_uid()
    area = engine.area()
    rel_path = engine.instance_path(study_uid, uid, "f" * 64)
    broken = b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7fnot a dataset"
    target = engine.storage / rel_path
    target.parent.mkdir(parents=True)
    target.write_bytes(broken)
    entry = {
        "path": rel_path,
        "sop_instance_uid": uid,
        "digest": "f" * 64,
        "received_at": time.time(),
        "calling_ae": "CRASHED",
        "called_ae": "ENGINE",
        "peer_ip": "127.0.0.1",
    }
    (area.journal_dir / "feedface.json").write_bytes(orjson.dumps([entry]))
    area.clean_mark.unlink()

    log = restart(engine)
    try:
        assert f"recovery: {rel_path} does not parse" in log
        assert not target.exists()
        check_store(engine, set(), {})
        assert index_rows(engine) == {}
        notes = engine.quarantine_notes()
        assert len(notes) == 1
        assert notes[0]["sop_instance_uid"] == uid
        assert notes[0]["path"] == rel_path
        assert "does not parse" in notes[0]["reason"]
        kept = [p for p in engine.quarantine.rglob("*") if p.name == notes[0]["file"]]
        assert [p.read_bytes() for p in kept] == [broken]
        assert engine.stop() == 0
    finally:
        engine.kill()


def test_copy_replaced_by_an_overwrite_is_removed_after_a_crash(
    tmp_path: Path, index_url: str
) -> None:
    """duplicate_policy = "overwrite": the crash fell after the commit that replaced an
    instance's row and before the replaced copy was removed (that copy is in no journal)."""
    overrides = {"ingest": {"duplicate_policy": "overwrite"}}
    engine = Engine(tmp_path / "engine", overrides, index_url=index_url).start()
    study_uid, series_uid = generate_uid(), generate_uid()
    uid = f"2.25.{uuid.uuid4().int}"
    old = ct_dataset(study_uid, series_uid, 1)
    # A neighbour whose UID starts with the first one's: it must not be taken for a copy.
    neighbour = ct_dataset(study_uid, series_uid, 2)
    for ds, value in ((old, uid), (neighbour, f"{uid}.1")):
        ds.SOPInstanceUID = value
        ds.file_meta.MediaStorageSOPInstanceUID = value
    burst = Burst(engine, [[old, neighbour]]).start()
    burst.join(WAIT)
    assert burst.acked == {uid, f"{uid}.1"}
    assert engine.stop() == 0
    old_path = index_rows(engine)[uid].path
    area = engine.area()

    new = ct_dataset(study_uid, series_uid, 1, seed=5)
    new.SOPInstanceUID = uid
    new.file_meta.MediaStorageSOPInstanceUID = uid
    data, file_bytes = _stored_bytes(new, "SCU0")
    digest = content_digest.of(data)
    new_path = engine.instance_path(study_uid, uid, digest)
    assert new_path.rsplit("/", 1)[0] == old_path.rsplit("/", 1)[0]
    (engine.storage / new_path).write_bytes(file_bytes)
    engine.execute(
        "UPDATE instances SET path = ?, digest = ?, size = ? WHERE sop_instance_uid = ?",
        new_path,
        digest,
        len(file_bytes),
        uid,
    )
    entry = {
        "path": new_path,
        "sop_instance_uid": uid,
        "digest": digest,
        "received_at": time.time(),
        "calling_ae": "SCU0",
        "called_ae": "ENGINE",
        "peer_ip": "127.0.0.1",
    }
    (area.journal_dir / "0badc0de.json").write_bytes(orjson.dumps([entry]))
    area.clean_mark.unlink()

    log = restart(engine)
    try:
        assert f"recovery: removing {old_path}, replaced by an overwrite" in log
        assert not (engine.storage / old_path).exists()
        rows = check_store(engine, {uid, f"{uid}.1"}, {uid: new, f"{uid}.1": neighbour})
        assert rows[uid].path == new_path
        assert len(engine.stored_files()) == 2
        assert engine.stop() == 0
    finally:
        engine.kill()
