"""Overload: more associations than allowed, a flood of connections that never associate,
and a full pipeline at the same time as a crowd.

Whatever the transport (``ENGINE_TRANSPORT``):

- past ``[dicom] maximum_associations`` a request is refused as transient, by the
  service provider (presentation related), "local limit exceeded", the rejection PS3.8
  has for it (and what pynetdicom itself sends), so a scanner retries later;
- connections that send garbage or a truncated PDU and close are dropped at once,
  those that say nothing or stop in the middle of their A-ASSOCIATE-RQ after ARTIM
  (``[dicom] acse_timeout``), and none of them takes an association slot meanwhile: a
  scanner's C-ECHO and C-STORE succeed in the middle of a few hundred of them, and
  afterwards the engine holds no connection at all;
- a crowd that meets a full pipeline: the associations beyond the limit are refused,
  the admitted ones wait and get 0xA700 after ``[ingest] store_timeout``, and
  everything works again once the pipeline drains.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context, evt
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from engine import status
from engine.dicom import acse
from engine.dicom.connections import UNASSOCIATED_LIMIT, Unassociated
from tests.helpers import (
    TRANSPORT,
    Engine,
    ct_dataset,
    dcmtk_env,
    engine_in_thread,
    free_port,
    send_datasets,
)
from tests.test_backpressure import index_locked

WAIT = 15.0  # the longest any one wait below may take before the test fails
POLL = 0.02
SLOTS = 20  # [dicom] maximum_associations of the flood's engine
ARTIM = 3.0  # its [dicom] acse_timeout, seconds
FLOOD = 300  # connections opened by the flood
FLOOD_THREADS = 16
# What each connection of the flood does, in turn: send 64 random bytes and close, send
# half an A-ASSOCIATE-RQ and close, say nothing and stay, send half a request and stay.
KINDS = ("garbage", "truncated", "silent", "garbage", "truncated", "stalled")
LEFT_OPEN = ("silent", "stalled")
OPEN = FLOOD * sum(kind in LEFT_OPEN for kind in KINDS) // len(KINDS)  # left open
ECHO_TIMEOUT = 5  # seconds echoscu waits for each step
# Peak resident memory the flood may add to the engine (it measured 1-6 MB).
FLOOD_MEMORY = 64 * 1024 * 1024
# /proc/net/tcp states of a connection the engine still holds (SYN_RECV, ESTABLISHED,
# CLOSE_WAIT); after the engine closes its side, none of these.
HELD_STATES = {"03", "01", "08"}


# -- observing the engine from outside ----------------------------------------------------


def held_connections(port: int) -> int:
    """Connections to ``port`` the engine (or its accept queue) still holds."""
    held = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] in HELD_STATES:
            held += 1
    return held


def metric(port: int, name: str) -> float:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=WAIT).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no metric {name}")


def memory_kb(pid: int, field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of a process, in KB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def wait_until(predicate: Any, what: str, timeout: float = WAIT) -> float:
    """Poll ``predicate``; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"gave up after {timeout}s: {what}"
        time.sleep(POLL)
    return time.monotonic() - start


# -- peers ------------------------------------------------------------------------------------


def associate_rq() -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification: what an echo would send first."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = acse.DICOM_APPLICATION_CONTEXT
    primitive.calling_ae_title = "FLOOD"
    primitive.called_ae_title = "ENGINE"
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1"
    primitive.user_information = [maximum, implementation]
    encoded: bytes = A_ASSOCIATE_RQ(primitive).encode()
    return encoded


REQUEST = associate_rq()
TRUNCATED = REQUEST[: len(REQUEST) // 2]


def flood_one(port: int, number: int) -> socket.socket | None:
    """One connection of the flood; those left open are returned."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    kind = KINDS[number % len(KINDS)]
    if kind != "silent":
        with contextlib.suppress(OSError):  # the engine may abort garbage and close first
            sock.sendall(os.urandom(64) if kind == "garbage" else TRUNCATED)
    if kind in LEFT_OPEN:
        return sock
    sock.close()
    return None


def still_open(sock: socket.socket) -> bool:
    """The engine has not closed this connection (nothing to read, or data: no end)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return True
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except OSError:
        return False


def closed_by_engine(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def echoscu(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-to", str(ECHO_TIMEOUT), "-aet", "SCANNER", "-aec", "ENGINE",
         "127.0.0.1", str(port)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=WAIT, check=False,
    )  # fmt: skip


def pynetdicom_echo(port: int) -> int:
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="ENGINE")
    assert assoc.is_established, "the echo's association was refused"
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


@contextmanager
def running(engine: Engine) -> Iterator[Engine]:
    engine.start()
    try:
        yield engine
    finally:
        if engine.process is not None:
            assert engine.stop() == 0, engine.log()


# -- 1. the limit -------------------------------------------------------------------------


@pytest.mark.peers
def test_associations_beyond_the_maximum_are_refused_as_transient(tmp_path: Path) -> None:
    metrics_port = free_port()
    engine = Engine(
        tmp_path / "engine",
        {
            "dicom": {"maximum_associations": 2},
            "metrics": {"host": "127.0.0.1", "port": metrics_port},
        },
    )
    with running(engine):
        ae = AE(ae_title="CROWD")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        ae.add_requested_context(Verification)
        admitted = [ae.associate("127.0.0.1", engine.port, ae_title="ENGINE") for _ in range(2)]
        assert all(a.is_established for a in admitted)
        answers: list[Any] = []
        third = ae.associate(
            "127.0.0.1",
            engine.port,
            ae_title="ENGINE",
            evt_handlers=[(evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive))],
        )
        assert third.is_rejected and not third.is_established
        (rejection,) = answers
        assert rejection.result == acse.RejectResult.TRANSIENT
        assert rejection.result_source == acse.RejectSource.SERVICE_PROVIDER_PRESENTATION
        assert rejection.diagnostic == acse.PresentationRejectReason.LOCAL_LIMIT_EXCEEDED
        # dcmtk reads the same rejection.
        refused = echoscu(engine.port)
        assert refused.returncode != 0
        said = refused.stdout + refused.stderr
        assert "Rejected Transient" in said and "Local Limit Exceeded" in said, said
        assert metric(metrics_port, "dicom_associations_refused_total") == 2
        # The admitted ones work meanwhile; once one ends, a newcomer is admitted.
        assert admitted[0].send_c_echo().Status == status.SUCCESS
        ds = ct_dataset(generate_uid(), generate_uid(), 1)
        assert admitted[1].send_c_store(ds).Status == status.SUCCESS
        admitted[0].release()
        wait_until(lambda: metric(metrics_port, "dicom_associations_active") == 1, "a release")
        assert echoscu(engine.port).returncode == 0
        admitted[1].release()
    assert engine.log().count("association rejected: ") == 2


# -- 2. connections that never associate ----------------------------------------------------


@pytest.mark.peers
def test_a_flood_of_connections_that_never_associate_locks_no_scanner_out(
    tmp_path: Path,
) -> None:
    """The issue's case: a pynetdicom server with 20 slots stops answering C-ECHO after a
    few hundred such connections; this engine must not, on either transport."""
    assert OPEN < UNASSOCIATED_LIMIT  # none of them is dropped to make room
    metrics_port = free_port()
    engine = Engine(
        tmp_path / "engine",
        {
            "dicom": {"maximum_associations": SLOTS, "acse_timeout": ARTIM},
            "metrics": {"host": "127.0.0.1", "port": metrics_port},
        },
    )
    with running(engine):
        assert engine.process is not None
        pid = engine.process.pid
        resident = memory_kb(pid, "VmRSS")
        started = time.monotonic()
        with ThreadPoolExecutor(FLOOD_THREADS) as pool:
            opened = list(pool.map(lambda n: flood_one(engine.port, n), range(FLOOD)))
        left_open = [sock for sock in opened if sock is not None]
        flood_seconds = time.monotonic() - started
        try:
            assert len(left_open) == OPEN
            # A scanner in the middle of it: dcmtk and pynetdicom echo, and a store.
            echo_started = time.monotonic()
            echo = echoscu(engine.port)
            echo_seconds = time.monotonic() - echo_started
            assert echo.returncode == 0, echo.stdout + echo.stderr
            assert pynetdicom_echo(engine.port) == status.SUCCESS
            ds = ct_dataset(generate_uid(), generate_uid(), 1)
            assert send_datasets(engine, [ds]) == [(ds.SOPInstanceUID, status.SUCCESS)]
            # ... while those left open are still open: none of them held a slot.
            assert all(still_open(sock) for sock in left_open), "closed before ARTIM"
            # Garbage and truncated PDUs were dropped at once, well before ARTIM: the
            # engine holds those left open and nothing else.
            drop_seconds = wait_until(
                lambda: held_connections(engine.port) <= OPEN, "the closed ones dropped", ARTIM
            )
            assert all(still_open(sock) for sock in left_open), "closed before ARTIM"
            assert held_connections(engine.port) == OPEN
            # Those left open: closed by the engine at ARTIM (a little after, not before).
            for sock in left_open:
                assert closed_by_engine(sock, ARTIM + WAIT), "a connection stayed open past ARTIM"
            artim_seconds = time.monotonic() - started
        finally:
            for sock in left_open:
                sock.close()
        assert artim_seconds >= ARTIM
        wait_until(lambda: held_connections(engine.port) == 0, "no connection left")
        wait_until(
            lambda: metric(metrics_port, "dicom_associations_active") == 0, "no association left"
        )
        peak = memory_kb(pid, "VmHWM")
        assert engine.stats()["instances"] == 1
        # Still answering after the flood, of course.
        assert echoscu(engine.port).returncode == 0
    grown = (peak - resident) * 1024
    assert grown < FLOOD_MEMORY, f"the flood added {grown} bytes of peak memory"
    print(
        f"flood of {FLOOD} ({TRANSPORT or 'native'}): opened in {flood_seconds:.2f} s, echo in"
        f" {echo_seconds:.2f} s, closed ones gone after {drop_seconds:.2f} s more, the others"
        f" closed {artim_seconds:.2f} s after the start (ARTIM {ARTIM} s), peak memory"
        f" +{grown / 1e6:.1f} MB"
    )


EXTRA = 5  # connections past UNASSOCIATED_LIMIT in the test below
DROP_SLACK = 10  # how far from the oldest a dropped connection may be (accept order)


def test_unassociated_drops_the_oldest_past_its_limit() -> None:
    waiting: Unassociated[str] = Unassociated(limit=3)
    assert [waiting.add(name) for name in "abc"] == [None, None, None]
    waiting.discard("b")  # associated, or closed
    assert waiting.add("d") is None
    assert waiting.add("e") == "a"
    assert list(waiting) == ["c", "d", "e"] and len(waiting) == 3 and "a" not in waiting
    with pytest.raises(ValueError):
        Unassociated(limit=0)


@pytest.mark.peers
def test_past_the_limit_the_oldest_connection_without_an_association_is_dropped(
    tmp_path: Path,
) -> None:
    """Silent connections cost nothing but a socket each, and even those are bounded."""
    engine = Engine(tmp_path / "engine", {"dicom": {"acse_timeout": WAIT * 4}})
    with running(engine):
        opened = [
            socket.create_connection(("127.0.0.1", engine.port), timeout=WAIT)
            for _ in range(UNASSOCIATED_LIMIT + EXTRA)
        ]
        try:
            wait_until(lambda: sum(not still_open(sock) for sock in opened) >= EXTRA, "the drops")
            dropped = [n for n, sock in enumerate(opened) if not still_open(sock)]
            assert len(dropped) == EXTRA and max(dropped) < EXTRA + DROP_SLACK, dropped
            assert echoscu(engine.port).returncode == 0
        finally:
            for sock in opened:
                sock.close()
    warning = f"more than {UNASSOCIATED_LIMIT} connections without an association"
    assert engine.log().count(warning) == EXTRA + 1  # the echo's connection made room too


# -- 3. a crowd and a full pipeline at once ----------------------------------------------


CROWD_SLOTS = 4
CROWD = 6
STORE_TIMEOUT = 1.0


def test_a_crowd_at_a_full_pipeline_is_refused_or_answered_out_of_resources(
    tmp_path: Path,
) -> None:
    """The index is held (a slow disk): the admitted senders wait for the pipeline and
    get 0xA700 after store_timeout; the others are refused as transient; memory holds
    at most one dataset per admitted association. Then everything goes through."""
    with engine_in_thread(
        tmp_path,
        dicom={"maximum_associations": CROWD_SLOTS},
        ingest={"store_timeout": STORE_TIMEOUT},
        pipeline={"queue_size": 1, "batch_max": 1},
    ) as eng:
        study = generate_uid()
        datasets = [ct_dataset(study, generate_uid(), n) for n in range(CROWD)]
        ae = AE(ae_title="CROWD")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        with index_locked(tmp_path / "index.sqlite"):
            crowd = [ae.associate("127.0.0.1", eng.port, ae_title="ENGINE") for _ in datasets]
            admitted = [a for a in crowd if a.is_established]
            assert len(admitted) == CROWD_SLOTS
            assert sum(a.is_rejected for a in crowd) == CROWD - CROWD_SLOTS
            with ThreadPoolExecutor(CROWD_SLOTS) as pool:
                answers = list(pool.map(lambda a, ds: a.send_c_store(ds), admitted, datasets))
            assert [int(r.Status) for r in answers] == [status.OUT_OF_RESOURCES] * CROWD_SLOTS
            assert eng.pipeline.receiver.in_pipeline <= eng.pipeline.capacity
        # The pipeline drains: the same associations store everything (a scanner's retry).
        for assoc, ds in zip(admitted, datasets, strict=False):
            assert assoc.send_c_store(ds).Status == status.SUCCESS
            assoc.release()
        target = Engine.__new__(Engine)
        target.port, target.ae_title = eng.port, eng.ae_title
        rest = datasets[CROWD_SLOTS:]
        assert send_datasets(target, rest) == [(d.SOPInstanceUID, status.SUCCESS) for d in rest]
    assert len(list((tmp_path / "storage").glob("??/??/*/*.dcm"))) == CROWD
