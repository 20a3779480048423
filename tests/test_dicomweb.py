"""DICOMweb against a real engine process, with dicomweb-client as the client.

Studies go in by C-STORE (dcmtk storescu, pynetdicom) and by STOW-RS; they come back
by QIDO-RS and WADO-RS and are compared with what was sent, byte for byte. The searches,
retrievals and STOW-RS run on each index backend (the ``backend`` fixture).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid

from engine import status
from tests.helpers import Engine, ct_dataset, free_port, send_datasets, storescu, write_study
from tests.postgres import new_index
from tests.test_move import compressed_originals, store_in_their_syntaxes

pytestmark = pytest.mark.peers

PATIENT_NAME = "00100010"
STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
SOP_UID = "00080018"
JPEG = "1.2.840.10008.1.2.4.50"


def web_engine(folder: Path, index_url: str = "", **web: Any) -> Engine:
    settings = {"host": "127.0.0.1", "port": free_port(), **web}
    engine = Engine(folder, overrides={"dicomweb": settings}, index_url=index_url).start()
    engine.web_root = f"http://127.0.0.1:{settings['port']}/dicom-web"  # type: ignore[attr-defined]
    return engine


def root(engine: Engine) -> str:
    return str(engine.web_root)  # type: ignore[attr-defined]


def value(result: dict[str, Any], tag: str) -> Any:
    values = result.get(tag, {}).get("Value")
    return values[0] if values else None


def dataset_bytes(ds: Dataset) -> bytes:
    """A dataset as its file stores it after the meta group (explicit VR little endian)."""
    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = False
    write_dataset(out, ds)
    return out.getvalue()


class Archive:
    """One engine with three studies: two by storescu, the compressed MRs by pynetdicom."""

    def __init__(self, folder: Path, index_url: str) -> None:
        self.engine = web_engine(folder / "engine", index_url)
        self.client = DICOMwebClient(url=root(self.engine))
        self.ct_a = write_study(
            folder / "a", n_series=2, n_instances=3, patient_name="Alpha^Ann", patient_id="PA"
        )
        self.ct_b = write_study(
            folder / "b",
            n_series=1,
            n_instances=4,
            seed=7,
            patient_name="Beta^Bob",
            patient_id="PB",
        )
        for ds in self.ct_b:
            ds.StudyDate = "20250101"
            ds.Modality = "MR"
        for n, ds in enumerate(self.ct_b):
            ds.save_as(folder / "b" / f"s0_{n + 1:04d}.dcm", enforce_file_format=True)
        storescu(self.engine, str(folder / "a"), str(folder / "b"))
        self.compressed = compressed_originals()
        store_in_their_syntaxes(self.engine, self.compressed)
        self.files = {str(ds.SOPInstanceUID): ds for ds in [*self.ct_a, *self.ct_b]}


@pytest.fixture(scope="module")
def archive(
    backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Archive]:
    made = Archive(tmp_path_factory.mktemp("dicomweb"), new_index(backend, request, "dicomweb"))
    yield made
    assert made.engine.stop() == 0, made.engine.log()


# -- QIDO-RS -------------------------------------------------------------------------


def test_search_studies_with_filters(archive: Archive) -> None:
    client = archive.client
    a_uid = str(archive.ct_a[0].StudyInstanceUID)
    everything = client.search_for_studies()
    assert len(everything) == 3
    by_name = client.search_for_studies(search_filters={"PatientName": "Alpha*"})
    assert [value(r, STUDY_UID) for r in by_name] == [a_uid]
    assert value(by_name[0], PATIENT_NAME) == {"Alphabetic": "Alpha^Ann"}
    assert value(by_name[0], "00201206") == 2  # NumberOfStudyRelatedSeries
    assert value(by_name[0], "00201208") == 6  # NumberOfStudyRelatedInstances
    assert value(by_name[0], "00081190").endswith(f"/studies/{a_uid}")  # RetrieveURL
    by_date = client.search_for_studies(search_filters={"StudyDate": "20250101-20251231"})
    assert [value(r, PATIENT_NAME) for r in by_date] == [{"Alphabetic": "Beta^Bob"}]
    by_tag = client.search_for_studies(search_filters={"00100020": "PA", "ModalitiesInStudy": "CT"})
    assert [value(r, STUDY_UID) for r in by_tag] == [a_uid]
    assert client.search_for_studies(search_filters={"PatientID": "nobody"}) == []
    fuzzy = client.search_for_studies(search_filters={"PatientName": "beta*"}, fuzzymatching=True)
    assert [value(r, PATIENT_NAME) for r in fuzzy] == [{"Alphabetic": "Beta^Bob"}]


def test_search_paging_and_includefield(archive: Archive) -> None:
    client = archive.client
    first = client.search_for_studies(limit=2)
    rest = client.search_for_studies(limit=2, offset=2)
    uids = [value(r, STUDY_UID) for r in first + rest]
    assert len(first) == 2 and len(rest) == 1 and len(set(uids)) == 3
    response = requests.get(f"{root(archive.engine)}/studies?limit=1", timeout=30)
    assert response.status_code == 200 and "additional results" in response.headers["Warning"]
    assert response.headers["Content-Type"].startswith("application/dicom+json")
    full = client.search_for_studies(search_filters={"PatientID": "PA"}, fields=["all"])
    assert value(full[0], "00100030") == "19700101"  # PatientBirthDate
    assert "00081030" in full[0]  # StudyDescription
    named = client.search_for_studies(search_filters={"PatientID": "PA"}, fields=["00200010"])
    assert value(named[0], "00200010") == "1"  # StudyID


def test_search_series_and_instances(archive: Archive) -> None:
    client = archive.client
    study = str(archive.ct_a[0].StudyInstanceUID)
    series = client.search_for_series(study_instance_uid=study)
    assert len(series) == 2
    assert all(value(s, "00201209") == 3 for s in series)  # NumberOfSeriesRelatedInstances
    mr_series = client.search_for_series(search_filters={"Modality": "MR"})
    assert {value(s, STUDY_UID) for s in mr_series} == {
        str(archive.ct_b[0].StudyInstanceUID),
        str(archive.compressed[0].StudyInstanceUID),
    }
    series_uid = str(archive.ct_a[0].SeriesInstanceUID)
    instances = client.search_for_instances(
        study_instance_uid=study, series_instance_uid=series_uid
    )
    expected = [str(ds.SOPInstanceUID) for ds in archive.ct_a if ds.SeriesInstanceUID == series_uid]
    assert [value(i, SOP_UID) for i in instances] == expected
    one = client.search_for_instances(search_filters={"SOPInstanceUID": expected[1]})
    assert [value(i, "00200013") for i in one] == [2]  # InstanceNumber
    assert value(one[0], STUDY_UID) == study  # study attributes on a relational search
    by_patient = client.search_for_instances(search_filters={"PatientName": "Beta^Bob"})
    assert len(by_patient) == 4


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("NoSuchAttribute=1", "unknown attribute"),
        ("limit=ten", "limit must be a whole number"),
        ("offset=-1", "offset must not be negative"),
        ("StudyDate=2025-01", "StudyDate"),
    ],
)
def test_bad_searches_get_400_with_a_message(archive: Archive, query: str, fragment: str) -> None:
    response = requests.get(f"{root(archive.engine)}/studies?{query}", timeout=30)
    assert response.status_code == 400
    assert fragment in response.json()["message"]
    assert "-> 400: " in archive.engine.log()


# -- WADO-RS -------------------------------------------------------------------------


def test_retrieve_instance_bytes_identical(archive: Archive) -> None:
    ds = archive.ct_a[4]
    url = (
        f"{root(archive.engine)}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    response = requests.get(
        url,
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=30,
    )
    assert response.status_code == 200
    (part,) = _parts(response)
    back = dcmread(io.BytesIO(part))
    assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert part.endswith(dataset_bytes(ds))  # the dataset exactly as sent
    fetched = archive.client.retrieve_instance(
        str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    )
    assert fetched.PixelData == ds.PixelData


def _parts(response: requests.Response) -> list[bytes]:
    content_type = response.headers["Content-Type"]
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"')
    body = response.content
    chunks = body.split(f"--{boundary}".encode())
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, payload = chunk.partition(b"\r\n\r\n")
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


def test_retrieve_study_and_series(archive: Archive) -> None:
    study = str(archive.ct_a[0].StudyInstanceUID)
    datasets = archive.client.retrieve_study(study)
    sent = {str(ds.SOPInstanceUID): ds for ds in archive.ct_a}
    assert {str(ds.SOPInstanceUID) for ds in datasets} == set(sent)
    for ds in datasets:
        assert ds.PixelData == sent[str(ds.SOPInstanceUID)].PixelData
    series = archive.client.retrieve_series(study, str(archive.ct_a[0].SeriesInstanceUID))
    assert len(series) == 3


def test_retrieve_decompresses_by_default(archive: Archive) -> None:
    """No transfer syntax asked: Explicit VR Little Endian (PS3.18 8.7.3.5.2), pixels
    equal to pydicom's own decoding of the original."""
    for original in archive.compressed:
        fetched = archive.client.retrieve_instance(
            str(original.StudyInstanceUID),
            str(original.SeriesInstanceUID),
            str(original.SOPInstanceUID),
            media_types=(("application/dicom", "1.2.840.10008.1.2.1"),),
        )
        assert fetched.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert np.array_equal(fetched.pixel_array, original.pixel_array)


def test_metadata_from_the_index(archive: Archive) -> None:
    study = str(archive.ct_a[0].StudyInstanceUID)
    metadata = archive.client.retrieve_study_metadata(study)
    assert len(metadata) == 6
    for item in metadata:
        original = archive.files[value(item, SOP_UID)]
        expected = original.to_json_dict(bulk_data_threshold=1 << 30)
        del expected["7FE00010"]
        for tag, element in expected.items():
            assert item[tag] == element, tag
        assert item["7FE00010"]["BulkDataURI"].endswith("/bulk/7FE00010")
    series_meta = archive.client.retrieve_series_metadata(
        study, str(archive.ct_a[0].SeriesInstanceUID)
    )
    assert len(series_meta) == 3
    ds = archive.ct_a[0]
    one = archive.client.retrieve_instance_metadata(
        study, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    )
    assert value(one, PATIENT_NAME) == {"Alphabetic": "Alpha^Ann"}


def test_metadata_without_a_kept_header_reads_the_file(archive: Archive) -> None:
    """An instance indexed without its header (by recovery, or a header over 64 KB) gets
    the same metadata, read from its file."""
    ds = archive.ct_b[1]
    ids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    kept = archive.client.retrieve_instance_metadata(*ids)
    engine = archive.engine
    ((headers,),) = engine.query_rows("SELECT COUNT(*) FROM instance_headers")
    ((instances,),) = engine.query_rows("SELECT COUNT(*) FROM instances")
    assert headers == instances  # every ingested instance kept its header
    engine.execute("DELETE FROM instance_headers WHERE sop_instance_uid = ?", ids[2])
    assert archive.client.retrieve_instance_metadata(*ids) == kept


def test_frames_uncompressed_and_as_stored(archive: Archive) -> None:
    ds = archive.ct_b[0]
    frames = archive.client.retrieve_instance_frames(
        str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), [1]
    )
    assert frames == [ds.PixelData]
    for original in archive.compressed:
        ids = (
            str(original.StudyInstanceUID),
            str(original.SeriesInstanceUID),
            str(original.SOPInstanceUID),
        )
        raw = archive.client.retrieve_instance_frames(
            *ids, [1], media_types=(("application/octet-stream", "1.2.840.10008.1.2.1"),)
        )
        assert np.frombuffer(raw[0], dtype=original.pixel_array.dtype).tobytes() == (
            original.pixel_array.tobytes()
        )
        stored_syntax = str(original.file_meta.TransferSyntaxUID)
        response = requests.get(
            f"{root(archive.engine)}/studies/{ids[0]}/series/{ids[1]}/instances/{ids[2]}/frames/1",
            headers={
                "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"
            },
            timeout=30,
        )
        assert response.status_code == 200
        assert f"transfer-syntax={stored_syntax}" in response.headers["Content-Type"]
        from pydicom.encaps import generate_frames

        (fragment,) = _parts(response)
        assert fragment == next(generate_frames(original.PixelData, number_of_frames=1))
    instance_url = (
        f"{root(archive.engine)}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    bulk = requests.get(
        f"{instance_url}/bulk/7FE00010", headers={"Accept": "application/octet-stream"}, timeout=30
    )
    assert bulk.status_code == 200 and bulk.content == ds.PixelData
    no_such = requests.get(f"{instance_url}/bulk/00091234", timeout=30)
    assert no_such.status_code == 404 and "00091234" in no_such.json()["message"]
    missing = requests.get(f"{instance_url}/frames/2", timeout=30)
    assert missing.status_code == 404 and "frame 2" in missing.json()["message"]


def test_rendered_and_thumbnail(archive: Archive) -> None:
    ds = archive.ct_a[0]
    url = (
        f"{root(archive.engine)}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    jpeg = requests.get(f"{url}/rendered", headers={"Accept": "image/jpeg"}, timeout=30)
    assert jpeg.status_code == 200 and jpeg.headers["Content-Type"] == "image/jpeg"
    image = Image.open(io.BytesIO(jpeg.content))
    assert image.size == (ds.Columns, ds.Rows)
    png = requests.get(
        f"{url}/rendered?window=500,1000", headers={"Accept": "image/png"}, timeout=30
    )
    assert Image.open(io.BytesIO(png.content)).format == "PNG"
    assert len(np.unique(np.asarray(Image.open(io.BytesIO(png.content))))) > 10  # not blank
    thumb = requests.get(
        f"{root(archive.engine)}/studies/{ds.StudyInstanceUID}/thumbnail?viewport=16,16",
        timeout=30,
    )
    assert Image.open(io.BytesIO(thumb.content)).size == (16, 16)
    bad = requests.get(f"{url}/rendered?window=abc", timeout=30)
    assert bad.status_code == 400 and "window" in bad.json()["message"]


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/studies/not-a-uid", 400),
        ("/studies/1.2.3.4.5", 404),
        ("/studies/1.2.3/series/x..y/metadata", 400),
        ("/nothing/here", 404),
    ],
)
def test_bad_resources(archive: Archive, path: str, code: int) -> None:
    response = requests.get(root(archive.engine) + path, timeout=30)
    assert response.status_code == code
    assert response.json()["message"]


def test_unacceptable_media_type(archive: Archive) -> None:
    ds = archive.compressed[0]
    url = (
        f"{root(archive.engine)}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    response = requests.get(
        url,
        headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={JPEG}'},
        timeout=30,
    )
    assert response.status_code == 406 and "transfer-syntax" in response.json()["message"]


# -- STOW-RS -------------------------------------------------------------------------


def test_stow_stores_through_the_pipeline(tmp_path: Path, index_url: str) -> None:
    engine = web_engine(tmp_path / "engine", index_url)
    try:
        client = DICOMwebClient(url=root(engine))
        study = generate_uid()
        series = generate_uid()
        datasets = [ct_dataset(study, series, n, patient_name="Stow^Sam") for n in range(1, 4)]
        answer = client.store_instances(datasets)
        assert len(answer.ReferencedSOPSequence) == 3
        assert engine.stats()["instances"] == 3
        fetched = client.retrieve_series(study, series)
        by_uid = {str(ds.SOPInstanceUID): ds for ds in fetched}
        for ds in datasets:
            assert by_uid[str(ds.SOPInstanceUID)].PixelData == ds.PixelData
        assert (
            value(client.search_for_studies(search_filters={"PatientName": "Stow*"})[0], STUDY_UID)
            == study
        )
        # Same bytes again: success, nothing written twice.
        again = client.store_instances(datasets[:1], study_instance_uid=study)
        assert len(again.ReferencedSOPSequence) == 1
        assert len(engine.stored_files()) == 3
    finally:
        assert engine.stop() == 0, engine.log()


def _multipart(parts: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n"
        for kind, data in parts
    )
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _part10(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_stow_partial_failures_and_bad_requests(tmp_path: Path) -> None:
    engine = web_engine(tmp_path / "engine", max_request_size=200_000)
    try:
        url = f"{root(engine)}/studies"
        study, series = generate_uid(), generate_uid()
        good = ct_dataset(study, series, 1)
        other_study = ct_dataset(generate_uid(), series, 2)
        broken = _part10(ct_dataset(study, series, 3))[:400]  # cut in its header
        body, content_type = _multipart(
            [("application/dicom", _part10(good)), ("application/dicom", broken)]
        )
        some = requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=60)
        assert some.status_code == 202
        answer = some.json()
        assert len(answer["00081199"]["Value"]) == 1
        (failed,) = answer["00081198"]["Value"]
        assert value(failed, "00081197") in (status.CANNOT_UNDERSTAND, status.MISSING_ATTRIBUTE)
        # Posted to one study, belongs to another: refused, nothing stored.
        body, content_type = _multipart([("application/dicom", _part10(other_study))])
        wrong = requests.post(
            f"{url}/{study}", data=body, headers={"Content-Type": content_type}, timeout=60
        )
        assert wrong.status_code == 409
        (refused,) = wrong.json()["00081198"]["Value"]
        assert "posted to another study" in value(refused, "00000902")
        before = engine.stats()
        files_before = {p: p.read_bytes() for p in engine.stored_files()}
        for data, kind, code in [
            (body, "application/json", 415),
            (b"--nope\r\nhello", 'multipart/related; type="application/dicom"; boundary=x', 400),
            (b"\0" * 300_000, content_type, 413),
        ]:
            bad = requests.post(url, data=data, headers={"Content-Type": kind}, timeout=60)
            assert bad.status_code == code, bad.text
            assert bad.json()["message"]
        assert engine.stats() == before
        assert {p: p.read_bytes() for p in engine.stored_files()} == files_before
    finally:
        assert engine.stop() == 0, engine.log()


# -- access --------------------------------------------------------------------------


def test_bearer_token_and_cors(tmp_path: Path) -> None:
    engine = web_engine(
        tmp_path / "engine", bearer_token="s3cret", cors_origins=["http://viewer.local:3000"]
    )
    try:
        url = f"{root(engine)}/studies"
        assert requests.get(url, timeout=30).status_code == 401
        wrong = requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401 and "wrong credentials" in wrong.json()["message"]
        ok = requests.get(
            url,
            headers={"Authorization": "Bearer s3cret", "Origin": "http://viewer.local:3000"},
            timeout=30,
        )
        assert ok.status_code == 200 and ok.json() == []
        assert ok.headers["Access-Control-Allow-Origin"] == "http://viewer.local:3000"
        preflight = requests.options(
            url,
            headers={
                "Origin": "http://viewer.local:3000",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
            timeout=30,
        )
        assert preflight.status_code == 204
        assert "authorization" in preflight.headers["Access-Control-Allow-Headers"]
        stranger = requests.get(
            url,
            headers={"Authorization": "Bearer s3cret", "Origin": "http://evil.example"},
            timeout=30,
        )
        assert "Access-Control-Allow-Origin" not in stranger.headers
    finally:
        assert engine.stop() == 0, engine.log()


def test_basic_auth(tmp_path: Path) -> None:
    engine = web_engine(tmp_path / "engine", username="radiology", password="pw")
    try:
        url = f"{root(engine)}/studies"
        refused = requests.get(url, timeout=30)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith(
            "Basic"
        )
        assert requests.get(url, auth=("radiology", "pw"), timeout=30).status_code == 200
        assert requests.get(url, auth=("radiology", "no"), timeout=30).status_code == 401
    finally:
        assert engine.stop() == 0, engine.log()


def test_no_dicomweb_section_no_listener(engine: Engine) -> None:
    send_datasets(engine, [ct_dataset(generate_uid(), generate_uid(), 1)])
    assert "DICOMweb listening" not in engine.log()
