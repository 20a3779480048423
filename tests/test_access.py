"""Access control (engine/dicom/access.py) on the transport under test (ENGINE_TRANSPORT).

Unit tests of the rules, then two engines with real peers (dcmtk and pynetdicom):

- ``strict``: unknown callers refused, called AE title required, calling host checked;
  peers SCANNER (store only), VIEWER (query and retrieve, no store), LOCALNAME (host
  "localhost", resolved at start) and FARAWAY (declared at 127.0.0.2).
- ``open_store``: unknown callers may store and nothing else (Orthanc's
  DicomAlwaysAllowStore); FARAWAY declared at 127.0.0.2.

The engine listens on 127.0.0.1; a pynetdicom client bound to 127.0.0.2 (any 127/8
address works on Linux loopback) calls from the declared address.
"""

from __future__ import annotations

import logging
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from engine import status
from engine.config import DicomConfig, PeerConfig
from engine.dicom import access, acse
from engine.dicom.access import AccessControl, Denial, Grant, Service
from engine.dicom.qr import QUERY_RETRIEVE_CLASSES
from engine.errors import ConfigError
from engine.model import Origin, Outcome
from tests.helpers import Engine, ct_dataset, dcmtk_env, send_datasets, write_study

WAIT = 30
ALL = frozenset(Service)
# The permissive test default (tests/helpers.py OPEN_ACCESS), switched off.
CLOSED: dict[str, Any] = {
    "allow_unknown_echo": False,
    "allow_unknown_store": False,
    "allow_unknown_query": False,
    "allow_unknown_retrieve": False,
}
# The A-ASSOCIATE-RJ fields (PS3.8 9.3.4) of an access refusal.
PERMANENT = int(acse.RejectResult.PERMANENT)
SERVICE_USER = int(acse.RejectSource.SERVICE_USER)
CALLING_AE_NOT_RECOGNIZED = int(acse.RejectReason.CALLING_AE_NOT_RECOGNIZED)
CALLED_AE_NOT_RECOGNIZED = int(acse.RejectReason.CALLED_AE_NOT_RECOGNIZED)
ABSTRACT_SYNTAX_NOT_SUPPORTED = int(acse.ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED)
ELSEWHERE = "127.0.0.2"  # a loopback address the engine does not listen on


# -- the rules, without a network ---------------------------------------------------------


def control(peers: tuple[PeerConfig, ...] = (), **dicom: Any) -> AccessControl:
    return AccessControl(DicomConfig(peers=peers, **dicom))


def test_unknown_callers_are_refused_by_default() -> None:
    rules = control((PeerConfig("CT1", "10.0.0.4", 104),))
    denial = rules.admit("STRANGER", "ENGINE", "10.0.0.4")
    assert denial == Denial(
        acse.RejectReason.CALLING_AE_NOT_RECOGNIZED,
        "calling AE title 'STRANGER' is not a declared peer",
    )
    assert rules.admit("CT1", "ENGINE", "10.0.0.4") == Grant(ALL, "CT1")
    assert rules.admit("CT1  ", "ANYTHING", "::ffff:10.0.0.4") == Grant(ALL, "CT1")
    assert isinstance(rules.admit("ct1", "ENGINE", "10.0.0.4"), Denial)  # case matters


def test_a_declared_title_from_another_address_is_an_unknown_caller() -> None:
    peers = (PeerConfig("CT1", "10.0.0.4", 104, query=False, retrieve=False),)
    denial = control(peers).admit("CT1", "ENGINE", "10.0.0.5")
    assert isinstance(denial, Denial)
    assert denial.reason is acse.RejectReason.CALLING_AE_NOT_RECOGNIZED
    assert denial.why == "calling AE title 'CT1' is declared at 10.0.0.4, not 10.0.0.5"
    open_store = control(peers, allow_unknown_store=True)
    grant = open_store.admit("CT1", "ENGINE", "10.0.0.5")
    assert grant == Grant(frozenset({Service.STORE}), "", denial.why)
    unchecked = control(peers, check_calling_host=False)
    assert unchecked.admit("CT1", "ENGINE", "10.9.9.9") == Grant(
        frozenset({Service.ECHO, Service.STORE}), "CT1"
    )


def test_called_ae_title_is_checked_first_when_required() -> None:
    peers = (PeerConfig("CT1", "10.0.0.4", 104),)
    strict = control(peers, require_called_ae_title=True)
    assert strict.admit("CT1", "OTHER", "10.0.0.4") == Denial(
        acse.RejectReason.CALLED_AE_NOT_RECOGNIZED, "called AE title 'OTHER' is not 'ENGINE'"
    )
    assert strict.admit("CT1", "ENGINE", "10.0.0.4") == Grant(ALL, "CT1")


def test_host_names_resolve_at_start(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = socket.getaddrinfo

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "gone.example":  # no DNS query, however the machine is set up
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    peers = (PeerConfig("LOCAL", "localhost", 104), PeerConfig("GONE", "gone.example", 104))
    rules = control(peers)
    assert isinstance(rules.admit("LOCAL", "ENGINE", "127.0.0.1"), Denial)  # not yet
    with caplog.at_level(logging.INFO, logger="engine.dicom.access"):
        rules.resolve()
    assert rules.admit("LOCAL", "ENGINE", "127.0.0.1") == Grant(ALL, "LOCAL")
    assert isinstance(rules.admit("GONE", "ENGINE", "127.0.0.1"), Denial)
    assert "host 'gone.example' does not resolve" in caplog.text
    assert "access control: 2 declared peer(s)" in caplog.text
    assert "unknown callers: refused" in caplog.text


def test_contexts_of_services_not_granted_are_refused() -> None:
    find = str(StudyRootQueryRetrieveInformationModelFind)
    get = str(StudyRootQueryRetrieveInformationModelGet)
    scanner = Grant(frozenset({Service.ECHO, Service.STORE}), "CT1")
    assert scanner.accepts_context(str(CTImageStorage))
    assert scanner.accepts_context(acse.VERIFICATION)
    assert not scanner.accepts_context(find)
    assert not scanner.accepts_context(get)
    assert scanner.refused([find, get, str(CTImageStorage)]) == [Service.QUERY, Service.RETRIEVE]
    # Storage contexts carry a C-GET's sub-operations: never refused at negotiation.
    viewer = Grant(frozenset({Service.ECHO, Service.QUERY, Service.RETRIEVE}), "HOROS")
    assert viewer.accepts_context(str(CTImageStorage))
    assert str(viewer) == "declared peer 'HOROS' (echo, query, retrieve)"
    # Every query/retrieve class the engine serves belongs to a service.
    assert set(access.NEGOTIATED) == QUERY_RETRIEVE_CLASSES | {acse.VERIFICATION}


def test_a_refused_store_has_its_named_status(caplog: pytest.LogCaptureFixture) -> None:
    origin = Origin("10.0.0.9", 4000, "HOROS", "ENGINE")
    with caplog.at_level(logging.WARNING, logger="engine.dicom.access"):
        result = access.store_refused(Grant(frozenset({Service.ECHO}), "HOROS"), origin, "1.2.3")
    assert result.outcome is Outcome.NOT_AUTHORIZED
    assert status.for_outcome(result.outcome) == status.NOT_AUTHORIZED == 0x0124
    assert "C-STORE refused (not authorized): HOROS from 10.0.0.9:4000" in caplog.text


@pytest.mark.parametrize("host", ["10.0.0.0/24", "*"])
def test_a_peer_host_is_one_address_or_name(host: str) -> None:
    from engine import config as config_module

    raw = {
        "dicom": {"peers": [{"ae_title": "X", "host": host, "port": 104}]},
        "storage": {},
        "index": {},
    }
    with pytest.raises(ConfigError, match=r"dicom\.peers\[0\]\.host"):
        config_module.from_mapping(raw, Path("."))


# -- real peers ---------------------------------------------------------------------------


def peers_toml(*peers: dict[str, Any]) -> str:
    text = ""
    for peer in peers:
        text += "\n[[dicom.peers]]\n"
        for key, value in peer.items():
            text += f"{key} = {str(value).lower() if isinstance(value, bool) else repr(value)}\n"
    return text.replace("'", '"')


def start(folder: Path, dicom: dict[str, Any], *peers: dict[str, Any]) -> Engine:
    engine = Engine(folder, {"dicom": dicom})
    assert engine.config_path is not None
    engine.config_path.write_text(engine.config_path.read_text() + peers_toml(*peers))
    return engine.start()


def peer(ae_title: str, host: str = "127.0.0.1", **rights: bool) -> dict[str, Any]:
    return {"ae_title": ae_title, "host": host, "port": 11119, **rights}


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = start(
        tmp_path_factory.mktemp("strict"),
        CLOSED | {"require_called_ae_title": True, "check_calling_host": True},
        peer("SCANNER", query=False, retrieve=False),
        peer("VIEWER", store=False),
        peer("LOCALNAME", "localhost"),
        peer("FARAWAY", ELSEWHERE),
    )
    try:
        yield engine
    finally:
        assert engine.stop() == 0, engine.log()


@pytest.fixture(scope="module")
def open_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = start(
        tmp_path_factory.mktemp("open_store"),
        CLOSED | {"allow_unknown_store": True},
        peer("FARAWAY", ELSEWHERE),
    )
    try:
        yield engine
    finally:
        assert engine.stop() == 0, engine.log()


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=dcmtk_env(), capture_output=True, text=True, timeout=WAIT)


def echoscu(engine: Engine, calling: str, called: str = "ENGINE") -> str:
    """What a refused echoscu says (it must fail)."""
    done = run(
        "echoscu", "-to", "5", "-aet", calling, "-aec", called, "127.0.0.1", str(engine.port)
    )
    assert done.returncode != 0
    return done.stdout + done.stderr


def storescu(engine: Engine, calling: str, folder: Path) -> subprocess.CompletedProcess[str]:
    return run(
        "storescu", "-v", "-to", "5", "-aet", calling, "-aec", "ENGINE", "+sd", "+r",
        "127.0.0.1", str(engine.port), str(folder),
    )  # fmt: skip


def findscu(engine: Engine, calling: str) -> subprocess.CompletedProcess[str]:
    return run(
        "findscu", "-to", "5", "-S", "-aet", calling, "-aec", "ENGINE",
        "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
        "127.0.0.1", str(engine.port),
    )  # fmt: skip


def associate(
    engine: Engine,
    calling: str,
    contexts: tuple[str, ...] = (str(Verification),),
    called: str = "ENGINE",
    bind: str | None = None,
    **kwargs: Any,
) -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
    for uid in contexts:
        ae.add_requested_context(uid, [ExplicitVRLittleEndian])
    return ae.associate(
        "127.0.0.1",
        engine.port,
        ae_title=called,
        bind_address=(bind, 0) if bind else None,
        **kwargs,
    )


# pynetdicom's requestor now and then reports an A-ASSOCIATE-RJ it received as an abort:
# its debug log shows the RJ decoded, then "Aborting Association" (a race in its DUL
# thread; 12 of 300 attempts on a loaded machine, none from dcmtk). Such an attempt is
# made again; the engine answered each with an RJ (one log line each).
RJ_ATTEMPTS = 3


def rejected(engine: Engine, calling: str, **kwargs: Any) -> tuple[tuple[int, int, int], int]:
    """(result, source, reason) of the A-ASSOCIATE-RJ a pynetdicom requestor received, and
    how many attempts that took."""
    for attempt in range(1, RJ_ATTEMPTS + 1):
        assoc = associate(engine, calling, **kwargs)
        if assoc.is_aborted and not assoc.is_rejected and attempt < RJ_ATTEMPTS:
            continue
        assert assoc.is_rejected and not assoc.is_established
        rj = assoc.acceptor.primitive
        return (int(rj.result), int(rj.result_source), int(rj.diagnostic)), attempt
    raise AssertionError("unreachable")


def rejected_lines(engine: Engine, calling: str) -> list[str]:
    return [
        line
        for line in engine.log().splitlines()
        if re.search(rf"association rejected: {calling} from 127\.0\.0\.1:\d+: ", line)
    ]


def study(folder: Path, n: int = 2) -> list[Dataset]:
    return write_study(folder, 1, n, patient_id="ACCESS")


@pytest.mark.peers
def test_an_unknown_calling_ae_is_rejected(strict: Engine, tmp_path: Path) -> None:
    said = echoscu(strict, "STRANGER1")
    assert "Calling AE Title Not Recognized" in said
    (line,) = rejected_lines(strict, "STRANGER1")  # one line, naming AE and address
    assert line.endswith("calling AE title 'STRANGER1' is not a declared peer")

    study(tmp_path / "s")
    stored = storescu(strict, "STRANGER2", tmp_path / "s")
    assert stored.returncode != 0
    assert "Calling AE Title Not Recognized" in stored.stdout + stored.stderr
    assert strict.stored_files() == []  # nothing is written

    reason, attempts = rejected(strict, "STRANGER3")
    assert reason == (PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNIZED)
    assert len(rejected_lines(strict, "STRANGER3")) == attempts


@pytest.mark.peers
def test_a_wrong_called_ae_is_rejected(strict: Engine) -> None:
    assert "Called AE Title Not Recognized" in echoscu(strict, "SCANNER", called="NOTENGINE")
    reason, attempts = rejected(strict, "VIEWER", called="NOTENGINE")
    assert reason == (PERMANENT, SERVICE_USER, CALLED_AE_NOT_RECOGNIZED)
    lines = [x for x in rejected_lines(strict, "VIEWER") if "'NOTENGINE'" in x]
    assert len(lines) == attempts and all(x.endswith("is not 'ENGINE'") for x in lines)


@pytest.mark.peers
def test_a_declared_peer_must_call_from_its_host(strict: Engine) -> None:
    # FARAWAY is declared at 127.0.0.2: from 127.0.0.1 it is not recognized ...
    reason, attempts = rejected(strict, "FARAWAY")
    assert reason == (PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNIZED)
    lines = rejected_lines(strict, "FARAWAY")
    assert len(lines) == attempts
    for line in lines:
        assert line.endswith("calling AE title 'FARAWAY' is declared at 127.0.0.2, not 127.0.0.1")
    # ... from 127.0.0.2 it is.
    assoc = associate(strict, "FARAWAY", bind=ELSEWHERE)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == status.SUCCESS
    finally:
        assoc.release()
    assert re.search(r"association accepted: FARAWAY from 127\.0\.0\.2:\d+", strict.log())
    # SCANNER is declared at 127.0.0.1: from 127.0.0.2 it is not.
    reason, _ = rejected(strict, "SCANNER", bind=ELSEWHERE)
    assert reason == (PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNIZED)
    assert "calling AE title 'SCANNER' is declared at 127.0.0.1, not 127.0.0.2" in strict.log()
    # A host name is resolved at start: LOCALNAME is "localhost".
    assoc = associate(strict, "LOCALNAME")
    assert assoc.is_established
    assoc.release()


@pytest.mark.peers
def test_a_peer_without_store_permission_gets_0124(strict: Engine, tmp_path: Path) -> None:
    datasets = study(tmp_path / "s", 3)
    answers = send_datasets(strict, datasets[:2], calling_ae="VIEWER")
    assert [code for _, code in answers] == [status.NOT_AUTHORIZED] * 2
    refusals = re.findall(
        r"C-STORE refused \(not authorized\): VIEWER from 127\.0\.0\.1:\d+", strict.log()
    )
    assert len(refusals) == 2  # one line per refused request
    stored = storescu(strict, "VIEWER", tmp_path / "s")
    # dcmtk 3.6.7 has no name for it ("Unknown Status: 0x124"); it stops at the first.
    assert stored.returncode != 0
    assert re.search(r"Store Response \(.*0x0?124\)", stored.stderr), stored.stderr
    assert strict.stored_files() == []
    assert strict.quarantine_notes() == []  # refused for who sent it: nothing is kept
    # What it may do, it can: C-FIND.
    found = findscu(strict, "VIEWER")
    assert found.returncode == 0, found.stderr


@pytest.mark.peers
def test_a_peer_without_query_permission_has_its_contexts_refused(
    strict: Engine, tmp_path: Path
) -> None:
    datasets = study(tmp_path / "s")
    assert {code for _, code in send_datasets(strict, datasets, "SCANNER")} == {status.SUCCESS}
    found = findscu(strict, "SCANNER")
    assert found.returncode != 0
    assert "No Acceptable Presentation Contexts" in found.stdout + found.stderr
    contexts = (str(Verification), str(StudyRootQueryRetrieveInformationModelFind))
    assoc = associate(strict, "SCANNER", contexts)
    assert assoc.is_established
    try:
        (refused,) = assoc.rejected_contexts
        assert refused.abstract_syntax == StudyRootQueryRetrieveInformationModelFind
        assert refused.result == ABSTRACT_SYNTAX_NOT_SUPPORTED
        assert assoc.send_c_echo().Status == status.SUCCESS  # echo: always
    finally:
        assoc.release()
    assert re.search(
        r"SCANNER from 127\.0\.0\.1:\d+, declared peer 'SCANNER' \(echo, store\), may not"
        r" query: its C-FIND presentation contexts are refused",
        strict.log(),
    )


@pytest.mark.peers
def test_c_get_needs_retrieve_not_store(strict: Engine) -> None:
    """VIEWER may not store, yet its C-GET gets the instances back on storage contexts."""
    study_uid, series_uid = generate_uid(), generate_uid()
    datasets = [ct_dataset(study_uid, series_uid, i) for i in (1, 2)]
    assert {code for _, code in send_datasets(strict, datasets, "SCANNER")} == {status.SUCCESS}
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return status.SUCCESS

    ae = AE(ae_title="VIEWER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(
        "127.0.0.1",
        strict.port,
        ae_title="ENGINE",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    try:
        answers = list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    assert answers[-1][0].Status == status.SUCCESS
    assert sorted(received) == sorted(str(ds.SOPInstanceUID) for ds in datasets)


@pytest.mark.peers
def test_unknown_callers_may_store_when_allowed(open_store: Engine, tmp_path: Path) -> None:
    datasets = study(tmp_path / "s")
    stored = storescu(open_store, "ANYONE", tmp_path / "s")
    assert stored.returncode == 0, stored.stderr
    assert len(open_store.stored_files()) == len(datasets)
    # ... and nothing else: C-FIND and C-ECHO contexts are refused.
    found = findscu(open_store, "ANYONE")
    assert "No Acceptable Presentation Contexts" in found.stdout + found.stderr
    assert "No Acceptable Presentation Contexts" in echoscu(open_store, "ANYONE")
    assert re.search(
        r"ANYONE from 127\.0\.0\.1:\d+, unknown caller \(store\), may not query", open_store.log()
    )
    # A declared title from another address is served as an unknown caller.
    more = [ct_dataset(generate_uid(), generate_uid(), 1)]
    assert [code for _, code in send_datasets(open_store, more, "FARAWAY")] == [status.SUCCESS]
    assert re.search(
        r"FARAWAY from 127\.0\.0\.1:\d+: calling AE title 'FARAWAY' is declared at 127\.0\.0\.2,"
        r" not 127\.0\.0\.1; served as an unknown caller \(store\)",
        open_store.log(),
    )
