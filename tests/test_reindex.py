"""``reindex`` and ``verify`` against a real engine process.

An engine (duplicate policy ``overwrite``, DICOMweb on) is filled with dcmtk's storescu
and pynetdicom: two CT studies, compressed MR images (JPEG-LS, JPEG 2000, RLE), a
Japanese name in UTF-8, an instance sent again with other content (overwritten) and
one refused into the quarantine. Its C-FIND answers at every level (both models), its
QIDO-RS answers, WADO-RS metadata and ``stats`` are recorded. ``reindex`` refuses to
run beside the engine; once it is stopped, a reindex beside the old index gives back
every row as it was, and one from the storage folder alone (index, -wal and -shm
deleted) gives an engine that answers all of it the same. ``verify`` finds a clean
store clean while the engine runs, and names a changed, a deleted and a stray file;
reindex then names what it cannot index, and refuses a nearly empty storage folder.

On a storage folder laid out by hand: origins from a crashed run's journal, the copy of
an instance the duplicate policy keeps, a file stored before BLAKE3. With transcoding:
the recorded digest (of what was received) is kept, and verify checks the size only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from engine import cli, status
from engine import digest as content_digest
from engine.storage import part10
from engine.storage.area import StorageArea
from tests.helpers import (
    Engine,
    ct_dataset,
    free_port,
    send_datasets,
    storescu,
    write_config,
    write_study,
)
from tests.test_move import compressed_originals, store_in_their_syntaxes

pytestmark = pytest.mark.peers

# What the engine keeps per instance beyond the file (reindex takes it from the old index).
ORIGIN_COLUMNS = ("received_at", "called_ae", "peer_ip")


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict[str, Any]:
        parsed: dict[str, Any] = orjson.loads(self.stdout)
        return parsed


Command = Callable[..., Ran]


@pytest.fixture
def command(capsys: pytest.CaptureFixture[str]) -> Command:
    """The command line run in the test's process (no interpreter start: faster)."""

    def run(*args: str) -> Ran:
        capsys.readouterr()
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


def web_root(engine: Engine) -> str:
    return str(engine.web_root)  # type: ignore[attr-defined]


# -- what the engine answers ----------------------------------------------------------


def keys(level: str, **values: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


class Finder:
    """One pynetdicom association for C-FINDs in both information models."""

    def __init__(self, engine: Engine) -> None:
        ae = AE(ae_title="FINDSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for model in (
            PatientRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelFind,
        ):
            ae.add_requested_context(model, [ExplicitVRLittleEndian])
        self.assoc = ae.associate("127.0.0.1", engine.port, ae_title=engine.ae_title)
        assert self.assoc.is_established

    def find(
        self, identifier: Dataset, model: str = StudyRootQueryRetrieveInformationModelFind
    ) -> list[Dataset]:
        matches: list[Dataset] = []
        for rsp, found in self.assoc.send_c_find(identifier, model):
            assert rsp is not None and "Status" in rsp
            if rsp.Status in (status.PENDING, status.PENDING_UNSUPPORTED_KEYS):
                assert found is not None
                matches.append(found)
            else:
                assert rsp.Status == status.SUCCESS
        return matches

    def close(self) -> None:
        self.assoc.release()


def c_find_answers(engine: Engine) -> list[list[tuple[str, str]]]:
    """Every patient, study, series and image the engine finds, as comparable values."""
    finder = Finder(engine)
    found: list[Dataset] = []
    try:
        found += finder.find(
            keys(
                "PATIENT",
                PatientID="",
                PatientName="",
                PatientBirthDate="",
                PatientSex="",
                NumberOfPatientRelatedStudies="",
                NumberOfPatientRelatedSeries="",
                NumberOfPatientRelatedInstances="",
            ),
            PatientRootQueryRetrieveInformationModelFind,
        )
        studies = finder.find(
            keys(
                "STUDY",
                StudyInstanceUID="",
                PatientID="",
                PatientName="",
                StudyDate="",
                StudyTime="",
                AccessionNumber="",
                StudyDescription="",
                ModalitiesInStudy="",
                SOPClassesInStudy="",
                NumberOfStudyRelatedSeries="",
                NumberOfStudyRelatedInstances="",
            )
        )
        found += studies
        for study in studies:
            series = finder.find(
                keys(
                    "SERIES",
                    StudyInstanceUID=study.StudyInstanceUID,
                    SeriesInstanceUID="",
                    Modality="",
                    SeriesNumber="",
                    SeriesDescription="",
                    NumberOfSeriesRelatedInstances="",
                )
            )
            found += series
            for one in series:
                found += finder.find(
                    keys(
                        "IMAGE",
                        StudyInstanceUID=study.StudyInstanceUID,
                        SeriesInstanceUID=one.SeriesInstanceUID,
                        SOPInstanceUID="",
                        SOPClassUID="",
                        InstanceNumber="",
                        Rows="",
                        Columns="",
                    )
                )
    finally:
        finder.close()
    return sorted(sorted((e.keyword, str(e.value)) for e in ds) for ds in found)


def web_answers(engine: Engine) -> dict[str, Any]:
    """QIDO-RS at the three levels and every study's WADO-RS metadata."""
    root = web_root(engine)
    answers: dict[str, Any] = {}
    for level in ("studies", "series", "instances"):
        response = requests.get(f"{root}/{level}?includefield=all", timeout=30)
        assert response.status_code == 200, response.text
        answers[level] = sorted(
            orjson.dumps(item, option=orjson.OPT_SORT_KEYS) for item in response.json()
        )
    for study in answers["studies"]:
        uid = orjson.loads(study)["0020000D"]["Value"][0]
        response = requests.get(f"{root}/studies/{uid}/metadata", timeout=30)
        assert response.status_code == 200, response.text
        answers[uid] = sorted(
            orjson.dumps(item, option=orjson.OPT_SORT_KEYS) for item in response.json()
        )
    return answers


def index_rows(index: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The index's tables, each sorted (read-only)."""
    with contextlib.closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True)) as db:
        return {
            table: sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
            for table in (
                "patients",
                "studies",
                "series",
                "instances",
                "instance_headers",
                "quarantine",
            )
        }


def without(
    rows: list[tuple[Any, ...]], index: Path, table: str, columns: tuple[str, ...]
) -> list[tuple[Any, ...]]:
    """Rows of ``table`` with ``columns`` left out."""
    with contextlib.closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True)) as db:
        names = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
    keep = [n for n, name in enumerate(names) if name not in columns]
    return sorted((tuple(row[n] for n in keep) for row in rows), key=repr)


# -- the archive ---------------------------------------------------------------------------


@dataclass
class Archive:
    engine: Engine
    c_find: list[list[tuple[str, str]]]
    web: dict[str, Any]
    stats: dict[str, int]
    rows: dict[str, list[tuple[Any, ...]]]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    root = tmp_path_factory.mktemp("reindex")
    web = {"host": "127.0.0.1", "port": free_port()}
    engine = Engine(
        root / "engine",
        {"dicomweb": web, "ingest": {"duplicate_policy": "overwrite"}, "storage": {"fsync": False}},
    ).start()
    engine.web_root = f"http://127.0.0.1:{web['port']}/dicom-web"  # type: ignore[attr-defined]
    try:
        write_study(
            root / "ct", n_series=2, n_instances=3, patient_id="PA", patient_name="Alpha^Ann"
        )
        storescu(engine, str(root / "ct"))
        store_in_their_syntaxes(engine, compressed_originals())
        study, series = generate_uid(), generate_uid()
        japanese = [
            ct_dataset(study, series, n, patient_id="PJ", patient_name="山田^太郎", seed=3)
            for n in range(1, 4)
        ]
        for ds in japanese:
            ds.SpecificCharacterSet = "ISO_IR 192"
        assert {code for _, code in send_datasets(engine, japanese)} == {status.SUCCESS}
        again = ct_dataset(study, series, 99, patient_id="PJ", patient_name="山田^太郎", seed=3)
        again.SpecificCharacterSet = "ISO_IR 192"
        again.SOPInstanceUID = japanese[0].SOPInstanceUID
        again.file_meta.MediaStorageSOPInstanceUID = again.SOPInstanceUID
        refused = ct_dataset(study, series, 7, patient_id="PJ")
        del refused.SeriesInstanceUID
        answered = send_datasets(engine, [japanese[1], again, refused])  # same bytes, other, bad
        assert [code for _, code in answered] == [
            status.SUCCESS,
            status.SUCCESS,
            status.MISSING_ATTRIBUTE,
        ]
        stats = engine.stats()
        assert stats["instances"] == 6 + 3 + 3 and stats["quarantined"] == 1
        answers = c_find_answers(engine)
        overwritten = ("SOPInstanceUID", str(again.SOPInstanceUID))
        assert ("InstanceNumber", "99") in next(a for a in answers if overwritten in a)
        web_before = web_answers(engine)
        assert len(web_before["instances"]) == stats["instances"]
        assert (
            sum(
                len(web_before[orjson.loads(s)["0020000D"]["Value"][0]])
                for s in web_before["studies"]
            )
            == stats["instances"]
        )
        assert (
            len(answers)
            == stats["patients"] + stats["studies"] + stats["series"] + stats["instances"]
        )
        yield Archive(engine, answers, web_before, stats, index_rows(engine.index_path))
    finally:
        if engine.process is not None:
            engine.stop()


def test_reindex_refuses_while_the_engine_runs_and_verify_finds_it_clean(
    archive: Archive, command: Command
) -> None:
    config = str(archive.engine.config_path)
    refused = command("reindex", "--config", config)
    assert refused.returncode == 1
    assert "an engine is running on the storage folder" in refused.stderr
    assert index_rows(archive.engine.index_path) == archive.rows
    assert not Path(f"{archive.engine.index_path}.reindex").exists()
    checked = command("verify", "--config", config)
    assert checked.returncode == 0, checked.stderr
    result = checked.result
    assert result["ok"] and result["instances"] == archive.stats["instances"]
    assert result["files"] == archive.stats["instances"]
    assert result["bytes"] == archive.stats["bytes"]


def test_reindex_gives_back_the_same_index_and_answers(archive: Archive, command: Command) -> None:
    engine = archive.engine
    config = str(engine.config_path)
    assert engine.stop() == 0
    # A scheduled backup's record: nothing in the files says it, the old index does.
    with contextlib.closing(sqlite3.connect(engine.index_path)) as db, db:
        db.execute(
            "INSERT INTO backups (started_at, finished_at, destination, ok) VALUES (1, 2, '/b', 1)"
        )

    beside = command("reindex", "--config", config)
    assert beside.returncode == 0, beside.stderr
    result = beside.result
    assert result["instances"] == archive.stats["instances"] and result["ok"]
    assert result["old_index"] == "read" and result["origins"] == {"old index": result["instances"]}
    assert result["copied_tables"]["backups"] == 1 and result["copied_tables"]["quarantine"] == 1
    assert index_rows(engine.index_path) == archive.rows  # every row, times and origins too
    assert not Path(f"{engine.index_path}.bak").exists()
    assert not Path(f"{engine.index_path}.reindex").exists()

    for suffix in ("", "-wal", "-shm"):
        Path(f"{engine.index_path}{suffix}").unlink(missing_ok=True)
    alone = command("reindex", "--config", config)
    assert alone.returncode == 0, alone.stderr
    assert alone.result["old_index"] == "none" and alone.result["origins"] == {"file": 12}
    assert "the quarantine table was rebuilt from 1 notes" in alone.stderr
    rows = index_rows(engine.index_path)
    assert rows["patients"] == archive.rows["patients"]
    assert rows["instance_headers"] == archive.rows["instance_headers"]  # WADO-RS metadata
    assert len(rows["instance_headers"]) == archive.stats["instances"]
    # The overwritten copy, digests, sizes, calling AE titles (from the file meta) alike;
    # receive times from the files, so the studies' and series' times too.
    for table, columns in (
        ("instances", ORIGIN_COLUMNS),
        ("studies", ("created_at", "updated_at", "stable_at")),
        ("series", ("updated_at",)),
        ("quarantine", ("received_at",)),  # a note keeps it to the second
    ):
        assert without(rows[table], engine.index_path, table, columns) == without(
            archive.rows[table], engine.index_path, table, columns
        ), table

    engine.start()
    assert engine.stats() == archive.stats
    assert c_find_answers(engine) == archive.c_find
    assert web_answers(engine) == archive.web


def test_reindex_refuses_a_folder_much_emptier_than_the_index(
    archive: Archive, command: Command, tmp_path: Path
) -> None:
    """An unmounted disk leaves an empty folder: never trade a full index for an empty one."""
    engine = archive.engine
    assert engine.config_path is not None
    config_path = tmp_path / "config.toml"
    (tmp_path / "storage").mkdir()
    with (
        contextlib.closing(sqlite3.connect(engine.index_path, timeout=30)) as source,
        contextlib.closing(sqlite3.connect(tmp_path / "index.sqlite")) as copy,
    ):
        source.backup(copy)
    config_path.write_text(
        engine.config_path.read_text()
        .replace('path = "storage"', f'path = "{tmp_path / "storage"}"')
        .replace('path = "index.sqlite"', f'path = "{tmp_path / "index.sqlite"}"')
    )
    refused = command("reindex", "--config", str(config_path))
    assert refused.returncode == 1
    assert "holds 0 files but the index lists 12 instances" in refused.stderr
    forced = command("reindex", "--config", str(config_path), "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.result["instances"] == 0
    assert "the old index is kept as" not in forced.stderr


def test_verify_names_damage_and_reindex_reports_what_it_cannot_index(
    archive: Archive, command: Command
) -> None:
    engine = archive.engine
    config = str(engine.config_path)
    stored = engine.stored_files()
    changed, deleted = stored[0], stored[-1]
    data = bytearray(changed.read_bytes())
    data[len(data) - 10] ^= 0xFF  # one byte of the pixel data
    changed.write_bytes(bytes(data))
    deleted.unlink()
    stray = changed.parent / "notes.dcm"
    stray.write_bytes(b"not DICOM at all")
    rel = {p: str(p.relative_to(engine.storage)) for p in (changed, deleted, stray)}

    checked = command("verify", "--config", config)  # the engine runs
    assert checked.returncode == 1
    result = checked.result
    assert (result["missing"], result["changed"], result["unindexed"]) == (1, 1, 1)
    assert f"error: missing: {rel[deleted]}" in checked.stderr
    assert f"error: changed: {rel[changed]}" in checked.stderr
    assert "its content is not what was stored" in checked.stderr
    assert f"error: unindexed: {rel[stray]}" in checked.stderr

    assert engine.stop() == 0
    rebuilt = command("reindex", "--config", config)
    assert rebuilt.returncode == 1  # it finished, and says what it could not index
    result = rebuilt.result
    assert result["instances"] == archive.stats["instances"] - 1
    assert result["not_indexed"] == 1 and result["changed"] == 1
    assert f"error: {rel[stray]}: not indexed: not a DICOM Part 10 file" in rebuilt.stderr
    assert (
        f"error: {rel[changed]}: indexed, but its content is not what was stored" in rebuilt.stderr
    )
    engine.start()
    assert engine.stats()["instances"] == archive.stats["instances"] - 1
    again = command("verify", "--config", config)
    assert again.returncode == 1
    assert again.result["missing"] == 0 and again.result["changed"] == 1
    stray.unlink()
    shutil.copyfile(stored[1], stored[1].with_name("copy-of-an-instance.bin"))
    extra = command("verify", "--config", config)
    assert "copy-of-an-instance.bin" in extra.stderr and extra.result["unindexed"] == 1


# -- a storage folder laid out by hand --------------------------------------------------


def lay_out(storage: Path, ds: Dataset, name_digest: str | None = None) -> tuple[str, str]:
    """``ds`` as the engine stores it; returns (relative path, the dataset's BLAKE3)."""
    data = encode(ds, is_implicit_vr=False, is_little_endian=True)
    digest = content_digest.of(data)
    rel = StorageArea.instance_path(
        str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), name_digest or digest
    )
    path = storage / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    head = part10.header(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian, "CT1")
    path.write_bytes(head + data)
    return rel, digest


def rows_of(index: Path) -> dict[str, tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True)) as db:
        return {
            row[0]: row[1:]
            for row in db.execute(
                "SELECT sop_instance_uid, path, digest, received_at, calling_ae, called_ae,"
                " peer_ip, instance_number FROM instances"
            )
        }


def test_reindex_takes_origins_from_journals_and_picks_copies_by_policy(
    tmp_path: Path, command: Command
) -> None:
    storage = tmp_path / "storage"
    study, series = generate_uid(), generate_uid()
    a, b, c = (ct_dataset(study, series, n) for n in (1, 2, 3))
    a_path, a_digest = lay_out(storage, a)
    b_path, _ = lay_out(storage, b)
    b.InstanceNumber = 22  # another copy of b, with other content, written later
    b2_path, _ = lay_out(storage, b)
    os.utime(storage / b_path, (1000, 1000))
    legacy = hashlib.sha256(encode(c, is_implicit_vr=False, is_little_endian=True)).hexdigest()
    c_path, _ = lay_out(storage, c, name_digest=legacy)  # stored before BLAKE3
    journal = storage / ".journal"
    journal.mkdir()
    entry = {
        "path": a_path,
        "sop_instance_uid": str(a.SOPInstanceUID),
        "digest": a_digest,
        "received_at": 1234.5,
        "calling_ae": "CT1",
        "called_ae": "ENGINE",
        "peer_ip": "10.0.0.4",
    }
    (journal / "crashed.log").write_bytes(orjson.dumps({"batch": "b1", "files": [entry]}) + b"\n")

    def reindex(policy: str) -> Ran:
        sections = {
            "dicom": {"ae_title": "ENGINE"},
            "storage": {"path": "storage"},
            "index": {"path": "index.sqlite"},
            "ingest": {"duplicate_policy": policy},
        }
        return command("reindex", "--config", str(write_config(tmp_path, sections)))

    index = tmp_path / "index.sqlite"
    ran = reindex("overwrite")
    assert ran.returncode == 1  # the copy left out is named
    assert (ran.result["not_indexed"], ran.result["changed"]) == (1, 0)
    assert ran.result["instances"] == 3 and ran.result["origins"] == {"journal": 1, "file": 2}
    assert f"error: {b_path}: not indexed: another copy of {b.SOPInstanceUID}" in ran.stderr
    rows = rows_of(index)
    assert rows[str(a.SOPInstanceUID)] == (a_path, a_digest, 1234.5, "CT1", "ENGINE", "10.0.0.4", 1)
    assert rows[str(b.SOPInstanceUID)][0] == b2_path  # overwrite: the newest copy
    assert rows[str(b.SOPInstanceUID)][3:] == ("CT1", "", "", 22)  # Source AE Title, unknown
    assert rows[str(c.SOPInstanceUID)][:2] == (c_path, legacy)
    assert (storage / b_path).exists()  # nothing in the storage folder is removed

    # With the old index beside it, the copy it named stays, whatever the policy says.
    assert reindex("keep").returncode == 1
    assert rows_of(index) == rows
    for suffix in ("", "-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    again = reindex("keep")
    assert f"error: {b2_path}: not indexed" in again.stderr
    assert rows_of(index)[str(b.SOPInstanceUID)][0] == b_path  # keep: the first copy


def test_transcoded_images_keep_the_digest_of_what_was_received(
    tmp_path: Path, command: Command
) -> None:
    """Stored decompressed, an image's recorded digest is of the compressed bytes sent:
    verify checks its size only, and a reindex beside the old index keeps that digest."""
    engine = Engine(tmp_path / "engine", {"ingest": {"transcode": "explicit-little"}}).start()
    try:
        store_in_their_syntaxes(engine, compressed_originals())
        checked = command("verify", "--config", str(engine.config_path))
        assert checked.returncode == 0, checked.stderr
        assert checked.result["size_only"] == 3
    finally:
        assert engine.stop() == 0
    before = index_rows(engine.index_path)
    beside = command("reindex", "--config", str(engine.config_path))
    assert beside.returncode == 0, beside.stderr
    assert index_rows(engine.index_path) == before
    for suffix in ("", "-wal", "-shm"):
        Path(f"{engine.index_path}{suffix}").unlink(missing_ok=True)
    alone = command("reindex", "--config", str(engine.config_path))
    assert alone.returncode == 0, alone.stderr
    checked = command("verify", "--config", str(engine.config_path))
    assert checked.returncode == 0, checked.stderr
    assert checked.result["size_only"] == 0  # digests of the files now: checked in full
