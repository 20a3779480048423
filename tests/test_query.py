"""C-FIND matching over a real index written by the engine's own index class, on SQLite
and on PostgreSQL (the ``backend`` fixture)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

from engine import status
from engine.config import DuplicatePolicy
from engine.duplicates import Decision, Existing, decide
from engine.index.base import InstanceRow
from engine.index.dialect import POSTGRESQL, SQLITE, Dialect
from engine.index.postgresql import PostgresIndex, SyncConnection
from engine.index.reads import Connection
from engine.index.sqlite import SQLiteIndex
from engine.query import ranges
from engine.query.find import Model, QueryError, plan, run
from engine.stages.validate import extract
from tests.helpers import ct_dataset
from tests.postgres import POSTGRES

# PostgreSQL in both transports' runs (tests/postgres.py).
POSTGRES_ON_EVERY_TRANSPORT = True

PR, SR = Model.PATIENT_ROOT, Model.STUDY_ROOT
# A scan of a whole table (not of a subquery): SQLite's and PostgreSQL's words.
TABLE_SCAN = re.compile(r"SCAN (p|st|se|i|x)\b|Seq Scan on \w+ (p|st|se|i|x)\b")
JAPANESE = "山田^太郎=やまだ^たろう"

# Studies: (uid, patient id, name, date, time, accession, description,
#           [(series uid, number, modality, sop class, instances)])
STUDIES: list[tuple[str, str, str, str, str, str, str, list[tuple[str, int, str, str, int]]]] = [
    (
        "1.2.3.1",
        "PID1",
        "Doe^John",
        "20240105",
        "083000",
        "ACC1",
        "CT Head [contrast]",
        [("1.2.3.1.1", 1, "CT", CTImageStorage, 3), ("1.2.3.1.2", 2, "CT", CTImageStorage, 2)],
    ),
    (
        "1.2.3.2",
        "PID1",
        "Doe^John",
        "20240310",
        "141500",
        "ACC2",
        "MR Brain",
        [
            ("1.2.3.2.1", 1, "MR", MRImageStorage, 2),
            ("1.2.3.2.2", 2, "OT", SecondaryCaptureImageStorage, 1),
        ],
    ),
    (
        "1.2.3.3",
        "PID2",
        "DOE^JOHN",
        "20240310",
        "091000",
        "ACC3",
        "CT Chest",
        [("1.2.3.3.1", 1, "CT", CTImageStorage, 1)],
    ),
    (
        "1.2.3.4",
        "PID3",
        JAPANESE,
        "20231231",
        "235959",
        "ACC4",
        "MR 頭部",
        [("1.2.3.4.1", 1, "MR", MRImageStorage, 2)],
    ),
]


def _datasets() -> Iterator[Dataset]:
    for study, pid, name, date, tm, accession, description, series in STUDIES:
        for series_uid, number, modality, sop_class, count in series:
            for n in range(1, count + 1):
                ds = ct_dataset(study, series_uid, n, patient_id=pid, patient_name=name, size=2)
                ds.SpecificCharacterSet = "ISO_IR 192"
                ds.SOPInstanceUID = f"{series_uid}.{n}"
                ds.SOPClassUID = sop_class
                ds.StudyDate, ds.StudyTime = date, tm
                ds.AccessionNumber = accession
                ds.StudyDescription = description
                ds.Modality = modality
                ds.SeriesNumber = number
                ds.SeriesDescription = f"{modality} series {number}"
                ds.PatientSex = "F" if pid == "PID3" else "M"
                yield ds


def _reject(existing: Existing | None, digest: str) -> Decision:
    return decide(existing, digest, DuplicatePolicy.REJECT)


@dataclass
class Db:
    """A read connection to an index built by the engine, and that index's SQL dialect."""

    connection: Connection
    dialect: Dialect
    # The steps of the database's plan for a query (SQLite's EXPLAIN QUERY PLAN,
    # PostgreSQL's EXPLAIN), one line each.
    explain: Callable[[str, tuple[object, ...]], list[str]]


@pytest.fixture(scope="module")
def db(
    backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Db]:
    rows = [
        InstanceRow(
            extract(ds), ExplicitVRLittleEndian, f"f{i}", 10, f"d{i}", time.time(), "S", "E", "ip"
        )
        for i, ds in enumerate(_datasets())
    ]
    index: SQLiteIndex | PostgresIndex
    if backend == POSTGRES:
        url = request.getfixturevalue("postgres").create("query")
        index = PostgresIndex(url, durable=False)
    else:
        path: Path = tmp_path_factory.mktemp("query") / "index.sqlite"
        index = SQLiteIndex(path, durable=False)

    async def build() -> None:
        await index.open()
        try:
            await index.commit_batch(rows, [], _reject)
        finally:
            await index.close()

    asyncio.run(build())
    if backend != POSTGRES:
        with contextlib.closing(sqlite3.connect(path)) as connection:

            def explain(sql: str, params: tuple[object, ...]) -> list[str]:
                rows = connection.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
                return [row[-1] for row in rows]

            yield Db(connection, SQLITE, explain)
        return
    # The engine's blocking facade over asyncpg, driven by a loop of this thread.
    loop = asyncio.new_event_loop()
    try:
        pg = loop.run_until_complete(asyncpg.connect(url))

        def explain_pg(sql: str, params: tuple[object, ...]) -> list[str]:
            # The tables are tiny: PostgreSQL rightly prefers to read them whole unless
            # told not to, and then uses an index wherever one applies.
            async def steps() -> list[str]:
                async with pg.transaction():
                    await pg.execute("SET LOCAL enable_seqscan = off")
                    rows = await pg.fetch(f"EXPLAIN {POSTGRESQL.sql(sql)}", *params)
                return [str(row[0]) for row in rows]

            return loop.run_until_complete(steps())

        try:
            yield Db(SyncConnection(pg, loop.run_until_complete), POSTGRESQL, explain_pg)
        finally:
            loop.run_until_complete(pg.close())
    finally:
        loop.close()


def ident(level: str | None, **keys: Any) -> Dataset:
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def query(
    db: Db,
    model: Model,
    level: str,
    fuzzy: bool = False,
    **keys: Any,
) -> list[Dataset]:
    return find(db, model, ident(level, **keys), fuzzy=fuzzy)


def find(db: Db, model: Model, identifier: Dataset, fuzzy: bool = False) -> list[Dataset]:
    return list(run(db.connection, plan(model, identifier, fuzzy_names=fuzzy, dialect=db.dialect)))


def col(results: list[Dataset], keyword: str) -> list[Any]:
    values = []
    for ds in results:
        value = ds[keyword].value
        values.append(str(value) if keyword == "PatientName" else value)
    return values


def study_uids(db: Db, **keys: Any) -> list[str]:
    return col(query(db, SR, "STUDY", StudyInstanceUID="", **keys), "StudyInstanceUID")


def listed(value: Any) -> list[str]:
    return list(value) if isinstance(value, MultiValue) else [value]


def raw(group: int, element: int, vr: str, value: bytes) -> Dataset:
    """A dataset of one element as read off the wire: pydicom holds its value raw."""
    data = struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value
    return read_dataset(BytesIO(data), is_implicit_VR=False, is_little_endian=True)


def error_of(model: Model, identifier: Dataset) -> QueryError:
    with pytest.raises(QueryError) as caught:
        plan(model, identifier)
    return caught.value


# -- levels and models ----------------------------------------------------------------


def test_patient_level_in_patient_root_with_computed_counts(db: Db) -> None:
    identifier = ident(
        "PATIENT",
        PatientID="",
        PatientName="",
        PatientSex="",
        NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedSeries="",
        NumberOfPatientRelatedInstances="",
    )
    results = find(db, PR, identifier)
    assert col(results, "PatientName") == ["DOE^JOHN", "Doe^John", JAPANESE]
    assert col(results, "PatientID") == ["PID2", "PID1", "PID3"]
    assert col(results, "PatientSex") == ["M", "M", "F"]
    assert col(results, "NumberOfPatientRelatedStudies") == [1, 2, 1]
    assert col(results, "NumberOfPatientRelatedSeries") == [1, 4, 1]
    assert col(results, "NumberOfPatientRelatedInstances") == [1, 8, 2]
    assert col(results, "QueryRetrieveLevel") == ["PATIENT"] * 3
    for ds in results[:2]:
        assert set(ds.keys()) == set(identifier.keys())  # the request's keys, no more


def test_study_level_in_both_models(db: Db) -> None:
    assert study_uids(db) == ["1.2.3.4", "1.2.3.1", "1.2.3.3", "1.2.3.2"]  # by date, time
    results = query(db, PR, "STUDY", PatientID="PID1", StudyInstanceUID="", StudyDate="")
    assert col(results, "StudyInstanceUID") == ["1.2.3.1", "1.2.3.2"]
    assert col(results, "StudyDate") == ["20240105", "20240310"]
    assert col(results, "PatientID") == ["PID1", "PID1"]


def test_series_level_with_computed_count(db: Db) -> None:
    keys: dict[str, Any] = {
        "StudyInstanceUID": "1.2.3.2",
        "SeriesInstanceUID": "",
        "Modality": "",
        "SeriesNumber": "",
        "NumberOfSeriesRelatedInstances": "",
    }
    for results in (
        query(db, SR, "SERIES", **keys),
        query(db, PR, "SERIES", PatientID="PID1", **keys),
    ):
        assert col(results, "SeriesInstanceUID") == ["1.2.3.2.1", "1.2.3.2.2"]
        assert col(results, "Modality") == ["MR", "OT"]
        assert col(results, "SeriesNumber") == [1, 2]
        assert col(results, "NumberOfSeriesRelatedInstances") == [2, 1]
        assert col(results, "StudyInstanceUID") == ["1.2.3.2"] * 2


def test_image_level_in_both_models(db: Db) -> None:
    keys: dict[str, Any] = {
        "StudyInstanceUID": "1.2.3.1",
        "SeriesInstanceUID": "1.2.3.1.1",
        "SOPInstanceUID": "",
        "SOPClassUID": "",
        "InstanceNumber": "",
        "Rows": None,
    }
    for results in (
        query(db, SR, "IMAGE", **keys),
        query(db, PR, "IMAGE", PatientID="PID1", **keys),
    ):
        assert col(results, "SOPInstanceUID") == ["1.2.3.1.1.1", "1.2.3.1.1.2", "1.2.3.1.1.3"]
        assert col(results, "SOPClassUID") == [CTImageStorage] * 3
        assert col(results, "InstanceNumber") == [1, 2, 3]
        assert col(results, "Rows") == [2, 2, 2]
    single = query(db, SR, "IMAGE", **{**keys, "SOPInstanceUID": "1.2.3.1.1.2"})
    assert col(single, "InstanceNumber") == [2]


def test_wrong_parent_finds_nothing(db: Db) -> None:
    keys: dict[str, Any] = {"StudyInstanceUID": "1.2.3.1", "SeriesInstanceUID": ""}
    assert query(db, PR, "SERIES", PatientID="PID2", **keys) == []


# -- matching -------------------------------------------------------------------------


def test_single_value_and_wildcards(db: Db) -> None:
    assert study_uids(db, AccessionNumber="ACC3") == ["1.2.3.3"]
    assert study_uids(db, AccessionNumber="acc3") == []  # case-sensitive
    assert study_uids(db, StudyDescription="CT*") == ["1.2.3.1", "1.2.3.3"]
    assert study_uids(db, StudyDescription="?R Brain") == ["1.2.3.2"]
    assert study_uids(db, StudyDescription="*Brai?") == ["1.2.3.2"]
    assert study_uids(db, StudyDescription="CT Head [c*") == ["1.2.3.1"]  # [ is no class
    assert study_uids(db, StudyDescription="*]") == ["1.2.3.1"]
    assert study_uids(db, StudyDescription="CT Head [contrast]") == ["1.2.3.1"]
    assert study_uids(db, StudyDescription="MR 頭?") == ["1.2.3.4"]
    assert study_uids(db, StudyDescription="*") == ["1.2.3.4", "1.2.3.1", "1.2.3.3", "1.2.3.2"]


def test_person_names_case_and_component_groups(db: Db) -> None:
    assert study_uids(db, PatientName="Doe^John") == ["1.2.3.1", "1.2.3.2"]
    assert study_uids(db, PatientName="doe^john") == []
    assert study_uids(db, PatientName="Doe*") == ["1.2.3.1", "1.2.3.2"]
    fuzzy = query(db, SR, "STUDY", fuzzy=True, StudyInstanceUID="", PatientName="doe^john")
    assert col(fuzzy, "StudyInstanceUID") == ["1.2.3.1", "1.2.3.3", "1.2.3.2"]
    fuzzy = query(db, SR, "STUDY", fuzzy=True, StudyInstanceUID="", PatientName="dOE*")
    assert col(fuzzy, "StudyInstanceUID") == ["1.2.3.1", "1.2.3.3", "1.2.3.2"]
    patients = query(db, PR, "PATIENT", fuzzy=True, PatientID="", PatientName="DOE^J?HN")
    assert col(patients, "PatientID") == ["PID2", "PID1"]
    # The whole name, any one of its component groups, or a wildcard on either.
    for name in (JAPANESE, "山田^太郎", "山田*", "*^太郎", "*やまだ*", "やまだ^たろう", "やま*"):
        assert study_uids(db, PatientName=name) == ["1.2.3.4"], name
    assert study_uids(db, PatientName="山田") == []  # a component, not a group
    assert study_uids(db, PatientName="たろう") == []


def test_date_and_time_ranges(db: Db) -> None:
    assert study_uids(db, StudyDate="20240310") == ["1.2.3.3", "1.2.3.2"]
    assert study_uids(db, StudyDate="20240101-20240309") == ["1.2.3.1"]
    assert study_uids(db, StudyDate="20240105-20240310") == ["1.2.3.1", "1.2.3.3", "1.2.3.2"]
    assert study_uids(db, StudyDate="-20240105") == ["1.2.3.4", "1.2.3.1"]
    assert study_uids(db, StudyDate="20240106-") == ["1.2.3.3", "1.2.3.2"]
    assert study_uids(db, StudyDate="2024.03.10") == ["1.2.3.3", "1.2.3.2"]  # ACR-NEMA form
    assert study_uids(db, StudyTime="0800-1000") == ["1.2.3.1", "1.2.3.3"]
    assert study_uids(db, StudyTime="-08") == ["1.2.3.1"]  # up to 08:59:59.999999
    assert study_uids(db, StudyTime="14-") == ["1.2.3.4", "1.2.3.2"]
    assert study_uids(db, StudyTime="235959") == ["1.2.3.4"]
    assert study_uids(db, StudyDate="20240310", StudyTime="-120000") == ["1.2.3.3"]


def test_range_bounds_for_each_vr() -> None:
    assert ranges.bounds("DA", "20240101-20241231") == ("20240101", "20241231")
    assert ranges.bounds("TM", "10-1030") == ("100000", "103059.999999")
    assert ranges.bounds("TM", "10:30:00.5-") == ("103000.5", None)
    assert ranges.bounds("DT", "2024-202402") == ("20240101000000", "20240231235959.999999")
    for vr, value in [("DA", "2024-01"), ("TM", "25-"), ("DT", "2024-2023"), ("DA", "-")]:
        with pytest.raises(ranges.BadValue):
            ranges.bounds(vr, value)


def test_malformed_values_are_unable_to_process(db: Db) -> None:
    for keyword, vr, value in [
        ("StudyDate", "DA", "20240101-2024"),
        ("StudyDate", "DA", "20241301"),
        ("StudyDate", "DA", "20240310-20240101"),  # ends before it starts
        ("StudyDate", "DA", "2024*"),
        ("StudyTime", "TM", "2500"),
        ("StudyInstanceUID", "UI", "1.2.*"),
    ]:
        identifier = ident("STUDY")
        identifier.add(DataElement(keyword, vr, value, validation_mode=config.IGNORE))
        error = error_of(SR, identifier)
        assert error.status == status.INVALID_MATCHING_VALUE, (keyword, value)
        assert keyword in error.message
    identifier = raw(0x0020, 0x0011, "IS", b"x1")  # SeriesNumber
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = "1.2.3.1"
    assert error_of(SR, identifier).status == status.INVALID_MATCHING_VALUE


def test_uid_lists(db: Db) -> None:
    listed_uids = query(db, SR, "STUDY", StudyInstanceUID="1.2.3.3\\1.2.3.1\\1.2.3.9")
    assert col(listed_uids, "StudyInstanceUID") == ["1.2.3.1", "1.2.3.3"]
    keys: dict[str, Any] = {"StudyInstanceUID": "1.2.3.1", "SeriesInstanceUID": "1.2.3.1.2"}
    series = query(db, SR, "SERIES", **keys)
    assert col(series, "SeriesInstanceUID") == ["1.2.3.1.2"]
    assert study_uids(db, SOPClassesInStudy=f"{SecondaryCaptureImageStorage}\\1.2.9") == ["1.2.3.2"]


def test_multiple_values_match_any(db: Db) -> None:
    assert study_uids(db, AccessionNumber="ACC4\\ACC2") == ["1.2.3.4", "1.2.3.2"]


def test_universal_matching_returns_values(db: Db) -> None:
    results = query(
        db,
        SR,
        "STUDY",
        StudyInstanceUID="1.2.3.4",
        PatientName="",
        PatientID="*",
        StudyDate="",
        StudyTime="",
        AccessionNumber="",
        StudyDescription="",
        PatientSex="",
        PatientBirthDate="",
    )
    assert len(results) == 1
    ds = results[0]
    assert str(ds.PatientName) == JAPANESE
    assert (ds.PatientID, ds.StudyDate, ds.StudyTime) == ("PID3", "20231231", "235959")
    assert (ds.AccessionNumber, ds.StudyDescription) == ("ACC4", "MR 頭部")
    assert (ds.PatientSex, ds.PatientBirthDate) == ("F", "19700101")
    assert ds.SpecificCharacterSet == "ISO_IR 192"  # non-ASCII values
    ascii_only = query(db, SR, "STUDY", StudyInstanceUID="1.2.3.1", PatientName="")
    assert "SpecificCharacterSet" not in ascii_only[0]
    echoed = query(db, SR, "STUDY", StudyInstanceUID="1.2.3.1", SpecificCharacterSet="ISO_IR 100")
    assert echoed[0].SpecificCharacterSet == "ISO_IR 100"


def test_modalities_in_study(db: Db) -> None:
    results = query(db, SR, "STUDY", StudyInstanceUID="", ModalitiesInStudy="")
    assert [listed(v) for v in col(results, "ModalitiesInStudy")] == [
        ["MR"],
        ["CT"],
        ["CT"],
        ["MR", "OT"],
    ]
    assert study_uids(db, ModalitiesInStudy="OT") == ["1.2.3.2"]
    assert study_uids(db, ModalitiesInStudy="CT\\OT") == ["1.2.3.1", "1.2.3.3", "1.2.3.2"]
    assert study_uids(db, ModalitiesInStudy="M?") == ["1.2.3.4", "1.2.3.2"]
    assert study_uids(db, ModalitiesInStudy="XA") == []


def test_study_computed_keys(db: Db) -> None:
    results = query(
        db,
        PR,
        "STUDY",
        PatientID="PID1",
        StudyInstanceUID="",
        NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="",
        SOPClassesInStudy="",
        NumberOfPatientRelatedStudies="",
    )
    assert col(results, "NumberOfStudyRelatedSeries") == [2, 2]
    assert col(results, "NumberOfStudyRelatedInstances") == [5, 3]
    assert [listed(v) for v in col(results, "SOPClassesInStudy")] == [
        [CTImageStorage],
        [MRImageStorage, SecondaryCaptureImageStorage],
    ]
    assert col(results, "NumberOfPatientRelatedStudies") == [2, 2]
    # Counts are return keys: a value given is not matched, and is reported unsupported.
    identifier = ident("STUDY", StudyInstanceUID="", NumberOfStudyRelatedSeries="1")
    counted = plan(SR, identifier, dialect=db.dialect)
    assert len(list(run(db.connection, counted))) == 4
    assert counted.pending_status == status.PENDING_UNSUPPORTED_KEYS


def test_unknown_and_lower_level_keys_are_returned_empty(db: Db) -> None:
    identifier = ident(
        "STUDY",
        StudyInstanceUID="1.2.3.2",
        InstitutionName="Nowhere",  # not in the index: neither matched nor filled
        ReferencedStudySequence=[],
        SOPInstanceUID="",  # below the query level
        Rows=None,
    )
    identifier.add_new(0x00091010, "LO", "private")
    identifier.SeriesNumber = "7"  # below the query level: not matched
    query_plan = plan(SR, identifier, dialect=db.dialect)
    assert query_plan.pending_status == status.PENDING_UNSUPPORTED_KEYS
    (ds,) = list(run(db.connection, query_plan))
    assert set(ds.keys()) == set(identifier.keys())
    assert ds.StudyInstanceUID == "1.2.3.2"
    assert ds.InstitutionName == "" and ds.SOPInstanceUID == "" and ds.SeriesNumber is None
    assert ds.Rows is None and ds[0x00091010].value == ""
    assert len(ds.ReferencedStudySequence) == 0
    assert plan(SR, ident("STUDY", StudyInstanceUID="")).pending_status == status.PENDING


def test_raw_wildcard_in_an_integer_key_is_universal(db: Db) -> None:
    # pydicom cannot hold "*" in an IS; the engine gets such an identifier off the wire.
    identifier = raw(0x0020, 0x0011, "IS", b"* ")  # SeriesNumber
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = "1.2.3.1"
    results = find(db, SR, identifier)
    assert [ds.SeriesNumber for ds in results] == [1, 2]


# -- hierarchy and errors -------------------------------------------------------------


def test_hierarchy_errors(db: Db) -> None:
    bad = status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    cases = [
        (SR, ident("SERIES", SeriesInstanceUID="")),  # no StudyInstanceUID
        (SR, ident("SERIES", StudyInstanceUID="", SeriesInstanceUID="")),  # empty
        (SR, ident("SERIES", StudyInstanceUID="1.2.3.1\\1.2.3.2")),  # a list
        (SR, ident("IMAGE", StudyInstanceUID="1.2.3.1")),  # no SeriesInstanceUID
        (SR, ident("PATIENT", PatientID="")),  # no patient level in Study Root
        (PR, ident("STUDY", StudyInstanceUID="")),  # no PatientID
        (PR, ident("STUDY", PatientID="PID*")),  # a wildcard is no single value
        (PR, ident(None, PatientID="")),  # no level
        (PR, ident("FRAME", PatientID="")),
    ]
    for model, identifier in cases:
        assert error_of(model, identifier).status == bad, identifier


def test_limit(db: Db) -> None:
    query_plan = plan(SR, ident("STUDY", StudyInstanceUID=""), dialect=db.dialect)
    matches = run(db.connection, query_plan, limit=2)
    assert [ds.StudyInstanceUID for ds in matches] == ["1.2.3.4", "1.2.3.1"]
    assert matches.limit_hit and matches.count == 2
    exact = run(db.connection, query_plan, limit=4)
    assert len(list(exact)) == 4 and not exact.limit_hit
    unlimited = run(db.connection, query_plan)
    assert len(list(unlimited)) == 4 and not unlimited.limit_hit


def test_queries_use_the_indexes(db: Db) -> None:
    def steps(model: Model, identifier: Dataset) -> str:
        query_plan = plan(model, identifier, dialect=db.dialect)
        return "\n".join(db.explain(query_plan.sql, query_plan.params))

    by_uid = steps(
        SR,
        ident(
            "STUDY",
            StudyInstanceUID="1.2.3.1",
            PatientName="",
            SOPClassesInStudy="",
            ModalitiesInStudy="CT",
        ),
    )
    assert not TABLE_SCAN.search(by_uid), by_uid
    assert "instances_study" in by_uid and "series_study" in by_uid
    for keys, index in [
        ({"PatientID": "PID1"}, "studies_patient"),
        ({"AccessionNumber": "ACC1"}, "studies_accession"),
        ({"StudyDate": "20240101-20240131"}, "studies_date"),
    ]:
        assert index in steps(SR, ident("STUDY", StudyInstanceUID="", **keys))
    assert "patients_name" in steps(PR, ident("PATIENT", PatientName="Doe^John"))
    image = steps(SR, ident("IMAGE", StudyInstanceUID="1.2.3.1", SeriesInstanceUID="1.2.3.1.1"))
    assert not TABLE_SCAN.search(image), image
