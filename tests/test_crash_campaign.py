"""The crash campaign (``python -m bench crash``) in miniature, and its audit's honesty.

A tiny campaign (two rounds of kill -9 mid-burst and restart, a few small instances)
runs on the suite's transport and must report nothing lost and nothing left over. The
audit it relies on must see every kind of damage; the campaign must fail when a round
did, and its retry queue must re-send exactly what was not acknowledged.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson
from pydicom.uid import generate_uid

from bench import audit, crash, crash_report, scanner
from bench.generate import StudySpec
from bench.scanner import Share
from engine import status
from tests.burst import received_digest
from tests.helpers import REPO, TRANSPORT, Engine, ct_dataset, send_datasets

ROUNDS = 2


def test_tiny_campaign_loses_nothing_acknowledged(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "crash",
            "--rounds",
            str(ROUNDS),
            "--senders",
            "2",
            "--instances-per-round",
            "40",
            "--size",
            "64",
            "--seed",
            "7",
            "--transport",
            TRANSPORT or "native",
            "--out",
            str(out),
            "--work",
            str(work),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    report = orjson.loads((out / "crash.json").read_bytes())
    totals = report["totals"]
    assert report["ok"] is True
    assert report["settings"]["transport"] == (TRANSPORT or "native")
    assert totals["rounds"] == ROUNDS and len(report["rounds"]) == ROUNDS
    for name in crash_report.VIOLATIONS:
        assert totals[name] == 0, name
    assert totals["engine_crashes"] == 0 and report["crashes"] == []
    assert totals["verified_at_the_end"] == totals["acknowledged"]
    assert totals["verified_after_each_restart"] == totals["acknowledged"]
    # Committed but unanswered instances may stay; acknowledged ones must.
    assert totals["instances_at_the_end"] >= totals["acknowledged"]
    for r in report["rounds"]:
        assert r["engine_crash"] is None
        assert r["restart_s"] > 0 and r["startup_s"] is not None
        assert r["answered"] <= r["planned"]
        assert r["recovery"]["rows_forgotten"] == r["recovery"]["rows_dropped"] == 0
    assert f"round {ROUNDS}/{ROUNDS}: killed" in done.stderr  # progress per round
    assert "crash campaign PASSED" in (out / "crash.md").read_text()
    assert list(work.iterdir()) == []  # the engine's folder goes when all is well


def test_audit_sees_every_kind_of_damage(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "engine").start()
    study_uid, series_uid = generate_uid(), generate_uid()
    datasets = [ct_dataset(study_uid, series_uid, n) for n in range(1, 6)]
    try:
        answers = send_datasets(engine, datasets)
        assert {code for _, code in answers} == {status.SUCCESS}
    finally:
        assert engine.stop() == 0, engine.log()
    sent = {str(ds.SOPInstanceUID): received_digest(ds) for ds in datasets}
    clean = audit.audit(engine.storage, engine.index_path, sent)
    assert clean.ok, clean.summary()
    assert clean.verified == clean.rows == clean.files == len(datasets)

    rows = audit.index_rows(engine.index_path)
    gone, cut, other, moved, _ = (str(ds.SOPInstanceUID) for ds in datasets)
    (engine.storage / rows[gone].path).unlink()
    path = engine.storage / rows[cut].path
    path.write_bytes(path.read_bytes()[:-10])
    shutil.copy(engine.storage / rows[moved].path, engine.storage / "stray.dcm")
    (engine.storage / ".incoming" / "written.part").write_bytes(b"half a file")
    (engine.storage / ".incoming" / "spare.part").write_bytes(b"")
    (engine.storage / ".journal" / "run.log").write_bytes(b'{"batch": "b1", "files": []}\n')
    with contextlib.closing(sqlite3.connect(engine.index_path)) as db, db:
        db.execute("UPDATE series SET num_instances = 99")
    crashed = audit.Scratch(temps=frozenset({"spare.part"}), journals=frozenset({"run.log"}))

    found = audit.audit(
        engine.storage, engine.index_path, {**sent, other: "0" * 64}, crashed=crashed
    )
    assert not found.ok
    assert found.lost.keys() == {gone, cut, other}
    assert "no index row" not in found.lost.values()
    assert found.dangling == [gone]
    assert found.unreadable.keys() == {cut}
    assert found.orphans == ["stray.dcm"]
    assert found.temps == ["spare.part", "written.part"]
    assert found.journals == ["run.log (log of the crashed run)", "run.log#b1"]
    assert found.counters == [f"series {series_uid}"]
    assert found.verified == 2
    # Shallow (name and size only) for the rows not read: the cut file is still caught.
    shallow = audit.audit(engine.storage, engine.index_path, sent, deep=())
    assert shallow.unreadable.keys() == {cut} and shallow.verified == 0


def test_a_failed_round_fails_the_campaign(tmp_path: Path) -> None:
    settings = crash.Settings(
        rounds=1,
        senders=1,
        instances_per_round=1,
        size=8,
        seed=0,
        out=tmp_path / "out",
        work=tmp_path / "work",
        transport="native",
        fsync=True,
        keep=False,
    )
    campaign = crash.Campaign(settings, command="test")
    campaign.final = audit.Findings()
    violations = dict.fromkeys(crash_report.VIOLATIONS, 0) | {"orphans": 1}
    campaign.rounds.append(
        crash.RoundResult(
            round=1,
            kill_delay_s=0.1,
            killed_at_s=0.1,
            kill_after_burst=False,
            planned=1,
            resent=0,
            answered=1,
            acknowledged=1,
            acknowledged_resent=0,
            other_statuses={},
            unanswered=0,
            engine_crash=None,
            restart_s=0.5,
            startup_s=0.1,
            recovery=dict.fromkeys(crash.RECOVERY_LINES | crash.RECOVERY_EVENTS, 0),
            verified=1,
            violations=violations,
            examples={"orphans": ["ab/cd/x.dcm"]},
            log_errors=[],
        )
    )
    campaign.found["orphans"] = {"ab/cd/x.dcm"}
    assert campaign._finish(1.0) == 1
    report = orjson.loads((settings.out / "crash.json").read_bytes())
    assert report["ok"] is False and report["totals"]["orphans"] == 1
    assert "crash campaign FAILED" in (settings.out / "crash.md").read_text()
    assert campaign.ok is False


def test_retry_queue_resends_what_was_not_acknowledged() -> None:
    spec = StudySpec(studies=1, series=1, slices=6, rows=8, columns=8, seed=1)
    queue = crash._RetryQueue([[]])
    first = Share(spec, 0, tuple(range(6)))
    queue.settle(0, first, {scanner.slice_key(first, k) for k in (0, 1, 3)})
    assert queue.pending[0] == [Share(spec, 0, (2, 4, 5))]
    later = Share(StudySpec(studies=1, series=1, slices=2, rows=8, columns=8, seed=2), 0, (0, 1))
    assert queue.take(0, 2) == [Share(spec, 0, (2, 4))]  # oldest first, bounded
    queue.settle(0, later, {scanner.slice_key(first, 2), scanner.slice_key(later, 0)})
    assert queue.pending[0] == [Share(spec, 0, (4, 5)), Share(later.spec, 0, (1,))]


def test_scanner_data_are_the_bench_study() -> None:
    """What a scanner sends is the bench generator's series, each slice named by its key."""
    spec = StudySpec(studies=1, series=2, slices=3, rows=8, columns=8, seed=5)
    job = scanner.ScannerJob(
        "SCU0", 0, "ENGINE", (Share(spec, 1, (2, 0)),), Path("a"), Path("l"), 1.0
    )
    items = list(scanner.datasets(job))
    assert [key for key, _ in items] == ["5:1:2", "5:1:0"]
    assert [int(ds.InstanceNumber) for _, ds in items] == [3, 1]
    assert len({str(ds.SOPInstanceUID) for _, ds in items}) == 2
