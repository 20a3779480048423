"""Backups, their verification and restores, against real engine processes.

A backup is made while a pynetdicom sender stores into the running engine, then again
once it has finished (only the new files are copied); the backup is restored into a
fresh folder, and the restored engine answers the same stats and C-FIND queries from
byte-identical files. A backup interrupted twice (Ctrl-C, then kill -9, each once the
manifest shows progress) resumes where it stopped. A damaged backup is found by
``--verify``; restore refuses a target in use or not empty; scheduled backups show in
``stats``, and a schedule that cannot back up logs a WARNING.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from engine import cli, status
from engine import config as config_module
from engine.config import BackupConfig
from engine.errors import ConfigError
from tests.helpers import REPO, Engine, ct_dataset, storescu, write_study

pytestmark = pytest.mark.peers

WAIT = 30.0
POLL = 0.002
NO_FSYNC = {"storage": {"fsync": False}}  # faster filling; backups do not depend on it


def engine_command(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m engine ...`` in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


Command = Callable[..., Ran]


@pytest.fixture
def command(capsys: pytest.CaptureFixture[str]) -> Command:
    """The same command line run in the test's process (no interpreter start: faster)."""

    def run(*args: str) -> Ran:
        capsys.readouterr()
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


def back_up(engine: Engine, destination: Path) -> dict[str, Any]:
    run = engine_command("backup", "--config", str(engine.config_path), "--to", str(destination))
    assert run.returncode == 0, run.stderr
    result: dict[str, Any] = orjson.loads(run.stdout)
    return result


def verify(command: Command, destination: Path) -> tuple[int, dict[str, Any]]:
    run = command("backup", "--verify", "--to", str(destination))
    return run.returncode, orjson.loads(run.stdout) if run.stdout else {}


def restore(command: Command, backup: Path, target: Engine, *extra: str) -> Ran:
    return command("restore", "--from", str(backup), "--config", str(target.config_path), *extra)


def manifest_entries(destination: Path, busy_timeout_ms: int = 10_000) -> int:
    """Instance files the manifest lists (what a backup has committed so far); 0 while
    it has no table yet, or stays locked beyond ``busy_timeout_ms``."""
    path = destination / "manifest.sqlite"
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        db.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        try:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM files WHERE path LIKE 'storage/%'"
            ).fetchone()
        except sqlite3.OperationalError:  # created, its table not yet; or locked
            return 0
    return int(count)


def query(index: Path, sql: str) -> Any:
    """The one value ``sql`` selects from an index file, read-only."""
    with contextlib.closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True)) as db:
        return db.execute(sql).fetchone()[0]


def full_stats(command: Command, engine: Engine) -> dict[str, Any]:
    """``stats`` with the last backup (``Engine.stats`` is typed for the counts only)."""
    run = command("stats", "--config", str(engine.config_path))
    assert run.returncode == 0, run.stderr
    result: dict[str, Any] = orjson.loads(run.stdout)
    return result


def files_of(engine: Engine) -> dict[str, bytes]:
    return {str(p.relative_to(engine.storage)): p.read_bytes() for p in engine.stored_files()}


def counts(engine: Engine) -> dict[str, Any]:
    return {k: v for k, v in engine.stats().items() if k != "last_backup"}


class PacedSender(threading.Thread):
    """One pynetdicom association storing ``datasets``, a pause after each, as a scanner
    sending a series over a few seconds."""

    def __init__(self, engine: Engine, datasets: list[Dataset], pause: float) -> None:
        super().__init__(daemon=True)
        self.engine, self.datasets, self.pause = engine, datasets, pause
        self.statuses: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            ae = AE(ae_title="PACED")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
            ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
            assoc = ae.associate("127.0.0.1", self.engine.port, ae_title=self.engine.ae_title)
            assert assoc.is_established
            try:
                for ds in self.datasets:
                    rsp = assoc.send_c_store(ds)
                    self.statuses.append(int(rsp.Status) if "Status" in rsp else -1)
                    time.sleep(self.pause)
            finally:
                assoc.release()
        except BaseException as exc:
            self.error = exc


def c_find(engine: Engine, identifier: Dataset) -> list[Dataset]:
    ae = AE(ae_title="FINDSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    model = StudyRootQueryRetrieveInformationModelFind
    ae.add_requested_context(model, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", engine.port, ae_title=engine.ae_title)
    assert assoc.is_established
    matches: list[Dataset] = []
    try:
        for rsp, found in assoc.send_c_find(identifier, model):
            assert rsp is not None and "Status" in rsp
            if rsp.Status == status.PENDING:
                assert found is not None
                matches.append(found)
            else:
                assert rsp.Status == status.SUCCESS
    finally:
        assoc.release()
    return matches


def keys(level: str, **values: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def answers(engine: Engine) -> list[list[tuple[str, str]]]:
    """Every study, series and image the engine finds, as comparable values."""
    found: list[Dataset] = []
    studies = c_find(
        engine,
        keys(
            "STUDY",
            StudyInstanceUID="",
            PatientID="",
            PatientName="",
            StudyDate="",
            AccessionNumber="",
            ModalitiesInStudy="",
            NumberOfStudyRelatedSeries="",
            NumberOfStudyRelatedInstances="",
        ),
    )
    found.extend(studies)
    for study in studies:
        series = c_find(
            engine,
            keys(
                "SERIES",
                StudyInstanceUID=study.StudyInstanceUID,
                SeriesInstanceUID="",
                Modality="",
                SeriesNumber="",
                NumberOfSeriesRelatedInstances="",
            ),
        )
        found.extend(series)
        for one in series:
            found.extend(
                c_find(
                    engine,
                    keys(
                        "IMAGE",
                        StudyInstanceUID=study.StudyInstanceUID,
                        SeriesInstanceUID=one.SeriesInstanceUID,
                        SOPInstanceUID="",
                        SOPClassUID="",
                        InstanceNumber="",
                    ),
                )
            )
    return sorted(sorted((e.keyword, str(e.value)) for e in ds) for ds in found)


def wait_for(condition: Any, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- a backup made while a sender stores, then an incremental one --------------------


@dataclass
class Archive:
    source: Engine
    backup: Path
    first: dict[str, Any]
    second: dict[str, Any]
    sending_after_first: bool


STORED_FIRST = 30
SENT_DURING = 50


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    root = tmp_path_factory.mktemp("archive")
    source = Engine(root / "source", NO_FSYNC).start()
    try:
        write_study(root / "study", n_series=2, n_instances=STORED_FIRST // 2)
        storescu(source, str(root / "study"))
        study, series = generate_uid(), generate_uid()
        datasets = [
            ct_dataset(study, series, n, patient_id="PAT002", seed=7)
            for n in range(1, SENT_DURING + 1)
        ]
        sender = PacedSender(source, datasets, pause=0.04)
        sender.start()
        wait_for(lambda: len(sender.statuses) >= 5, "the sender's first stores")
        destination = root / "backup"
        destination.mkdir()
        first = back_up(source, destination)
        sending_after_first = sender.is_alive()
        sender.join(WAIT)
        assert sender.error is None
        assert sender.statuses == [status.SUCCESS] * SENT_DURING
        second = back_up(source, destination)
        yield Archive(source, destination, first, second, sending_after_first)
    finally:
        source.stop()


def test_backup_while_storing_then_only_new_files(archive: Archive, command: Command) -> None:
    first, second = archive.first, archive.second
    # The first backup ran while the sender stored: its index copy is a snapshot
    # taken part-way, and it holds exactly the files that snapshot names.
    assert archive.sending_after_first
    assert first["ok"] and first["problems"] == []
    assert STORED_FIRST < first["instances"] < STORED_FIRST + SENT_DURING
    assert first["files_copied"] == first["instances"]
    # The second copies only what the first did not have.
    total = STORED_FIRST + SENT_DURING
    assert second["ok"]
    assert second["instances"] == total
    assert second["files_copied"] == total - first["instances"]
    assert second["files_in_backup"] == total + 1  # and the index
    code, report = verify(command, archive.backup)
    assert code == 0 and report["ok"] and report["files"] == total + 1
    assert query(archive.backup / "index.sqlite", "SELECT COUNT(*) FROM instances") == total
    stored = sorted(
        p.relative_to(archive.backup / "storage")
        for p in (archive.backup / "storage").rglob("*.dcm")
    )
    assert stored == sorted(
        p.relative_to(archive.source.storage) for p in archive.source.stored_files()
    )


def test_restore_gives_the_same_stats_answers_and_files(
    archive: Archive, tmp_path: Path, command: Command
) -> None:
    target = Engine(tmp_path / "restored", NO_FSYNC)
    run = restore(command, archive.backup, target)
    assert run.returncode == 0, run.stderr
    result = orjson.loads(run.stdout)
    assert result["ok"] and result["files"] == STORED_FIRST + SENT_DURING
    target.start()
    try:
        assert counts(target) == counts(archive.source)
        assert answers(target) == answers(archive.source)
        assert files_of(target) == files_of(archive.source)
        assert "not clean" not in target.log()  # a complete restore needs no file check
    finally:
        assert target.stop() == 0


def test_restore_refuses_a_target_in_use_or_not_empty(
    archive: Archive, tmp_path: Path, command: Command
) -> None:
    before = files_of(archive.source)
    run = restore(command, archive.backup, archive.source)
    assert run.returncode == 1
    assert "an engine is running on the storage folder" in run.stderr
    assert files_of(archive.source) == before

    target = Engine(tmp_path / "target", NO_FSYNC)
    assert restore(command, archive.backup, target).returncode == 0
    (target.storage / "note.txt").write_text("kept")
    run = restore(command, archive.backup, target)
    assert run.returncode == 1
    assert "refusing to restore" in run.stderr and "--force" in run.stderr
    run = restore(command, archive.backup, target, "--force")
    assert run.returncode == 0, run.stderr
    assert (target.storage / "note.txt").read_text() == "kept"  # other files stay
    assert files_of(target) == before


def test_backup_failures_are_named(archive: Archive, tmp_path: Path, command: Command) -> None:
    config = str(archive.source.config_path)
    run = command("backup", "--config", config, "--to", str(tmp_path / "nowhere"))
    assert run.returncode == 1
    assert "does not exist" in run.stderr and "nowhere" in run.stderr
    (tmp_path / "file").write_text("")
    run = command("backup", "--config", config, "--to", str(tmp_path / "file"))
    assert run.returncode == 1 and "is not a folder" in run.stderr
    run = command("backup", "--verify", "--to", str(tmp_path))
    assert run.returncode == 1 and "no backup in" in run.stderr
    run = command("restore", "--from", str(tmp_path), "--config", config)
    assert run.returncode == 1 and "no backup in" in run.stderr
    inside = archive.source.storage / "backup"
    inside.mkdir()
    try:
        run = command("backup", "--config", config, "--to", str(inside))
        assert run.returncode == 1 and "must be outside the storage folder" in run.stderr
    finally:
        inside.rmdir()
    run = command("backup", "--config", config)  # no --to, no [backup] destination
    assert run.returncode == 2 and "give --to DIR or set [backup] destination" in run.stderr

    # A disk too small for the archive: a tmpfs of 256 KB in a mount namespace of the
    # backup's own (root only; the backup process sees it, nobody else does).
    small = tmp_path / "small"
    small.mkdir()
    script = (
        f'mount -t tmpfs -o size=256k tmpfs "{small}" && exec "{sys.executable}"'
        f' -m engine backup --config "{config}" --to "{small}"'
    )
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare for a small filesystem")
    full = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "mount" in full.stderr and full.returncode == 32:
        pytest.skip(f"cannot mount a tmpfs here: {full.stderr}")
    assert full.returncode == 1, full.stderr
    assert f"error: not enough space in {small}" in full.stderr, full.stderr


def test_backup_settings_are_checked(tmp_path: Path) -> None:
    base = {"dicom": {}, "storage": {}, "index": {}}
    assert config_module.from_mapping(base, tmp_path).backup == BackupConfig()  # off
    config = config_module.from_mapping(
        base | {"backup": {"destination": "backup", "interval": 3600}}, tmp_path
    )
    assert config.backup.destination == tmp_path / "backup"
    with pytest.raises(ConfigError, match=r"'backup\.destination' must be set"):
        config_module.from_mapping(base | {"backup": {"interval": 60}}, tmp_path)
    with pytest.raises(ConfigError, match="must be 0 or more"):
        config_module.from_mapping(base | {"backup": {"warn_after": -1}}, tmp_path)


# -- an interrupted backup resumes; a damaged one is found -----------------------------


def interrupt(engine: Engine, destination: Path, at: int, sig: signal.Signals) -> int:
    """Start a backup, send ``sig`` once the manifest lists ``at`` files; returns its
    exit status.

    The backup is stopped (SIGSTOP) while its manifest is looked at, so it cannot finish
    between the look and the signal (it copies these small files in a fraction of a
    second; on a busy machine this process can be off the CPU that long)."""
    backup = subprocess.Popen(
        [
            sys.executable, "-m", "engine", "backup",
            "--config", str(engine.config_path), "--to", str(destination),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT
        while True:
            assert backup.poll() is None, "the backup ended before it could be interrupted"
            backup.send_signal(signal.SIGSTOP)
            # A stopped backup may hold the manifest's lock: do not wait for it.
            if manifest_entries(destination, busy_timeout_ms=0) >= at:
                break
            backup.send_signal(signal.SIGCONT)
            assert time.monotonic() < deadline, "the backup made no progress"
            time.sleep(POLL)
        backup.send_signal(sig)  # pending until it runs again (SIGKILL ends it stopped)
        backup.send_signal(signal.SIGCONT)
        code = backup.wait(WAIT)
        assert backup.stderr is not None
        if sig == signal.SIGINT:
            assert b"interrupted: run the same command again to resume" in backup.stderr.read()
        return code
    finally:
        if backup.poll() is None:
            backup.kill()
            backup.wait()
        if backup.stderr is not None:
            backup.stderr.close()


MANY = 800  # small files: a backup of them takes a fraction of a second, far more than a poll


def test_interrupted_backup_resumes_and_verify_finds_damage(
    tmp_path: Path, command: Command
) -> None:
    engine = Engine(tmp_path / "engine", NO_FSYNC).start()
    try:
        write_study(tmp_path / "study", n_series=4, n_instances=MANY // 4, size=16)
        storescu(engine, str(tmp_path / "study"))
        destination = tmp_path / "backup"
        destination.mkdir()

        assert interrupt(engine, destination, 1, signal.SIGINT) == 130
        after_ctrl_c = manifest_entries(destination)
        assert 0 < after_ctrl_c < MANY
        assert not (destination / "index.sqlite").exists()  # no index without its files

        assert interrupt(engine, destination, after_ctrl_c + 1, signal.SIGKILL) == -signal.SIGKILL
        after_kill = manifest_entries(destination)
        assert after_ctrl_c < after_kill < MANY
        assert not (destination / "index.sqlite").exists()

        resumed = back_up(engine, destination)
        assert resumed["ok"] and resumed["instances"] == MANY
        assert resumed["files_copied"] == MANY - after_kill
        assert list((destination / ".incoming").iterdir()) == []
        code, report = verify(command, destination)
        assert code == 0 and report["files"] == MANY + 1
        again = command("backup", "--config", str(engine.config_path), "--to", str(destination))
        assert orjson.loads(again.stdout)["files_copied"] == 0
    finally:
        assert engine.stop() == 0

    files = sorted((destination / "storage").rglob("*.dcm"))
    damaged, removed = files[10], files[20]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    removed.unlink()
    code, report = verify(command, destination)
    assert code == 1 and not report["ok"]
    name = str(damaged.relative_to(destination))
    assert report["problems"] == sorted(
        [f"{name}: corrupted (its digest differs)", f"{removed.relative_to(destination)}: missing"]
    )


def test_source_files_missing_or_changed_fail_the_backup(tmp_path: Path, command: Command) -> None:
    engine = Engine(tmp_path / "engine", NO_FSYNC).start()
    try:
        write_study(tmp_path / "study", n_series=1, n_instances=6)
        storescu(engine, str(tmp_path / "study"))
        files = engine.stored_files()
        files[0].unlink()
        changed = bytearray(files[1].read_bytes())
        changed[-1] ^= 0xFF
        files[1].write_bytes(bytes(changed))
        destination = tmp_path / "backup"
        destination.mkdir()
        run = command("backup", "--config", str(engine.config_path), "--to", str(destination))
        assert run.returncode == 1
        result = orjson.loads(run.stdout)
        assert not result["ok"] and result["files_copied"] == 4
        first = str(files[0].relative_to(engine.storage))
        second = str(files[1].relative_to(engine.storage))
        assert f"error: {first}: missing from the storage folder" in run.stderr
        assert f"error: {second}: its content is not what was stored" in run.stderr
        code, report = verify(command, destination)
        assert code == 1
        assert sorted(p.split(":")[0] for p in report["problems"]) == sorted(
            [f"storage/{first}", f"storage/{second}"]
        )
    finally:
        engine.kill()


# -- scheduled backups ---------------------------------------------------------------------


def test_scheduled_backups_show_in_stats_and_warn_when_stale(
    tmp_path: Path, command: Command
) -> None:
    destination = tmp_path / "backup"
    destination.mkdir()
    good = Engine(
        tmp_path / "good",
        # A long warn_after: a slow first backup on a busy machine is not "stale".
        NO_FSYNC | {"backup": {"destination": str(destination), "interval": 0.5, "warn_after": 30}},
    )
    bad = Engine(
        tmp_path / "bad",
        NO_FSYNC
        | {
            "backup": {
                "destination": str(tmp_path / "unmounted"),
                "interval": 0.3,
                "warn_after": 0.5,
            }
        },
    )
    good.start()
    bad.start()
    try:
        write_study(tmp_path / "study", n_series=1, n_instances=3)
        storescu(good, str(tmp_path / "study"))

        def backed_up() -> bool:
            if not (destination / "index.sqlite").exists():
                return False
            return bool(query(destination / "index.sqlite", "SELECT COUNT(*) FROM instances") == 3)

        wait_for(backed_up, "a scheduled backup of the 3 instances")
        # Stopped before reading the backup: with a 0.5 s interval the next backup would
        # otherwise hold the folder's lock whenever verify came (it refuses then).
        assert good.stop() == 0
        stats = full_stats(command, good)
        assert stats["instances"] == 3  # the counts are still there
        last = stats["last_backup"]
        assert last["ok"] is True and last["age"] >= 0 and last["last_ok_age"] >= 0
        assert last["time"].endswith("Z") and last["destination"] == str(destination)
        assert verify(command, destination)[0] == 0
        finished = query(good.index_path, "SELECT MAX(finished_at) FROM backups WHERE ok")
        assert finished is not None and time.time() - finished < WAIT

        wait_for(lambda: "WARNING" in bad.log() and "no good backup" in bad.log(), "a warning")
        last = full_stats(command, bad)["last_backup"]
        assert last["ok"] is False and last["last_ok_age"] is None
        assert "does not exist" in last["message"]
        assert "no good backup" not in good.log()
    finally:
        if good.process is not None:
            assert good.stop() == 0
        assert bad.stop() == 0
