"""The native transport against real and broken peers.

Every engine here runs with ``[dicom] transport = "native"`` set explicitly, whatever
``ENGINE_TRANSPORT`` says: dcmtk's echoscu and storescu with their proposals and PDU
sizes, pynetdicom with many contexts on several associations at once, and hand-made
peers on a raw socket that abort, send garbage, say nothing, or release while a
C-STORE is still in the pipeline. After each broken peer a normal store still works.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    generate_uid,
)
from pynetdicom import AE, AllStoragePresentationContexts, build_context, evt
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from bench.fuzz import messages
from bench.fuzz.messages import associate_rq, store_pdus
from engine import status
from engine.dicom import acse, dimse, pdu
from engine.dicom.server import NativeServer
from engine.index.sqlite import stats_of
from tests.helpers import Engine, InProcess, ct_dataset, dcmtk_env, engine_in_thread, write_study

NATIVE: dict[str, Any] = {"transport": "native"}
WAIT = 15.0  # the longest any one wait below may take before the test fails
POLL = 0.02
PIXEL_DATA = Tag(0x7FE0, 0x0010)
CT_CONTEXT = messages.CT_CONTEXT  # the one presentation context a raw peer proposes


# -- engines ------------------------------------------------------------------------------


@pytest.fixture
def start_engine(tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    """Start native-transport engine processes; each must stop cleanly at the end."""
    started: list[Engine] = []

    def start(name: str = "engine", **dicom: Any) -> Engine:
        eng = Engine(tmp_path / name, {"dicom": NATIVE | dicom}).start()
        started.append(eng)
        return eng

    yield start
    for eng in started:
        if eng.process is not None:
            assert eng.stop() == 0, eng.log()


@contextmanager
def native_in_thread(folder: Path, **dicom: Any) -> Iterator[tuple[InProcess, NativeServer]]:
    with engine_in_thread(folder, dicom=NATIVE | dicom) as eng:
        assert isinstance(eng.listener, NativeServer)
        yield eng, eng.listener


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"gave up after {WAIT}s waiting for {what}"
        time.sleep(POLL)


def wait_idle(server: NativeServer) -> None:
    """No association left open and no request task left running."""
    wait_until(lambda: not server.associations, "every association to close")
    wait_until(lambda: not server._tasks, "every request task to end")


def index_stats(folder: Path) -> dict[str, int]:
    return asyncio.run(stats_of(folder / "index.sqlite"))


def stored_files(storage: Path) -> list[Path]:
    return sorted(
        p
        for p in storage.rglob("*.dcm")
        if not any(part.startswith(".") for part in p.relative_to(storage).parts)
    )


def expected_stats(storage: Path, instances: int, series: int, studies: int = 1) -> dict[str, int]:
    return {
        "patients": 1,
        "studies": studies,
        "series": series,
        "instances": instances,
        "bytes": sum(p.stat().st_size for p in stored_files(storage)),
        "quarantined": 0,
        "stable_studies": 0,
        "forward_pending": 0,
        "forward_failed": 0,
    }


def assert_same_dataset(stored: Dataset, sent: Dataset) -> None:
    """Element for element; pixel data by value when the byte order changed on the way."""
    assert [e.tag for e in stored] == [e.tag for e in sent]
    stored_syntax = UID(stored.file_meta.TransferSyntaxUID)
    swapped = (
        stored_syntax.is_little_endian != UID(sent.file_meta.TransferSyntaxUID).is_little_endian
    )
    for element in sent:
        if element.tag == PIXEL_DATA and swapped:
            assert (stored.pixel_array == sent.pixel_array).all()
        else:
            assert stored[element.tag].value == element.value, element.keyword


def pynetdicom_store(port: int, datasets: list[Dataset], calling_ae: str = "PYSCU") -> list[int]:
    """One pynetdicom association storing ``datasets``; the status of each."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="ENGINE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), env=dcmtk_env(), capture_output=True, text=True, timeout=120, check=False
    )


def storescu(port: int, *options: str, called_ae: str = "ENGINE") -> list[str]:
    """The argument list of a storescu run sending folders, before the inputs."""
    return ["storescu", "-aet", "STORESCU", "-aec", called_ae, "+sd", "+r", *options,
            "127.0.0.1", str(port)]  # fmt: skip


# -- a raw peer -----------------------------------------------------------------------------
# Its messages (``associate_rq``, ``store_pdus``) are the network fuzzer's builders.


class RawPeer:
    """A DICOM peer on a bare socket, to say exactly what a test wants said."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)

    def close(self) -> None:
        self.sock.close()

    def send(self, *parts: bytes) -> None:
        self.sock.sendall(b"".join(parts))

    def recv_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {size} bytes")
            data += chunk
        return data

    def read_pdu(self) -> tuple[int, bytes]:
        header = self.recv_exactly(pdu.HEADER)
        pdu_type, length = struct.unpack(">BxL", header)
        return pdu_type, header + self.recv_exactly(length)

    def closed_by_engine(self) -> bool:
        """Whether the engine closes the connection (within the socket timeout)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def associate(self, max_pdu: int = 16384) -> None:
        self.send(associate_rq(max_pdu))
        pdu_type, encoded = self.read_pdu()
        assert pdu_type == pdu.PDUType.ASSOCIATE_AC
        ac = A_ASSOCIATE_AC()
        ac.decode(encoded)
        (context,) = ac.presentation_context
        assert context.result == acse.ContextResult.ACCEPTANCE
        assert context.transfer_syntax == ExplicitVRLittleEndian

    def read_response(self) -> tuple[dimse.Command, list[int]]:
        """The next DIMSE response, and the length of each P-DATA-TF PDU that carried it."""
        parts: list[bytes] = []
        lengths: list[int] = []
        for _ in range(10_000):
            pdu_type, encoded = self.read_pdu()
            assert pdu_type == pdu.PDUType.P_DATA_TF, f"PDU type 0x{pdu_type:02x}"
            lengths.append(len(encoded) - pdu.HEADER)
            for pdv in pdu.parse_pdata(encoded[pdu.HEADER :]):
                assert pdv.is_command and pdv.context_id == CT_CONTEXT
                parts.append(bytes(pdv.data))
                if pdv.is_last:
                    return dimse.decode_command(b"".join(parts)), lengths
        raise AssertionError("a response of more than 10,000 PDUs")


# -- 1. dcmtk ---------------------------------------------------------------------------------


@pytest.mark.peers
def test_echoscu(start_engine: Callable[..., Engine]) -> None:
    eng = start_engine()
    run = dcmtk("echoscu", "-to", "5", "-aet", "ECHOSCU", "-aec", "ENGINE", "127.0.0.1",
                str(eng.port))  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "association accepted: ECHOSCU from 127.0.0.1" in eng.log()


def jpeg_study(folder: Path, n: int) -> list[Path]:
    """JPEG lossless (SV1) copies, made by dcmcjpeg, of a fresh series."""
    plain = folder / "plain"
    write_study(plain, n_series=1, n_instances=n, seed=5)
    out = folder / "jpeg"
    out.mkdir()
    files = []
    for source in sorted(plain.iterdir()):
        target = out / source.name
        run = dcmtk("dcmcjpeg", "+e1", str(source), str(target))
        assert run.returncode == 0, run.stderr
        files.append(target)
    return files


# (storescu options, whether JPEG files go too, transfer syntax stored for the plain
# files or None for "the one the file has").
PROPOSALS: dict[str, tuple[tuple[str, ...], bool, str | None]] = {
    "default": ((), False, None),
    "-xe": (("-xe",), False, None),
    "-xi": (("-xi",), False, ImplicitVRLittleEndian),
    # One context per syntax: storescu keeps the file's explicit little endian.
    "-xb": (("-xb",), False, None),
    # One context with every syntax, big endian first: converted on the wire.
    "-xb +C": (("-xb", "+C"), False, ExplicitVRBigEndian),
    "-xs": (("-xs",), True, None),
    "-R": (("-R",), False, None),
    "--abort": (("--abort",), False, None),
}


@pytest.mark.peers
@pytest.mark.parametrize("name", list(PROPOSALS))
def test_storescu_proposals(name: str, start_engine: Callable[..., Engine], tmp_path: Path) -> None:
    options, with_jpeg, syntax = PROPOSALS[name]
    eng = start_engine()
    sent = {ds.SOPInstanceUID: ds for ds in write_study(tmp_path / "plain", 2, 4)}
    inputs = [str(tmp_path / "plain")]
    if with_jpeg:
        jpeg = jpeg_study(tmp_path / "jpeg", 3)
        for path in jpeg:
            ds = dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == JPEGLosslessSV1
            sent[ds.SOPInstanceUID] = ds
        inputs.append(str(tmp_path / "jpeg" / "jpeg"))
    run = dcmtk(*storescu(eng.port, *options), *inputs)
    assert run.returncode == 0, run.stderr

    files = eng.stored_files()
    # The JPEG files are a study of their own, with one series.
    studies, series = (2, 3) if with_jpeg else (1, 2)
    assert eng.stats() == expected_stats(eng.storage, len(sent), series, studies)
    assert len(files) == len(sent)
    for path in files:
        stored = dcmread(path)
        original = sent[stored.SOPInstanceUID]
        expected = syntax or original.file_meta.TransferSyntaxUID
        if original.file_meta.TransferSyntaxUID == JPEGLosslessSV1:
            expected = JPEGLosslessSV1
        assert stored.file_meta.TransferSyntaxUID == expected
        assert_same_dataset(stored, original)
    log = eng.log()
    accepted = [int(n) for n in re.findall(r"STORESCU from .*\((\d+) of the proposed", log)]
    assert len(accepted) == 1
    if name == "default":
        assert accepted[0] > 100  # storescu proposes every storage class it knows
    if name == "--abort":
        assert "association aborted by STORESCU" in log


@pytest.mark.peers
@pytest.mark.parametrize("size", [4096, 16384, 65536, 131072])
def test_storescu_pdu_sizes(size: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``-pdu N`` (what storescu receives) and ``--max-send-pdu N`` (what it sends)."""
    received: list[int] = []
    answered_with: list[int] = []
    parse_pdata, encode_pdata = pdu.parse_pdata, pdu.encode_pdata

    def recording_parse(body: bytes | memoryview) -> list[pdu.PDV]:
        received.append(len(body))
        return parse_pdata(body)

    def recording_encode(
        context_id: int, is_command: bool, data: bytes | memoryview, max_pdu_length: int
    ) -> list[bytes]:
        answered_with.append(max_pdu_length)
        return encode_pdata(context_id, is_command, data, max_pdu_length)

    monkeypatch.setattr(pdu, "parse_pdata", recording_parse)
    monkeypatch.setattr(pdu, "encode_pdata", recording_encode)
    # 256 x 256 x 2 bytes of pixels: more than one PDU even at 131072.
    sent = write_study(tmp_path / "study", 1, 3, size=256)
    with native_in_thread(tmp_path / "engine") as (eng, server):
        opts = ("-pdu", str(size), "--max-send-pdu", str(size))
        run = dcmtk(*storescu(eng.port, *opts), str(tmp_path / "study"))
        assert run.returncode == 0, run.stderr
        stats = index_stats(tmp_path / "engine")
        wait_idle(server)
    storage = tmp_path / "engine" / "storage"
    assert stats == expected_stats(storage, 3, 1)
    by_uid = {ds.SOPInstanceUID: ds for ds in map(dcmread, stored_files(storage))}
    for ds in sent:
        assert_same_dataset(by_uid[ds.SOPInstanceUID], ds)
    assert max(received) <= size
    assert len(received) >= 3 * 3  # a command and at least two dataset PDUs each
    assert answered_with == [size] * 3  # each answer cut to the peer's maximum


# -- 2. pynetdicom: many contexts, several associations at once --------------------------


def test_pynetdicom_many_contexts_several_associations(
    start_engine: Callable[..., Engine],
) -> None:
    eng = start_engine()
    contexts = [*AllStoragePresentationContexts[:127], build_context(Verification)]
    n_associations, per_association = 4, 6
    barrier = threading.Barrier(n_associations, timeout=WAIT)
    study = generate_uid()
    batches = [
        [ct_dataset(study, series, i, seed=a) for i in range(1, per_association + 1)]
        for a, series in enumerate(generate_uid() for _ in range(n_associations))
    ]

    def sender(index: int) -> tuple[int, int, list[int]]:
        ae = AE(ae_title=f"MANY{index}")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
        ae.requested_contexts = contexts
        assoc = ae.associate("127.0.0.1", eng.port, ae_title="ENGINE")
        assert assoc.is_established
        try:
            accepted, rejected = len(assoc.accepted_contexts), len(assoc.rejected_contexts)
            barrier.wait()  # every association open before any stores
            statuses = [int(assoc.send_c_store(ds).Status) for ds in batches[index]]
            statuses.append(int(assoc.send_c_echo().Status))
        finally:
            assoc.release()
        return accepted, rejected, statuses

    with ThreadPoolExecutor(n_associations) as pool:
        results = list(pool.map(sender, range(n_associations)))
    assert results == [(128, 0, [status.SUCCESS] * (per_association + 1))] * n_associations
    assert eng.stats() == expected_stats(
        eng.storage, n_associations * per_association, n_associations
    )
    stored = {ds.SOPInstanceUID: ds for ds in map(dcmread, eng.stored_files())}
    for ds in (ds for batch in batches for ds in batch):
        assert_same_dataset(stored[ds.SOPInstanceUID], ds)
    assert eng.log().count("(128 of the proposed contexts)") == n_associations


# -- 3. a peer that leaves in the middle of a dataset ---------------------------------------


def temp_files_with_data(folder: Path) -> list[Path]:
    found = []
    for path in (folder / "storage" / ".incoming").iterdir():
        try:
            if path.stat().st_size:
                found.append(path)
        except FileNotFoundError:
            pass  # removed while we looked
    return found


@pytest.mark.parametrize("ending", ["a-abort", "close", "close-mid-pdu"])
def test_peer_leaving_in_the_middle_of_a_dataset(
    ending: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engine")
    ds = ct_dataset(generate_uid(), generate_uid(), 1, size=128)
    command, *fragments = store_pdus(ds)
    assert len(fragments) >= 3
    with native_in_thread(tmp_path) as (eng, server):
        peer = RawPeer(eng.port)
        peer.associate()
        (association,) = server.associations
        peer.send(command, fragments[0])  # the dataset's first fragment, not its last
        if ending == "close-mid-pdu":
            peer.send(fragments[1][: len(fragments[1]) // 2])
            wait_until(lambda: association.framer.pending > 0, "half a PDU buffered")
        wait_until(
            lambda: association._data_parts != [] or association._spool is not None,
            "a dataset in progress",
        )
        assert association._command is not None
        if ending == "a-abort":
            peer.send(pdu.encode_abort(pdu.AbortSource.SERVICE_USER))
            assert peer.closed_by_engine()
        peer.close()
        wait_idle(server)
        assert index_stats(tmp_path)["instances"] == 0
        assert stored_files(tmp_path / "storage") == []
        # The partial temp file is removed (empty ones made ahead for the next are not).
        wait_until(lambda: not temp_files_with_data(tmp_path), "the partial file removed")
        # The engine keeps serving.
        again = ct_dataset(generate_uid(), generate_uid(), 2)
        assert pynetdicom_store(eng.port, [again]) == [status.SUCCESS]
        assert index_stats(tmp_path)["instances"] == 1
        wait_idle(server)
    messages = caplog.text
    if ending == "a-abort":
        assert "association aborted by RAWPEER" in messages
    else:
        assert re.search(r"connection with RAWPEER \(.*\) lost during a transfer", messages)
    if ending == "close-mid-pdu":
        assert "closed the connection in the middle of a PDU" in messages


# -- 4. garbage, truncated PDUs, silence ----------------------------------------------------

NOISE = random.Random(20261126)
USER, PROVIDER = pdu.AbortSource.SERVICE_USER, pdu.AbortSource.SERVICE_PROVIDER
INVALID, UNEXPECTED = pdu.AbortReason.INVALID_PDU_PARAMETER, pdu.AbortReason.UNEXPECTED_PDU
# name: (associate first?, what to send, the A-ABORT's source and reason). Before an
# association PS3.8 (AA-1) aborts as the service user, reason not significant.
GARBAGE: dict[str, tuple[bool, bytes, tuple[int, int]]] = {
    "random bytes": (False, b"\xab" + NOISE.randbytes(4095), (USER, 0)),
    "unknown PDU type": (False, struct.pack(">BxL", 0x09, 4) + b"\x00" * 4, (USER, 0)),
    "P-DATA before A-ASSOCIATE": (
        False,
        pdu.encode_pdata(CT_CONTEXT, True, b"\x00" * 8, 0)[0],
        (USER, 0),
    ),
    "A-ASSOCIATE-RQ of noise": (
        False,
        struct.pack(">BxL", 0x01, 200) + NOISE.randbytes(200),
        (PROVIDER, INVALID),
    ),
    "P-DATA over our maximum": (True, struct.pack(">BxL", 0x04, 1 << 26), (PROVIDER, INVALID)),
    "PDV item overrunning its PDU": (
        True,
        struct.pack(">BxLLBB", 0x04, 6, 100, CT_CONTEXT, 3),
        (PROVIDER, INVALID),
    ),
    "context never proposed": (
        True,
        pdu.encode_pdata(3, True, b"\x00" * 8, 0)[0],
        (PROVIDER, INVALID),
    ),
    "second A-ASSOCIATE-RQ": (True, associate_rq(), (PROVIDER, UNEXPECTED)),
    "A-RELEASE-RP to nothing": (True, pdu.RELEASE_RP_PDU, (PROVIDER, UNEXPECTED)),
}


def warnings_about(caplog: pytest.LogCaptureFixture, peer: RawPeer) -> list[str]:
    """The engine's warnings naming this peer's connection."""
    port = peer.sock.getsockname()[1]
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("engine.dicom") and r.levelno == logging.WARNING
        and f"(127.0.0.1:{port})" in r.getMessage()
    ]  # fmt: skip


def test_garbage_is_aborted_and_others_keep_storing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each broken peer gets one A-ABORT and one log line, then the engine drops it."""
    caplog.set_level(logging.INFO, logger="engine")
    study, series = generate_uid(), generate_uid()
    with native_in_thread(tmp_path, acse_timeout=1) as (eng, server):
        ae = AE(ae_title="GOODPEER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        ae.add_requested_context(Verification)
        good = ae.associate("127.0.0.1", eng.port, ae_title="ENGINE")
        assert good.is_established
        statuses = [int(good.send_c_store(ct_dataset(study, series, 1)).Status)]
        peers: dict[str, RawPeer] = {}
        for name, (associate, garbage, _) in GARBAGE.items():
            peer = peers[name] = RawPeer(eng.port)
            if associate:
                peer.associate()
            peer.send(garbage)
        truncated = RawPeer(eng.port)
        truncated.send(associate_rq()[:40])
        truncated.sock.shutdown(socket.SHUT_WR)
        silent = RawPeer(eng.port)
        for number, (name, peer) in enumerate(peers.items(), start=2):
            pdu_type, encoded = peer.read_pdu()
            assert pdu_type == pdu.PDUType.ABORT, name
            assert encoded == pdu.encode_abort(*GARBAGE[name][2]), name  # type: ignore[arg-type]
            # We do not close: the engine does, when its ARTIM timer runs out.
            assert peer.closed_by_engine(), name
            statuses.append(int(good.send_c_store(ct_dataset(study, series, number)).Status))
        assert truncated.closed_by_engine()
        assert silent.closed_by_engine()
        statuses.append(int(good.send_c_echo().Status))
        good.release()
        wait_idle(server)
        stats = index_stats(tmp_path)
    assert statuses == [status.SUCCESS] * (len(GARBAGE) + 2)
    assert stats["instances"] == len(GARBAGE) + 1
    for name, peer in peers.items():
        (line,) = warnings_about(caplog, peer)
        assert "protocol error" in line or "unexpected" in line, name
        peer.close()
    assert "unknown PDU type 0xab" in caplog.text
    assert "unexpected ASSOCIATE_RQ PDU from RAWPEER" in caplog.text
    (line,) = warnings_about(caplog, truncated)
    assert "closed the connection in the middle of a PDU" in line
    assert warnings_about(caplog, silent) == []
    truncated.close()
    silent.close()


def test_garbage_after_the_abort_gets_no_more_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Once the framing is lost, further bytes are dropped: no A-ABORT and log line each."""
    caplog.set_level(logging.INFO, logger="engine")
    with native_in_thread(tmp_path, acse_timeout=1) as (eng, server):
        peer = RawPeer(eng.port)
        peer.send(b"\xab" * 64)
        assert peer.read_pdu() == (pdu.PDUType.ABORT, pdu.encode_abort(USER))
        for _ in range(20):
            peer.send(b"\xab" * 64)
            time.sleep(0.01)  # separate reads on the engine's side
        assert peer.closed_by_engine()  # nothing more before the close
        assert len(warnings_about(caplog, peer)) == 1
        peer.close()
        wait_idle(server)


# -- 5. called AE title -----------------------------------------------------------------------


@pytest.mark.peers
def test_called_ae_title_required(start_engine: Callable[..., Engine], tmp_path: Path) -> None:
    eng = start_engine("strict", require_called_ae_title=True)
    write_study(tmp_path / "study", 1, 2)

    refused = echo_to(eng.port, "WRONG")
    assert refused.returncode != 0
    assert "Called AE Title Not Recognized" in refused.stdout + refused.stderr
    assert re.search(
        r"association rejected: ECHOSCU from 127\.0\.0\.1:\d+: called AE title 'WRONG' is not "
        r"'ENGINE'",
        eng.log(),
    )
    stores = dcmtk(*storescu(eng.port, called_ae="WRONG"), str(tmp_path / "study"))
    assert stores.returncode != 0
    assert eng.stats()["instances"] == 0
    assert echo_to(eng.port, "ENGINE").returncode == 0
    stores = dcmtk(*storescu(eng.port), str(tmp_path / "study"))
    assert stores.returncode == 0, stores.stderr
    assert eng.stats()["instances"] == 2

    lenient = start_engine("lenient")  # require_called_ae_title = false, the default
    assert echo_to(lenient.port, "WRONG").returncode == 0
    stores = dcmtk(*storescu(lenient.port, called_ae="WRONG"), str(tmp_path / "study"))
    assert stores.returncode == 0, stores.stderr
    assert lenient.stats()["instances"] == 2


def echo_to(port: int, called: str) -> subprocess.CompletedProcess[str]:
    return dcmtk("echoscu", "-to", "5", "-aet", "ECHOSCU", "-aec", called, "127.0.0.1", str(port))


# -- 6. more associations than allowed ----------------------------------------------------


def test_associations_beyond_the_maximum_are_refused_as_transient(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engine")
    with native_in_thread(tmp_path, maximum_associations=2) as (eng, server):
        ae = AE(ae_title="CROWD")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        first = [ae.associate("127.0.0.1", eng.port, ae_title="ENGINE") for _ in range(2)]
        assert all(a.is_established for a in first)
        answers: list[Any] = []
        third = ae.associate(
            "127.0.0.1",
            eng.port,
            ae_title="ENGINE",
            evt_handlers=[(evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive))],
        )
        assert third.is_rejected and not third.is_established
        (rejection,) = answers
        assert rejection.result == acse.RejectResult.TRANSIENT
        assert rejection.result_source == acse.RejectSource.SERVICE_PROVIDER_PRESENTATION
        assert rejection.diagnostic == acse.PresentationRejectReason.LOCAL_LIMIT_EXCEEDED
        # The two admitted ones work while the third was turned away.
        study = generate_uid()
        for n, assoc in enumerate(first, start=1):
            ds = ct_dataset(study, generate_uid(), n)
            assert assoc.send_c_store(ds).Status == status.SUCCESS
            assoc.release()
        wait_idle(server)
        again = [ae.associate("127.0.0.1", eng.port, ae_title="ENGINE") for _ in range(2)]
        assert all(a.is_established for a in again)
        for assoc in again:
            assoc.release()
        wait_idle(server)
    assert "more than 2 associations" in caplog.text


# -- 7. release while a C-STORE is in the pipeline; the peer's maximum PDU ----------------


def test_release_while_a_store_is_in_the_pipeline_is_answered_first(tmp_path: Path) -> None:
    ds = ct_dataset(generate_uid(), generate_uid(), 1)
    with native_in_thread(tmp_path) as (eng, server):
        peer = RawPeer(eng.port)
        peer.associate()
        # One write: the A-RELEASE-RQ arrives before the pipeline can have answered.
        peer.send(*store_pdus(ds), pdu.RELEASE_RQ_PDU)
        response, _ = peer.read_response()
        assert response.command_field == dimse.CommandField.C_STORE_RSP
        assert response.status == status.SUCCESS
        assert response.affected_sop_instance_uid == ds.SOPInstanceUID
        pdu_type, encoded = peer.read_pdu()
        assert (pdu_type, encoded) == (pdu.PDUType.RELEASE_RP, pdu.RELEASE_RP_PDU)
        peer.close()
        wait_idle(server)
        assert index_stats(tmp_path)["instances"] == 1
    (path,) = stored_files(tmp_path / "storage")
    assert_same_dataset(dcmread(path), ds)


@pytest.mark.parametrize("max_pdu", [0, 20, 4096])
def test_answers_respect_the_peers_maximum_pdu(max_pdu: int, tmp_path: Path) -> None:
    ds = ct_dataset(generate_uid(), generate_uid(), 1)
    with native_in_thread(tmp_path) as (eng, server):
        peer = RawPeer(eng.port)
        peer.associate(max_pdu)
        peer.send(*store_pdus(ds))
        response, lengths = peer.read_response()
        assert response.status == status.SUCCESS
        if max_pdu:
            assert max(lengths) <= max_pdu
        if max_pdu == 20:
            assert len(lengths) > 5  # a command set of about 170 bytes in 14-byte pieces
        else:
            assert len(lengths) == 1
        peer.send(pdu.RELEASE_RQ_PDU)
        assert peer.read_pdu() == (pdu.PDUType.RELEASE_RP, pdu.RELEASE_RP_PDU)
        peer.close()
        wait_idle(server)
