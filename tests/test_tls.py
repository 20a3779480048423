"""DICOM over TLS and DICOMweb over HTTPS, against real peers, on both transports.

The certificates are made here with the ``openssl`` command line: a CA, the engine's
certificate for 127.0.0.1 (subjectAltName IP:127.0.0.1), a client certificate signed by
the CA, and one signed by another CA that the engine does not trust.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from engine import certificates
from engine import config as config_module
from engine.certificates import HandshakeFailure
from engine.config import TlsConfig, TlsVersion
from engine.dicom.connections import UNASSOCIATED_LIMIT
from engine.errors import ConfigError
from tests.helpers import (
    REPO,
    Engine,
    dcmtk_env,
    free_port,
    serve_until_exit,
    write_config,
    write_study,
)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

LOG_WAIT = 10.0
CLIENT_TIMEOUT = 10
# What a plain DICOM client sends first: an A-ASSOCIATE-RQ PDU header (type 1, length 68).
PLAIN_ASSOCIATE_RQ_START = bytes([1, 0, 0, 0, 0, 68]) + bytes(68)


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from a CA the engine does not trust
    rogue_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
        str(cert), "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _make_leaf(folder: Path, name: str, ca: tuple[Path, Path], usage: str) -> tuple[Path, Path]:
    cert, key, csr = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    extensions = folder / f"{name}.ext"
    extensions.write_text(
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n"
        f"keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-set_serial", str(time.time_ns()), "-days", "2", "-extfile", str(extensions),
        "-out", str(cert),
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = _make_ca(folder, "hospital-ca")
    server = _make_leaf(folder, "engine", ca, "serverAuth")
    client = _make_leaf(folder, "ct-scanner", ca, "clientAuth")
    rogue = _make_leaf(folder, "intruder", _make_ca(folder, "other-ca"), "clientAuth")
    return Pki(ca[0], *server, *client, *rogue)


def tls_section(pki: Pki, **values: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "port": free_port(),
        "certificate": str(pki.server_cert),
        "private_key": str(pki.server_key),
        "ca_certificates": str(pki.ca),
        "verify_client": True,
    }
    return section | values


@pytest.fixture(scope="module")
def engine(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """One engine for the module: a TLS port requiring client certificates, and
    DICOMweb over HTTPS."""
    web = {"host": "127.0.0.1", "port": free_port(), "tls": True}
    running = Engine(
        tmp_path_factory.mktemp("engine"), overrides={"tls": tls_section(pki), "dicomweb": web}
    ).start()
    try:
        yield running
        assert running.stop() == 0
    finally:
        running.kill()


def tls_port(engine: Engine) -> int:
    assert engine.config_path is not None
    port: int = tomllib.loads(engine.config_path.read_text())["tls"]["port"]
    return port


def web_port(engine: Engine) -> int:
    assert engine.config_path is not None
    port: int = tomllib.loads(engine.config_path.read_text())["dicomweb"]["port"]
    return port


def wait_for_log(engine: Engine, text: str, after: int = 0) -> str:
    """The engine's log from offset ``after`` once it holds ``text`` (bounded wait)."""
    deadline = time.monotonic() + LOG_WAIT
    while True:
        log = engine.log()[after:]
        if text in log:
            return log
        assert time.monotonic() < deadline, f"{text!r} not in the log:\n{log}"
        time.sleep(0.05)


def client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def pynetdicom_echo(port: int, context: ssl.SSLContext | None) -> int | None:
    """A C-ECHO on its own association (TLS with ``context``); its status, or None when
    no association could be established."""
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = CLIENT_TIMEOUT
    ae.add_requested_context(Verification)
    tls_args = (context, "127.0.0.1") if context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="ENGINE", tls_args=tls_args)
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else -1
    finally:
        assoc.release()


def refused(port: int, context: ssl.SSLContext | None) -> bool:
    """Whether the engine closes a connection (TLS with ``context``, or plain) before any
    DICOM exchange: the handshake fails, or the first read ends in an alert or EOF.

    (pynetdicom as a client leaks its socket when the server closes a TLS connection
    right after the handshake, so these checks use the ssl module directly.)"""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as raw:
        try:
            if context is None:
                raw.sendall(PLAIN_ASSOCIATE_RQ_START)
                return raw.recv(1) == b""
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return tls.recv(1) == b""
        except (ssl.SSLError, ConnectionResetError):
            return True


def dcmtk_tls(pki: Pki, cert: Path | None = None, key: Path | None = None) -> list[str]:
    """dcmtk's TLS options: our key and certificate, and the CA that signed the engine's."""
    options = ["+tls", str(key), str(cert)] if cert is not None else ["+tla"]
    return [*options, "+cf", str(pki.ca)]


# -- the TLS port ------------------------------------------------------------------------


@pytest.mark.peers
def test_dcmtk_echoes_and_stores_over_tls(engine: Engine, pki: Pki, tmp_path: Path) -> None:
    datasets = write_study(tmp_path / "study", n_series=1, n_instances=4)
    before = engine.stats()["instances"]
    offset = len(engine.log())
    tls = dcmtk_tls(pki, pki.client_cert, pki.client_key)
    common = ["-to", str(CLIENT_TIMEOUT), "-aet", "CT1", "-aec", "ENGINE"]
    port = str(tls_port(engine))
    echo = subprocess.run(
        ["echoscu", *tls, *common, "127.0.0.1", port],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert echo.returncode == 0, echo.stderr
    store = subprocess.run(
        ["storescu", *tls, *common, "+sd", "+r", "127.0.0.1", port, str(tmp_path / "study")],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert store.returncode == 0, store.stderr
    assert engine.stats()["instances"] == before + len(datasets)
    log = wait_for_log(engine, "client certificate CN=ct-scanner", offset)
    assert "TLS connection from 127.0.0.1" in log
    assert "issued by CN=hospital-ca" in log


def test_pynetdicom_stores_over_tls(engine: Engine, pki: Pki, tmp_path: Path) -> None:
    datasets = write_study(tmp_path / "study", n_series=1, n_instances=3)
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = CLIENT_TIMEOUT
    ae.add_requested_context(datasets[0].SOPClassUID, ExplicitVRLittleEndian)
    context = client_context(pki, pki.client_cert, pki.client_key)
    assoc = ae.associate(
        "127.0.0.1", tls_port(engine), ae_title="ENGINE", tls_args=(context, "127.0.0.1")
    )
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()
    assert statuses == [0x0000] * len(datasets)
    # The plain port serves as before, beside the TLS one.
    assert pynetdicom_echo(engine.port, None) == 0x0000


@pytest.mark.parametrize(
    ("client", "failure"),
    [
        ("none", HandshakeFailure.NO_CLIENT_CERTIFICATE),
        ("rogue", HandshakeFailure.CLIENT_CERTIFICATE_REFUSED),
    ],
)
def test_a_client_without_a_trusted_certificate_is_refused(
    engine: Engine, pki: Pki, client: str, failure: HandshakeFailure
) -> None:
    offset = len(engine.log())
    cert = {"none": None, "rogue": pki.rogue_cert}[client]
    key = {"none": None, "rogue": pki.rogue_key}[client]
    assert refused(tls_port(engine), client_context(pki, cert, key))
    wait_for_log(engine, f"failed: {failure}", offset)
    # ... and the engine goes on serving clients that have one.
    context = client_context(pki, pki.client_cert, pki.client_key)
    assert pynetdicom_echo(tls_port(engine), context) == 0x0000


@pytest.mark.peers
def test_a_plain_client_on_the_tls_port_fails_cleanly(
    engine: Engine, pki: Pki, tmp_path: Path
) -> None:
    offset = len(engine.log())
    assert refused(tls_port(engine), None)
    wait_for_log(engine, f"failed: {HandshakeFailure.NOT_TLS}", offset)
    write_study(tmp_path / "study", n_series=1, n_instances=1)
    store = subprocess.run(
        ["storescu", "-to", "5", "-aec", "ENGINE", "+sd", "127.0.0.1", str(tls_port(engine)),
         str(tmp_path / "study")],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert store.returncode != 0
    # A TLS client is served as before.
    context = client_context(pki, pki.client_cert, pki.client_key)
    assert pynetdicom_echo(tls_port(engine), context) == 0x0000


def test_stalled_handshakes_hold_up_nobody(engine: Engine, pki: Pki) -> None:
    """Connections that never start their handshake (pynetdicom wraps sockets in its one
    accept thread: the engine moves the handshake off it) do not delay other clients, and
    past UNASSOCIATED_LIMIT of them the oldest is dropped."""
    context = client_context(pki, pki.client_cert, pki.client_key)
    offset = len(engine.log())
    with contextlib.ExitStack() as stack:
        for _ in range(UNASSOCIATED_LIMIT + 1):
            stack.enter_context(
                socket.create_connection(("127.0.0.1", tls_port(engine)), timeout=CLIENT_TIMEOUT)
            )
        started = time.monotonic()
        assert pynetdicom_echo(tls_port(engine), context) == 0x0000
        assert time.monotonic() - started < CLIENT_TIMEOUT / 2
        wait_for_log(engine, f"dropping a TLS handshake: more than {UNASSOCIATED_LIMIT}", offset)


# -- DICOMweb over HTTPS -----------------------------------------------------------------


def test_dicomweb_over_https(engine: Engine, pki: Pki, tmp_path: Path) -> None:
    """HTTPS with the [tls] certificate; no client certificate asked for (DICOMweb
    authenticates with its own settings), even with verify_client on."""
    datasets = write_study(tmp_path / "study", n_series=1, n_instances=2)
    context = client_context(pki, pki.client_cert, pki.client_key)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(datasets[0].SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1", tls_port(engine), ae_title="ENGINE", tls_args=(context, "127.0.0.1")
    )
    assert assoc.is_established
    try:
        assert all(int(assoc.send_c_store(ds).Status) == 0 for ds in datasets)
    finally:
        assoc.release()
    study = str(datasets[0].StudyInstanceUID)
    root = f"https://127.0.0.1:{web_port(engine)}/dicom-web"
    answer = requests.get(
        f"{root}/studies", params={"StudyInstanceUID": study}, verify=pki.ca, timeout=30
    )
    assert answer.status_code == 200
    assert [s["0020000D"]["Value"][0] for s in answer.json()] == [study]
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{web_port(engine)}/dicom-web/studies", timeout=5)
    assert "DICOMweb listening on https://" in engine.log()


# -- settings ------------------------------------------------------------------------------


def test_without_verify_client_any_tls_client_is_served_and_old_tls_refused(
    pki: Pki, tmp_path: Path
) -> None:
    """verify_client off: a client with no certificate is served. minimum_version 1.3:
    a TLS 1.2 client is refused, with the reason in the log."""
    section = tls_section(pki, verify_client=False, minimum_version="1.3")
    del section["ca_certificates"]
    engine = Engine(tmp_path / "engine", overrides={"tls": section}).start()
    try:
        port = tls_port(engine)
        assert pynetdicom_echo(port, client_context(pki)) == 0x0000
        old = client_context(pki)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        assert refused(port, old)
        wait_for_log(engine, f"failed: {HandshakeFailure.NO_COMMON_PROTOCOL}")
        # A handshake still waiting for its client does not hold up the shutdown.
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT):
            started = time.monotonic()
            assert engine.stop() == 0
            assert time.monotonic() - started < CLIENT_TIMEOUT
    finally:
        engine.kill()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"certificate": "missing.pem"}, "'tls.certificate': no such file"),
        ({"private_key": "CLIENT_KEY"}, "are not a PEM certificate and its private key"),
        ({"ca_certificates": "SERVER_KEY"}, "'tls.ca_certificates' ("),
    ],
)
def test_certificate_problems_stop_the_engine_at_start(
    pki: Pki, tmp_path: Path, change: dict[str, str], message: str
) -> None:
    files = {"CLIENT_KEY": str(pki.client_key), "SERVER_KEY": str(pki.server_key)}
    section = tls_section(pki) | {k: files.get(v, v) for k, v in change.items()}
    config_path = write_config(
        tmp_path,
        {
            "dicom": {"host": "127.0.0.1", "port": free_port()},
            "storage": {"path": "storage"},
            "index": {"path": "index.sqlite"},
            "tls": section,
        },
    )
    result = serve_until_exit(config_path)
    assert result.returncode == 1
    assert message in result.stderr
    assert not (tmp_path / "index.sqlite").exists()  # stopped before opening anything


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    base: dict[str, Any] = {"dicom": {"port": 11112}, "storage": {}, "index": {}}
    cert = {"certificate": "engine.pem"}

    def load(**sections: dict[str, Any]) -> config_module.Config:
        return config_module.from_mapping(base | sections, tmp_path)

    config = load(tls=cert)
    assert config.tls == TlsConfig(certificate=tmp_path / "engine.pem")
    assert load().tls is None
    for sections, message in [
        ({"tls": {}}, r"'tls\.certificate' is required"),
        ({"tls": cert | {"port": 11112}}, r"'tls\.port' must differ from 'dicom\.port'"),
        ({"tls": cert | {"port": 0}}, r"'tls\.port' must be between 1 and 65535"),
        ({"tls": cert | {"verify_client": True}}, r"'tls\.verify_client' needs"),
        ({"tls": cert | {"minimum_version": "1.1"}}, r"'tls\.minimum_version' must be one of"),
        ({"dicomweb": {"tls": True}}, r"'dicomweb\.tls' needs a \[tls\] section"),
        ({"tls": cert | {"key": "x"}}, r"unknown config key 'tls\.key'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load(**sections)


def test_encrypted_private_key_is_refused_without_a_prompt(pki: Pki, tmp_path: Path) -> None:
    encrypted = tmp_path / "encrypted.key"
    _openssl(
        "pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:secret",
        "-out", str(encrypted),
    )  # fmt: skip
    config = TlsConfig(certificate=pki.server_cert, private_key=encrypted)
    with pytest.raises(ConfigError, match="is encrypted"):
        certificates.server_context(config, verify_client=False)
    context = certificates.server_context(
        TlsConfig(certificate=pki.server_cert, private_key=pki.server_key),
        verify_client=False,
    )
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.verify_mode is ssl.CERT_NONE


def test_tls_section_of_the_repository_config_shows_the_defaults() -> None:
    """config.toml shows [tls] commented out: uncommented, it is the defaults (and example
    paths for the files, which have none)."""
    lines = (REPO / "config.toml").read_text().splitlines()
    start = lines.index("# [tls]")
    block = []
    for line in lines[start:]:
        if not line.startswith("# "):
            break
        block.append(line.removeprefix("# "))
    shown = tomllib.loads("\n".join(block))["tls"]
    defaults = config_module.describe(config_module.Config(tls=TlsConfig()))["tls"]
    assert set(shown) == set(defaults)
    for key, default in defaults.items():
        if default is not None:
            assert shown[key] == default, key
    assert TlsConfig().minimum_version is TlsVersion.TLS_1_2
