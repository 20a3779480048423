"""The C-MOVE sub-operation sender against real peers: dcmtk's storescp and a pynetdicom SCP.

storescp (every syntax accepted) checks that what arrives is what was stored; the
pynetdicom SCP accepts only Explicit VR Little Endian, to check the transfer syntax rules,
and answers chosen statuses, aborts or stays silent to check the counting.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset

from engine import status
from engine.dicom import store_scu
from engine.dicom.store_scu import Destination, Instance, Progress, plan_contexts, send
from tests.helpers import ct_dataset, dcmtk_env, free_port

START_TIMEOUT = 10.0
QUICK = 5.0  # seconds: an unreachable destination or a cancel must not take longer
SHORT_TIMEOUT = 1.0  # the SCU's timeout where a silent peer is the point of the test


def write_ct(folder: Path, count: int, *, implicit: int = 0) -> list[Instance]:
    """``count`` CT files, the last ``implicit`` of them in Implicit VR Little Endian."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    instances = []
    for number in range(1, count + 1):
        ds = ct_dataset(study, series, number)
        if number > count - implicit:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        path = folder / f"ct{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        instances.append(instance_of(path))
    return instances


def rle_instance(folder: Path) -> Instance:
    """pydicom's RLE Lossless MR test file: a compressed instance."""
    folder.mkdir(parents=True, exist_ok=True)
    source = get_testdata_file("MR_small_RLE.dcm")
    assert source is not None
    path = folder / "mr_rle.dcm"
    shutil.copyfile(source, path)
    instance = instance_of(path)
    assert instance.transfer_syntax == RLELossless
    return instance


def instance_of(path: Path) -> Instance:
    meta = read_file_meta_info(path)
    return Instance(
        sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
        sop_class_uid=str(meta.MediaStorageSOPClassUID),
        transfer_syntax=str(meta.TransferSyntaxUID),
        path=path.resolve(),
    )


def assert_same(received: Dataset, instance: Instance) -> None:
    original = dcmread(instance.path)
    assert received == original
    assert received.PixelData == original.PixelData


# -- dcmtk storescp ----------------------------------------------------------------------


@dataclass
class StoreSCP:
    destination: Destination
    folder: Path

    def received(self) -> dict[str, Path]:
        """The files storescp wrote, by SOP Instance UID."""
        files = (p for p in sorted(self.folder.iterdir()) if p.is_file())
        return {str(read_file_meta_info(p).MediaStorageSOPInstanceUID): p for p in files}


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's dataset as encoded, without its preamble and file meta."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    if shutil.which("storescp") is None:
        pytest.skip("dcmtk is not installed (apt-get install dcmtk)")
    folder = tmp_path / "storescp"
    folder.mkdir()
    port = free_port()
    # +xa: accept every transfer syntax dcmtk knows, so each instance goes as stored.
    # +B: write the received dataset bytes as they came (no padding removed, ...).
    process = subprocess.Popen(
        ["storescp", "+xa", "+B", "-od", str(folder), "-aet", "DEST", str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, process)
        yield StoreSCP(Destination("DEST", "127.0.0.1", port), folder)
    finally:
        process.terminate()  # SIGTERM to its PID
        process.wait(START_TIMEOUT)


def wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, "storescp exited at start"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("storescp did not start listening")


@pytest.mark.peers
def test_storescp_receives_every_instance_identical_in_its_stored_syntax(
    storescp: StoreSCP, tmp_path: Path
) -> None:
    instances = [*write_ct(tmp_path / "files", 5, implicit=1), rle_instance(tmp_path / "files")]
    calls: list[Progress] = []

    result = send(storescp.destination, instances, calling_ae="ENGINE", on_progress=calls.append)

    assert result == Progress(remaining=0, completed=6, failed=0, warning=0, failed_uids=[])
    assert [p.remaining for p in calls] == [5, 4, 3, 2, 1, 0]
    assert [p.completed for p in calls] == [1, 2, 3, 4, 5, 6]
    received = storescp.received()
    assert sorted(received) == sorted(i.sop_instance_uid for i in instances)
    for instance in instances:
        path = received[instance.sop_instance_uid]
        # Sent as stored: the very bytes of the file, in its transfer syntax.
        assert read_file_meta_info(path).TransferSyntaxUID == instance.transfer_syntax
        assert dataset_bytes(path) == dataset_bytes(instance.path)
        assert_same(dcmread(path), instance)


# -- pynetdicom SCP, Explicit VR Little Endian only --------------------------------------


@dataclass
class Stored:
    uid: str
    transfer_syntax: str
    originator_ae: str | None
    originator_id: int | None
    dataset: Dataset


@dataclass
class ExplicitOnlySCP:
    """Accepts CT and MR in Explicit VR Little Endian only; records what it receives."""

    destination: Destination
    received: list[Stored] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> answer
    abort_on: set[str] = field(default_factory=set)
    silent_on: set[str] = field(default_factory=set)
    released: threading.Event = field(default_factory=threading.Event)
    unblock: threading.Event = field(default_factory=threading.Event)

    def on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        uid = str(ds.SOPInstanceUID)
        request = event.request
        assert isinstance(request, C_STORE)
        self.received.append(
            Stored(
                uid,
                str(event.context.transfer_syntax),
                request.MoveOriginatorApplicationEntityTitle,
                request.MoveOriginatorMessageID,
                ds,
            )
        )
        if uid in self.abort_on:
            event.assoc.abort()
        if uid in self.silent_on:
            self.unblock.wait(START_TIMEOUT)
        return self.statuses.get(uid, status.SUCCESS)

    def on_released(self, event: evt.Event) -> None:
        self.released.set()


@pytest.fixture
def explicit_scp(monkeypatch: pytest.MonkeyPatch) -> Iterator[ExplicitOnlySCP]:
    # engine/dicom/scp.py (imported by tests.helpers) makes every pynetdicom acceptor
    # take any storage context in any syntax; this one must keep to its own list.
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", False)
    ae = AE(ae_title="EXPLICIT")
    for sop_class in (CTImageStorage, MRImageStorage):
        ae.add_supported_context(sop_class, ExplicitVRLittleEndian)
    scp = ExplicitOnlySCP(Destination("EXPLICIT", "127.0.0.1", 0))
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, scp.on_store), (evt.EVT_RELEASED, scp.on_released)],
    )
    assert server is not None
    scp.destination = Destination("EXPLICIT", "127.0.0.1", server.server_address[1])
    try:
        yield scp
    finally:
        scp.unblock.set()
        server.shutdown()


def test_compressed_fails_where_only_uncompressed_is_accepted_the_rest_arrive(
    explicit_scp: ExplicitOnlySCP, tmp_path: Path
) -> None:
    ct = write_ct(tmp_path / "files", 3, implicit=1)
    rle = rle_instance(tmp_path / "files")
    instances = [ct[0], rle, *ct[1:]]

    result = send(
        explicit_scp.destination,
        instances,
        calling_ae="ENGINE",
        move_originator_ae="REQUESTER",
        move_originator_message_id=7,
    )

    assert result == Progress(
        remaining=0, completed=3, failed=1, warning=0, failed_uids=[rle.sop_instance_uid]
    )
    assert [s.uid for s in explicit_scp.received] == [i.sop_instance_uid for i in ct]
    for stored, instance in zip(explicit_scp.received, ct, strict=True):
        # The implicit VR instance was re-encoded, the others went as stored.
        assert stored.transfer_syntax == ExplicitVRLittleEndian
        assert_same(stored.dataset, instance)
        assert (stored.originator_ae, stored.originator_id) == ("REQUESTER", 7)
    assert ct[-1].transfer_syntax == ImplicitVRLittleEndian


def test_statuses_are_counted_and_unreadable_files_fail(
    explicit_scp: ExplicitOnlySCP, tmp_path: Path
) -> None:
    ok, coerced, mismatched, refused = write_ct(tmp_path / "files", 4)
    missing = Instance(
        generate_uid(), str(CTImageStorage), str(ExplicitVRLittleEndian), tmp_path / "gone.dcm"
    )
    explicit_scp.statuses = {
        coerced.sop_instance_uid: store_scu.COERCION_OF_DATA_ELEMENTS,
        mismatched.sop_instance_uid: store_scu.DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
        refused.sop_instance_uid: status.OUT_OF_RESOURCES,
    }
    calls: list[Progress] = []

    result = send(
        explicit_scp.destination,
        [ok, coerced, missing, mismatched, refused],
        calling_ae="ENGINE",
        on_progress=calls.append,
    )

    assert result == Progress(
        remaining=0,
        completed=1,
        failed=2,
        warning=2,
        failed_uids=[missing.sop_instance_uid, refused.sop_instance_uid],
    )
    assert [(p.remaining, p.completed, p.warning, p.failed) for p in calls] == [
        (4, 1, 0, 0),
        (3, 1, 1, 0),
        (2, 1, 1, 1),
        (1, 1, 2, 1),
        (0, 1, 2, 2),
    ]
    assert len(explicit_scp.received) == 4
    assert explicit_scp.released.wait(START_TIMEOUT)
    # Without a C-MOVE, no Move Originator is sent.
    assert {(s.originator_ae, s.originator_id) for s in explicit_scp.received} == {(None, None)}


def test_abort_mid_way_fails_the_rest(explicit_scp: ExplicitOnlySCP, tmp_path: Path) -> None:
    instances = write_ct(tmp_path / "files", 4)
    explicit_scp.abort_on = {instances[1].sop_instance_uid}
    calls: list[Progress] = []

    started = time.monotonic()
    result = send(
        explicit_scp.destination, instances, calling_ae="ENGINE", on_progress=calls.append
    )

    # Noticed when the peer closes, not at the end of the (30 s) DIMSE timeout.
    assert time.monotonic() - started < QUICK
    assert result == Progress(
        remaining=0,
        completed=1,
        failed=3,
        warning=0,
        failed_uids=[i.sop_instance_uid for i in instances[1:]],
    )
    assert calls[-1] == result
    assert len(explicit_scp.received) == 2


def test_no_response_fails_that_instance_and_the_rest(
    explicit_scp: ExplicitOnlySCP, tmp_path: Path
) -> None:
    instances = write_ct(tmp_path / "files", 3)
    explicit_scp.silent_on = {instances[1].sop_instance_uid}

    started = time.monotonic()
    result = send(explicit_scp.destination, instances, calling_ae="ENGINE", timeout=SHORT_TIMEOUT)

    assert time.monotonic() - started < QUICK
    assert (result.completed, result.failed, result.remaining) == (1, 2, 0)
    assert result.failed_uids == [i.sop_instance_uid for i in instances[1:]]


def test_cancel_stops_early_and_releases(explicit_scp: ExplicitOnlySCP, tmp_path: Path) -> None:
    instances = write_ct(tmp_path / "files", 5)
    calls: list[Progress] = []

    result = send(
        explicit_scp.destination,
        instances,
        calling_ae="ENGINE",
        on_progress=calls.append,
        cancelled=lambda: len(calls) >= 2,
    )

    assert result == Progress(remaining=3, completed=2, failed=0, warning=0, failed_uids=[])
    assert len(explicit_scp.received) == 2
    assert explicit_scp.released.wait(START_TIMEOUT)


# -- no peer ---------------------------------------------------------------------------


def test_unreachable_destination_fails_everything_quickly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    instances = write_ct(tmp_path / "files", 3)
    nowhere = Destination("NOBODY", "127.0.0.1", free_port())
    calls: list[Progress] = []

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=store_scu.__name__):
        result = send(nowhere, instances, calling_ae="ENGINE", on_progress=calls.append)

    assert time.monotonic() - started < QUICK
    assert result == Progress(
        remaining=0,
        completed=0,
        failed=3,
        warning=0,
        failed_uids=[i.sop_instance_uid for i in instances],
    )
    assert calls == [result]
    assert any(str(nowhere) in r.getMessage() for r in caplog.records)


def test_nothing_to_send_or_cancelled_at_once_opens_no_association() -> None:
    nowhere = Destination("NOBODY", "127.0.0.1", free_port())
    assert send(nowhere, [], calling_ae="ENGINE") == Progress(remaining=0)
    one = Instance("1.2.3", str(CTImageStorage), str(ExplicitVRLittleEndian), Path("/x.dcm"))
    assert send(nowhere, [one], calling_ae="ENGINE", cancelled=lambda: True) == Progress(
        remaining=1
    )


def test_move_originator_goes_as_a_pair() -> None:
    nowhere = Destination("NOBODY", "127.0.0.1", free_port())
    with pytest.raises(ValueError, match="together"):
        send(nowhere, [], calling_ae="ENGINE", move_originator_ae="REQUESTER")


# -- presentation contexts ---------------------------------------------------------------


def fake(sop_class: str, syntax: str) -> Instance:
    return Instance(generate_uid(), sop_class, syntax, Path("/unused.dcm"))


def test_contexts_stored_pairs_then_uncompressed_fallbacks() -> None:
    ct, mr = str(CTImageStorage), str(MRImageStorage)
    explicit, implicit, rle = map(
        str, (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless)
    )
    instances = [fake(mr, rle), fake(ct, explicit), fake(ct, explicit), fake(ct, rle)]

    assert plan_contexts(instances) == [
        (ct, explicit),
        (mr, rle),
        (ct, rle),
        (mr, explicit),
        (ct, implicit),
        (mr, implicit),
    ]


def test_contexts_past_128_keep_stored_pairs_and_drop_implicit_fallbacks_first() -> None:
    classes = [f"1.2.826.0.1.3680043.10.999.{n}" for n in range(50)]
    instances = [fake(c, str(RLELossless)) for c in classes]

    plan = plan_contexts(instances)

    assert len(plan) == store_scu.MAX_CONTEXTS
    assert plan[:50] == [(c, RLELossless) for c in classes]
    assert plan[50:100] == [(c, ExplicitVRLittleEndian) for c in classes]
    assert plan[100:] == [(c, ImplicitVRLittleEndian) for c in classes[:28]]


def test_contexts_past_128_stored_pairs_keep_the_most_used() -> None:
    classes = [f"1.2.826.0.1.3680043.10.999.{n}" for n in range(130)]
    instances = [fake(c, str(RLELossless)) for c in classes]
    instances += [fake(classes[-1], str(RLELossless))]  # the last class is the most used

    plan = plan_contexts(instances)

    assert len(plan) == store_scu.MAX_CONTEXTS
    assert plan[0] == (classes[-1], RLELossless)
    assert plan[1:] == [(c, RLELossless) for c in classes[:127]]
