"""C-FIND against a running engine, with real peers: dcmtk ``findscu`` and pynetdicom.

Runs on the transport ``ENGINE_TRANSPORT`` says (the suite runs once per transport), on
each index backend (the ``backend`` fixture: SQLite and PostgreSQL).
The engine is filled over DICOM (three patients, four studies, CT and MR, a Japanese
name in UTF-8), then queried at every level of both information models: wildcards,
date ranges, UID lists, universal matching, the computed counts, hierarchy errors,
the match cap and C-CANCEL. Matching in depth is tested in ``tests/test_query.py``.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from engine import status
from engine.dicom import dimse
from engine.dicom.qr import STUDY_ROOT_FIND, Found, QueryService, encode_identifier
from engine.dicom.services import Request
from engine.model import Origin
from tests.helpers import Engine, ct_dataset, dcmtk_env, send_datasets
from tests.postgres import BACKENDS, SQLITE, new_index

# PostgreSQL in both transports' runs (tests/postgres.py).
POSTGRES_ON_EVERY_TRANSPORT = True

PATIENTS = {
    "P1": "Doe^John",
    "P2": "Doe^Jane",
    "P3": "山田^太郎",
}


def study(patient_id: str, date: str, modality: str, accession: str, n: int) -> list[Dataset]:
    study_uid, series_uid = generate_uid(), generate_uid()
    datasets = []
    for number in range(1, n + 1):
        ds = ct_dataset(
            study_uid, series_uid, number, patient_id=patient_id, patient_name=PATIENTS[patient_id]
        )
        ds.StudyDate = date
        ds.Modality = modality
        ds.AccessionNumber = accession
        if not PATIENTS[patient_id].isascii():
            ds.SpecificCharacterSet = "ISO_IR 192"
        datasets.append(ds)
    return datasets


@pytest.fixture(scope="module")
def filled(
    backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[Engine, list[list[Dataset]]]]:
    engine = Engine(
        tmp_path_factory.mktemp("find"),
        {"query": {"max_matches": 3}},
        index_url=new_index(backend, request, "find"),
    ).start()
    studies = [
        study("P1", "20260110", "CT", "ACC1", 3),
        study("P1", "20260220", "MR", "ACC2", 2),
        study("P2", "20260305", "CT", "ACC3", 1),
        study("P3", "20261126", "CT", "ACC4", 2),
    ]
    try:
        for datasets in studies:
            results = send_datasets(engine, datasets)
            assert {code for _, code in results} == {status.SUCCESS}
        yield engine, studies
    finally:
        engine.stop()


def pynetdicom_find(
    engine: Engine, identifier: Dataset, model: str = StudyRootQueryRetrieveInformationModelFind
) -> tuple[list[Dataset], int]:
    """(the matches, the final status) of one C-FIND with pynetdicom."""
    ae = AE(ae_title="FINDSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(model, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", engine.port, ae_title=engine.ae_title)
    assert assoc.is_established
    matches: list[Dataset] = []
    final = -1
    try:
        for rsp, found in assoc.send_c_find(identifier, model):
            assert rsp is not None and "Status" in rsp, "no answer"
            if rsp.Status == status.PENDING:
                assert found is not None
                matches.append(found)
            else:
                final = int(rsp.Status)
    finally:
        assoc.release()
    return matches, final


def keys(level: str, **values: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_study_level_with_findscu(
    filled: tuple[Engine, list[list[Dataset]]], tmp_path: Path
) -> None:
    engine, studies = filled
    out = tmp_path / "rsp"
    out.mkdir()
    run = subprocess.run(
        [
            "findscu", "-S", "-aec", engine.ae_title, "-X", "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY",
            "-k", "PatientName=Doe*",
            "-k", "StudyDate=20260101-20260228",
            "-k", "StudyInstanceUID", "-k", "AccessionNumber", "-k", "ModalitiesInStudy",
            "-k", "NumberOfStudyRelatedInstances", "-k", "NumberOfStudyRelatedSeries",
            "127.0.0.1", str(engine.port),
        ],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    answers = sorted((dcmread(p) for p in out.glob("rsp*.dcm")), key=lambda d: d.AccessionNumber)
    assert [a.AccessionNumber for a in answers] == ["ACC1", "ACC2"]
    assert answers[0].StudyInstanceUID == studies[0][0].StudyInstanceUID
    assert answers[0].ModalitiesInStudy == "CT" and answers[1].ModalitiesInStudy == "MR"
    assert int(answers[0].NumberOfStudyRelatedInstances) == 3
    assert int(answers[1].NumberOfStudyRelatedSeries) == 1
    assert all(str(a.PatientName).startswith("Doe^") for a in answers)


def test_patient_root_with_findscu(
    filled: tuple[Engine, list[list[Dataset]]], tmp_path: Path
) -> None:
    engine, _ = filled
    out = tmp_path / "rsp"
    out.mkdir()
    run = subprocess.run(
        [
            "findscu", "-P", "-aec", engine.ae_title, "-X", "-od", str(out),
            "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=P1",
            "-k", "PatientName", "-k", "NumberOfPatientRelatedStudies",
            "-k", "NumberOfPatientRelatedInstances",
            "127.0.0.1", str(engine.port),
        ],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    (answer,) = [dcmread(p) for p in out.glob("rsp*.dcm")]
    assert answer.PatientName == "Doe^John"
    assert int(answer.NumberOfPatientRelatedStudies) == 2
    assert int(answer.NumberOfPatientRelatedInstances) == 5


def test_series_and_image_levels(filled: tuple[Engine, list[list[Dataset]]]) -> None:
    engine, studies = filled
    first = studies[0][0]
    series, final = pynetdicom_find(
        engine,
        keys(
            "SERIES",
            StudyInstanceUID=first.StudyInstanceUID,
            SeriesInstanceUID="",
            Modality="",
            NumberOfSeriesRelatedInstances="",
        ),
    )
    assert final == status.SUCCESS
    assert [(s.SeriesInstanceUID, s.Modality) for s in series] == [(first.SeriesInstanceUID, "CT")]
    assert int(series[0].NumberOfSeriesRelatedInstances) == 3
    wanted = [str(ds.SOPInstanceUID) for ds in studies[0][:2]]
    images, final = pynetdicom_find(
        engine,
        keys(
            "IMAGE",
            StudyInstanceUID=first.StudyInstanceUID,
            SeriesInstanceUID=first.SeriesInstanceUID,
            SOPInstanceUID=wanted,  # a list of UIDs
            InstanceNumber="",
        ),
    )
    assert final == status.SUCCESS
    assert sorted(str(i.SOPInstanceUID) for i in images) == sorted(wanted)
    assert sorted(int(i.InstanceNumber) for i in images) == [1, 2]


def test_japanese_name_found_in_utf8(filled: tuple[Engine, list[list[Dataset]]]) -> None:
    engine, studies = filled
    query = keys("STUDY", PatientName="山田*", StudyInstanceUID="", PatientID="")
    query.SpecificCharacterSet = "ISO_IR 192"
    matches, final = pynetdicom_find(engine, query)
    assert final == status.SUCCESS
    assert [(m.PatientID, str(m.PatientName)) for m in matches] == [("P3", "山田^太郎")]
    assert matches[0].StudyInstanceUID == studies[3][0].StudyInstanceUID


def test_hierarchy_errors_get_their_status(filled: tuple[Engine, list[list[Dataset]]]) -> None:
    engine, _ = filled
    # SERIES level without the study's unique key (Study Root, hierarchical search)
    _, final = pynetdicom_find(engine, keys("SERIES", SeriesInstanceUID=""))
    assert final == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    # PATIENT level does not exist in the Study Root model
    _, final = pynetdicom_find(engine, keys("PATIENT", PatientID=""))
    assert final == status.DATASET_DOES_NOT_MATCH_SOP_CLASS


def test_the_match_cap_ends_with_out_of_resources(
    filled: tuple[Engine, list[list[Dataset]]],
) -> None:
    engine, _ = filled
    matches, final = pynetdicom_find(engine, keys("STUDY", StudyInstanceUID=""))  # 4 studies
    assert len(matches) == 3  # max_matches in this engine's config
    assert final == status.OUT_OF_RESOURCES
    matches, final = pynetdicom_find(
        engine,
        keys("PATIENT", PatientID="", PatientName=""),
        PatientRootQueryRetrieveInformationModelFind,
    )
    assert final == status.SUCCESS and len(matches) == 3


def test_c_cancel_ends_the_matches_and_the_association_goes_on() -> None:
    """QueryService between two matches: a C-CANCEL for this message ends it with Cancel."""
    found = Found(matches=[keys("STUDY", StudyInstanceUID=generate_uid()) for _ in range(5)])

    class Stub:
        def search(self, model: object, identifier: Dataset) -> Found:
            return found

    origin = Origin("127.0.0.1", 40000, "FINDSCU", "ENGINE")
    identifier = encode_identifier(keys("STUDY", StudyInstanceUID=""), ExplicitVRLittleEndian)

    def request(command: dimse.Command, dataset: bytes | None) -> Request:
        return Request(origin, STUDY_ROOT_FIND, ExplicitVRLittleEndian, command, dataset, 0.0)

    find = request(
        dimse.Command(
            dimse.CommandField.C_FIND_RQ, message_id=7, affected_sop_class_uid=STUDY_ROOT_FIND
        ),
        identifier,
    )
    cancel = request(
        dimse.Command(dimse.CommandField.C_CANCEL_RQ, message_id_being_responded_to=7), None
    )
    other = request(
        dimse.Command(dimse.CommandField.C_CANCEL_RQ, message_id_being_responded_to=8), None
    )

    async def scenario() -> list[int]:
        service = QueryService(Stub())  # type: ignore[arg-type]
        statuses = []
        async for command, _ in service.find(find):
            statuses.append(dimse.decode_command(command).status or 0)
            if len(statuses) == 1:
                service.cancel(other)  # another message: no effect
            if len(statuses) == 2:
                service.cancel(cancel)
        return statuses

    statuses = asyncio.run(scenario())
    assert statuses == [status.PENDING, status.PENDING, status.CANCEL]


def test_a_cancelled_find_leaves_the_association_usable(
    filled: tuple[Engine, list[list[Dataset]]],
) -> None:
    engine, studies = filled
    ae = AE(ae_title="FINDSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", engine.port, ae_title=engine.ae_title)
    assert assoc.is_established
    try:
        first = studies[0][0]
        query = keys(
            "IMAGE",
            StudyInstanceUID=first.StudyInstanceUID,
            SeriesInstanceUID=first.SeriesInstanceUID,
            SOPInstanceUID="",
        )
        finals = []
        for rsp, _ in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind, msg_id=7
        ):
            if rsp.Status == status.PENDING:
                assoc.send_c_cancel(7, assoc.accepted_contexts[0].context_id)
            else:
                finals.append(int(rsp.Status))
        assert len(finals) == 1 and finals[0] in (status.CANCEL, status.SUCCESS)
        again = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
        assert [int(rsp.Status) for rsp, _ in again] == [status.PENDING] * 3 + [status.SUCCESS]
    finally:
        assoc.release()


# Japanese names (PS3.5 annex H): alphabetic, ideographic and phonetic component
# groups, stored in each of the character sets Japanese equipment uses.
JAPANESE_SETS = {
    "J87": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    "J13": (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
    "JU8": ("ISO_IR 192", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
}


@pytest.mark.parametrize(
    ("backend", "query_set"),
    [
        pytest.param(backend, query_set, id=f"{backend}-{query_set}")
        for backend in BACKENDS
        # The query's character set is decoded before the index sees it: on PostgreSQL,
        # one is enough to check the matching of the stored names.
        for query_set in (JAPANESE_SETS if backend == SQLITE else ["J87"])
    ],
    indirect=["backend"],
)
def test_japanese_names_are_found_whatever_the_character_sets(
    tmp_path: Path, query_set: str, index_url: str
) -> None:
    engine = Engine(tmp_path, index_url=index_url).start()
    try:
        studies = {}
        for patient_id, (charset, name) in JAPANESE_SETS.items():
            ds = ct_dataset(generate_uid(), generate_uid(), 1, patient_id=patient_id)
            ds.SpecificCharacterSet = charset
            ds.PatientName = name
            studies[patient_id] = str(ds.StudyInstanceUID)
            assert send_datasets(engine, [ds]) == [(str(ds.SOPInstanceUID), status.SUCCESS)]
        for wanted in ("山田^太郎", "やまだ*", "*^太郎"):
            query = keys("STUDY", PatientName=wanted, PatientID="", StudyInstanceUID="")
            query.SpecificCharacterSet = JAPANESE_SETS[query_set][0]
            matches, final = pynetdicom_find(engine, query)
            assert final == status.SUCCESS
            found = {m.PatientID: m for m in matches}
            assert set(found) == set(JAPANESE_SETS), wanted
            for patient_id, (_, name) in JAPANESE_SETS.items():
                assert found[patient_id].StudyInstanceUID == studies[patient_id]
                assert str(found[patient_id].PatientName) == name
    finally:
        engine.stop()


def findscu(engine: Engine, folder: Path, model: str, keys: list[str]) -> list[Dataset]:
    """The responses of one dcmtk findscu query (``model``: -S or -P), as datasets."""
    folder.mkdir()
    argv = ["findscu", model, "-aec", engine.ae_title, "-X", "-od", str(folder)]
    for key in keys:
        argv += ["-k", key]
    run = subprocess.run(
        [*argv, "127.0.0.1", str(engine.port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return [dcmread(p) for p in sorted(folder.glob("rsp*.dcm"))]


def test_findscu_every_level_and_matching_type(
    filled: tuple[Engine, list[list[Dataset]]], tmp_path: Path
) -> None:
    engine, studies = filled
    first = studies[0][0]
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    two = f"{studies[0][0].SOPInstanceUID}\\{studies[0][1].SOPInstanceUID}"

    def ask(model: str, *keys: str) -> list[Dataset]:
        return findscu(engine, tmp_path / f"q{len(list(tmp_path.iterdir()))}", model, list(keys))

    def accessions(answers: list[Dataset]) -> list[str]:
        return sorted(str(a.AccessionNumber) for a in answers)

    level = "QueryRetrieveLevel="
    # Study Root: single value, ? wildcard, open-ended date ranges, universal matching.
    assert accessions(ask("-S", f"{level}STUDY", "AccessionNumber=ACC2")) == ["ACC2"]
    assert accessions(ask("-S", f"{level}STUDY", "PatientName=Doe^Jan?", "AccessionNumber")) == [
        "ACC3"
    ]
    assert accessions(ask("-S", f"{level}STUDY", "StudyDate=20260301-", "AccessionNumber")) == [
        "ACC3",
        "ACC4",
    ]
    assert accessions(ask("-S", f"{level}STUDY", "StudyDate=-20260110", "AccessionNumber")) == [
        "ACC1"
    ]
    (answer,) = ask("-S", f"{level}SERIES", f"StudyInstanceUID={study}", "Modality")
    assert answer.Modality == "CT"
    # a list of UIDs at IMAGE level
    images = ask(
        "-S",
        f"{level}IMAGE",
        f"StudyInstanceUID={study}",
        f"SeriesInstanceUID={series}",
        f"SOPInstanceUID={two}",
    )
    assert sorted(str(i.SOPInstanceUID) for i in images) == sorted(two.split("\\"))
    # Patient Root at the STUDY, SERIES and IMAGE levels
    (answer,) = ask("-P", f"{level}STUDY", "PatientID=P2", "AccessionNumber")
    assert answer.AccessionNumber == "ACC3"
    (answer,) = ask(
        "-P", f"{level}SERIES", "PatientID=P1", f"StudyInstanceUID={study}", "SeriesInstanceUID"
    )
    assert answer.SeriesInstanceUID == series
    images = ask(
        "-P",
        f"{level}IMAGE",
        "PatientID=P1",
        f"StudyInstanceUID={study}",
        f"SeriesInstanceUID={series}",
        "InstanceNumber",
    )
    assert sorted(int(i.InstanceNumber) for i in images) == [1, 2, 3]
