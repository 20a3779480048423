"""C-MOVE against a running engine: dcmtk ``movescu`` and pynetdicom as the requestor,
a dcmtk ``storescp`` (started here) or a pynetdicom SCP as the destination.

The destination is declared in ``[[dicom.peers]]``; what arrives there must be the
datasets that were stored, and the responses carry the sub-operation counts. The
engine filled once per module runs on each index backend (the ``backend`` fixture).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from engine import status
from tests.helpers import TRANSPORT, Engine, ct_dataset, dcmtk_env, free_port, send_datasets
from tests.postgres import new_index

# PostgreSQL in both transports' runs (tests/postgres.py).
POSTGRES_ON_EVERY_TRANSPORT = True

WAIT = 30.0


def wait_for_port(port: int) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def destination(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A dcmtk storescp, AE DEST, writing what it receives to a folder."""
    folder = tmp_path_factory.mktemp("dest")
    port = free_port()
    process = subprocess.Popen(
        ["storescp", "-aet", "DEST", "-od", str(folder), str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield port, folder
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(WAIT)


@pytest.fixture(scope="module")
def engine(
    backend: str,
    tmp_path_factory: pytest.TempPathFactory,
    destination: tuple[int, Path],
    request: pytest.FixtureRequest,
) -> Iterator[tuple[Engine, list[list[Dataset]]]]:
    port, _ = destination
    down = free_port()  # declared, but nothing listens there
    peers = f"""
[[dicom.peers]]
ae_title = "DEST"
host = "127.0.0.1"
port = {port}

[[dicom.peers]]
ae_title = "DOWN"
host = "127.0.0.1"
port = {down}
"""
    engine = Engine(tmp_path_factory.mktemp("move"), index_url=new_index(backend, request, "move"))
    assert engine.config_path is not None
    engine.config_path.write_text(engine.config_path.read_text() + peers)
    engine.start()
    studies = []
    for n in range(2):
        study_uid, series_uid = generate_uid(), generate_uid()
        studies.append(
            [ct_dataset(study_uid, series_uid, i, patient_id=f"M{n}") for i in range(1, 4)]
        )
    try:
        for datasets in studies:
            assert {code for _, code in send_datasets(engine, datasets)} == {status.SUCCESS}
        yield engine, studies
    finally:
        engine.stop()


def received(folder: Path, uids: set[str]) -> dict[str, Dataset]:
    """The datasets of ``uids`` that arrived in ``folder`` (storescp names files by UID)."""
    found = {}
    for path in folder.iterdir():
        ds = dcmread(path)
        if str(ds.SOPInstanceUID) in uids:
            found[str(ds.SOPInstanceUID)] = ds
    return found


def test_movescu_sends_a_study_to_storescp(
    engine: tuple[Engine, list[list[Dataset]]], destination: tuple[int, Path]
) -> None:
    eng, studies = engine
    _, folder = destination
    study = studies[0]
    run = subprocess.run(
        [
            "movescu", "-S", "-aet", "MOVESCU", "-aec", eng.ae_title, "-aem", "DEST",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study[0].StudyInstanceUID}",
            "127.0.0.1", str(eng.port),
        ],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    uids = {str(ds.SOPInstanceUID) for ds in study}
    deadline = time.monotonic() + WAIT
    while len(arrived := received(folder, uids)) < len(uids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(arrived) == uids
    for ds in study:
        copy = arrived[str(ds.SOPInstanceUID)]
        del copy.file_meta
        assert copy == ds, "the dataset that arrived differs from the one stored"


def pynetdicom_move(
    eng: Engine, identifier: Dataset, destination: str, model: str
) -> list[Dataset]:
    """Every C-MOVE response (status datasets), the final one last."""
    ae = AE(ae_title="MOVESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(model, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", eng.port, ae_title=eng.ae_title)
    assert assoc.is_established
    responses = []
    try:
        for rsp, _ in assoc.send_c_move(identifier, destination, model):
            assert rsp is not None and "Status" in rsp
            responses.append(rsp)
    finally:
        assoc.release()
    return responses


def series_identifier(ds: Dataset) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = ds.StudyInstanceUID
    identifier.SeriesInstanceUID = ds.SeriesInstanceUID
    return identifier


def test_pynetdicom_move_reports_the_sub_operations(
    engine: tuple[Engine, list[list[Dataset]]], destination: tuple[int, Path]
) -> None:
    eng, studies = engine
    _, folder = destination
    study = studies[1]
    responses = pynetdicom_move(
        eng, series_identifier(study[0]), "DEST", StudyRootQueryRetrieveInformationModelMove
    )
    final = responses[-1]
    assert final.Status == status.SUCCESS
    assert final.NumberOfCompletedSuboperations == 3
    assert final.NumberOfFailedSuboperations == 0
    pending = [r for r in responses[:-1] if r.Status == status.PENDING]
    assert pending, "no pending response"
    assert all(r.NumberOfRemainingSuboperations < 3 for r in pending)
    assert set(received(folder, {str(d.SOPInstanceUID) for d in study})) == {
        str(d.SOPInstanceUID) for d in study
    }


def test_patient_root_move_of_one_image(
    engine: tuple[Engine, list[list[Dataset]]], destination: tuple[int, Path]
) -> None:
    eng, studies = engine
    image = studies[1][2]
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.PatientID = image.PatientID
    identifier.StudyInstanceUID = image.StudyInstanceUID
    identifier.SeriesInstanceUID = image.SeriesInstanceUID
    identifier.SOPInstanceUID = image.SOPInstanceUID
    responses = pynetdicom_move(
        eng, identifier, "DEST", PatientRootQueryRetrieveInformationModelMove
    )
    assert responses[-1].Status == status.SUCCESS
    assert responses[-1].NumberOfCompletedSuboperations == 1


def test_an_unknown_destination_is_refused(engine: tuple[Engine, list[list[Dataset]]]) -> None:
    eng, studies = engine
    responses = pynetdicom_move(
        eng, series_identifier(studies[0][0]), "NOPE", StudyRootQueryRetrieveInformationModelMove
    )
    assert [int(r.Status) for r in responses] == [status.MOVE_DESTINATION_UNKNOWN]


def test_a_destination_that_is_down_fails_every_sub_operation(
    engine: tuple[Engine, list[list[Dataset]]],
) -> None:
    eng, studies = engine
    responses = pynetdicom_move(
        eng, series_identifier(studies[0][0]), "DOWN", StudyRootQueryRetrieveInformationModelMove
    )
    final = responses[-1]
    if TRANSPORT == "pynetdicom":
        # pynetdicom's C-MOVE SCP answers "destination unknown" when it cannot associate.
        assert final.Status == status.MOVE_DESTINATION_UNKNOWN
    else:
        assert final.Status == status.UNABLE_TO_PERFORM_SUBOPERATIONS
        assert final.NumberOfFailedSuboperations == 3
        assert final.NumberOfCompletedSuboperations == 0


def compressed_originals() -> list[Dataset]:
    """pydicom's JPEG-LS, JPEG 2000 and RLE MR images, each with a UID of its own."""
    originals = []
    for name in ("MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"):
        path = get_testdata_file(name)
        assert path is not None
        ds = dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        originals.append(ds)
    return originals


def store_in_their_syntaxes(engine: Engine, originals: list[Dataset]) -> None:
    sender = AE(ae_title="MODALITY")
    for ds in originals:
        sender.add_requested_context(MRImageStorage, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = sender.associate("127.0.0.1", engine.port, ae_title=engine.ae_title)
    assert assoc.is_established
    try:
        for ds in originals:
            assert assoc.send_c_store(ds).Status == status.SUCCESS
    finally:
        assoc.release()


def assert_decompressed(arrived: list[Dataset], originals: list[Dataset]) -> None:
    """Every original arrived in Explicit VR Little Endian with pydicom's decoded pixels."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in arrived}
    assert set(by_uid) == {str(ds.SOPInstanceUID) for ds in originals}
    for original in originals:
        copy = by_uid[str(original.SOPInstanceUID)]
        assert copy.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert (copy.pixel_array == original.pixel_array).all(), (
            original.file_meta.TransferSyntaxUID
        )


def test_a_move_of_a_list_of_images(
    engine: tuple[Engine, list[list[Dataset]]], destination: tuple[int, Path]
) -> None:
    """IMAGE level with a list of SOP Instance UIDs: exactly those are sent."""
    eng, studies = engine
    _, folder = destination
    wanted = studies[1][:2]
    identifier = series_identifier(wanted[0])
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.SOPInstanceUID = [str(ds.SOPInstanceUID) for ds in wanted]
    responses = pynetdicom_move(eng, identifier, "DEST", StudyRootQueryRetrieveInformationModelMove)
    assert responses[-1].Status == status.SUCCESS
    assert responses[-1].NumberOfCompletedSuboperations == 2
    uids = {str(ds.SOPInstanceUID) for ds in wanted}
    assert set(received(folder, uids)) == uids


@pytest.mark.skipif(
    TRANSPORT == "pynetdicom",
    reason="C-MOVE decompression is the native transport's (pynetdicom runs the sub-association)",
)
def test_compressed_instances_are_decompressed_for_a_destination_that_wants_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JPEG-LS, JPEG 2000 and RLE instances moved to a node that accepts only Explicit VR
    Little Endian arrive decompressed, with the pixels pydicom decodes from the originals."""
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", False)
    arrived: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        arrived.append(ds)
        return status.SUCCESS

    scp = AE(ae_title="ONLYLE")
    scp.add_supported_context(MRImageStorage, [ExplicitVRLittleEndian])
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    originals = compressed_originals()
    peers = f'\n[[dicom.peers]]\nae_title = "ONLYLE"\nhost = "127.0.0.1"\nport = {port}\n'
    engine = Engine(tmp_path / "engine")
    assert engine.config_path is not None
    engine.config_path.write_text(engine.config_path.read_text() + peers)
    engine.start()
    try:
        store_in_their_syntaxes(engine, originals)
        responses = pynetdicom_move(
            engine,
            series_identifier(originals[0]),
            "ONLYLE",
            StudyRootQueryRetrieveInformationModelMove,
        )
        assert responses[-1].Status == status.SUCCESS
        assert responses[-1].NumberOfCompletedSuboperations == 3
    finally:
        engine.stop()
        server.shutdown()
    assert_decompressed(arrived, originals)


# -- C-GET: the instances come back on the requestor's own association ----------------


def test_getscu_gets_a_series(engine: tuple[Engine, list[list[Dataset]]], tmp_path: Path) -> None:
    eng, studies = engine
    series = studies[0]
    run = subprocess.run(
        [
            "getscu", "-S", "-aet", "GETSCU", "-aec", eng.ae_title, "-od", str(tmp_path),
            "-k", "QueryRetrieveLevel=SERIES",
            "-k", f"StudyInstanceUID={series[0].StudyInstanceUID}",
            "-k", f"SeriesInstanceUID={series[0].SeriesInstanceUID}",
            "127.0.0.1", str(eng.port),
        ],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    arrived = received(tmp_path, {str(ds.SOPInstanceUID) for ds in series})
    assert set(arrived) == {str(ds.SOPInstanceUID) for ds in series}
    for ds in series:
        copy = arrived[str(ds.SOPInstanceUID)]
        del copy.file_meta
        assert copy == ds


def test_pynetdicom_get_with_role_selection(engine: tuple[Engine, list[list[Dataset]]]) -> None:
    eng, studies = engine
    series = studies[1]
    arrived: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        arrived.append(event.dataset)
        return status.SUCCESS

    ae = AE(ae_title="GETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    role = build_role(CTImageStorage, scp_role=True)
    assoc = ae.associate(
        "127.0.0.1",
        eng.port,
        ae_title=eng.ae_title,
        ext_neg=[role],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        responses = [
            rsp
            for rsp, _ in assoc.send_c_get(
                series_identifier(series[0]), StudyRootQueryRetrieveInformationModelGet
            )
        ]
    finally:
        assoc.release()
    final = responses[-1]
    assert final.Status == status.SUCCESS
    assert final.NumberOfCompletedSuboperations == 3
    assert any(r.Status == status.PENDING for r in responses[:-1])
    assert sorted(str(d.SOPInstanceUID) for d in arrived) == sorted(
        str(d.SOPInstanceUID) for d in series
    )
    by_uid = {str(d.SOPInstanceUID): d for d in arrived}
    for ds in series:
        assert by_uid[str(ds.SOPInstanceUID)].PixelData == ds.PixelData


def test_get_without_the_scp_role_fails_its_sub_operations(
    engine: tuple[Engine, list[list[Dataset]]],
) -> None:
    """A requestor that did not take the SCP role for the storage class cannot be sent
    anything: every sub-operation fails, the association goes on."""
    eng, studies = engine
    ae = AE(ae_title="GETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", eng.port, ae_title=eng.ae_title)
    assert assoc.is_established
    try:
        responses = [
            rsp
            for rsp, _ in assoc.send_c_get(
                series_identifier(studies[0][0]), StudyRootQueryRetrieveInformationModelGet
            )
        ]
    finally:
        assoc.release()
    final = responses[-1]
    assert final.Status not in (status.SUCCESS, status.PENDING)
    assert final.get("NumberOfCompletedSuboperations", 0) == 0


def test_get_decompresses_for_a_requestor_that_takes_only_explicit_little_endian(
    tmp_path: Path,
) -> None:
    """A C-GET requestor offering MR storage (SCP role) in Explicit VR Little Endian only
    gets the JPEG-LS, JPEG 2000 and RLE instances decompressed, pixels as pydicom's."""
    originals = compressed_originals()
    engine = Engine(tmp_path / "engine").start()
    arrived: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        arrived.append(ds)
        return status.SUCCESS

    try:
        store_in_their_syntaxes(engine, originals)
        ae = AE(ae_title="GETSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate(
            "127.0.0.1",
            engine.port,
            ae_title=engine.ae_title,
            ext_neg=[build_role(MRImageStorage, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        assert assoc.is_established
        try:
            identifier = series_identifier(originals[0])
            responses = [
                rsp
                for rsp, _ in assoc.send_c_get(
                    identifier, StudyRootQueryRetrieveInformationModelGet
                )
            ]
        finally:
            assoc.release()
    finally:
        engine.stop()
    assert responses[-1].Status == status.SUCCESS
    assert responses[-1].NumberOfCompletedSuboperations == 3
    assert_decompressed(arrived, originals)
