"""TLS server contexts from ``[tls]``: DICOM's TLS port and DICOMweb over HTTPS.

Built once at start, before any port opens, so a missing file, a key that is not the
certificate's or an unreadable CA list stops the engine with a message naming the key
(``ConfigError``) instead of failing each connection later. Protocol versions follow
PS3.15 B.9 (BCP 195): TLS 1.2 or newer (``minimum_version``); ciphers are the ssl
module's defaults (forward-secret AEAD suites first, no RC4, 3DES or SHA-1 MACs).

``describe_session`` names a finished handshake for the logs, and ``HandshakeFailure``
says in an administrator's words why one failed.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from engine.config import Config, TlsConfig, TlsVersion
from engine.errors import ConfigError

VERSIONS = {
    TlsVersion.TLS_1_2: ssl.TLSVersion.TLSv1_2,
    TlsVersion.TLS_1_3: ssl.TLSVersion.TLSv1_3,
}


@dataclass(frozen=True, slots=True)
class TlsPort:
    """The DICOM TLS listener of either transport: its port, and the context it uses."""

    port: int
    context: ssl.SSLContext


def dicom_port(config: Config) -> TlsPort | None:
    """The DICOM TLS port, when the config file has ``[tls]``."""
    if config.tls is None:
        return None
    context = server_context(config.tls, verify_client=config.tls.verify_client)
    return TlsPort(config.tls.port, context)


def https_context(config: Config) -> ssl.SSLContext | None:
    """DICOMweb's context, with ``[dicomweb] tls``. It asks for no client certificate:
    browsers and viewers authenticate with ``bearer_token`` or a user name instead."""
    if config.tls is None or config.dicomweb is None or not config.dicomweb.tls:
        return None
    return server_context(config.tls, verify_client=False)


def _no_password() -> str:
    """``load_cert_chain`` would otherwise prompt on the terminal for an encrypted key."""
    raise ConfigError("'tls.private_key' is encrypted; give the engine an unencrypted key file")


def server_context(config: TlsConfig, *, verify_client: bool) -> ssl.SSLContext:
    """A server-side context with the engine's certificate; with ``verify_client``, one
    that requires a client certificate signed by ``ca_certificates``."""
    assert config.certificate is not None  # config._check_tls
    files = {"tls.certificate": config.certificate, "tls.private_key": config.private_key}
    if verify_client:
        files["tls.ca_certificates"] = config.ca_certificates
    for name, path in files.items():
        if path is not None and not path.is_file():
            raise ConfigError(f"'{name}': no such file: {path}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = VERSIONS[config.minimum_version]
    key = config.private_key
    try:
        context.load_cert_chain(config.certificate, key, password=_no_password)
    except OSError as exc:  # ssl.SSLError, or a file that cannot be read
        raise ConfigError(
            f"'tls.certificate' ({config.certificate}) and 'tls.private_key'"
            f" ({key or 'in the certificate file'}) are not a PEM certificate and its"
            f" private key: {_reason(exc)}"
        ) from exc
    if verify_client:
        try:
            context.load_verify_locations(cafile=config.ca_certificates)
        except OSError as exc:
            raise ConfigError(
                f"'tls.ca_certificates' ({config.ca_certificates}) is not a PEM file of"
                f" certificates: {_reason(exc)}"
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    return exc.strerror or str(exc)


def _name(entries: Any) -> str:
    """A certificate's subject as ``CN=x, O=y`` from ``getpeercert()``'s nested tuples."""
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU"}
    parts = [f"{short.get(key, key)}={value}" for rdn in entries or () for key, value in rdn]
    return ", ".join(parts)


def describe_session(tls: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384, client certificate CN=ct1`` for the log."""
    if tls is None:
        return "TLS"
    cipher = tls.cipher()
    text = f"{tls.version()} {cipher[0] if cipher else ''}".rstrip()
    peer = tls.getpeercert()
    if peer:
        text += f", client certificate {_name(peer.get('subject'))}"
        text += f" (issued by {_name(peer.get('issuer'))}, until {peer.get('notAfter')})"
    return text


class HandshakeFailure(StrEnum):
    """Why a TLS handshake failed, for the log line; the library's text follows it."""

    NOT_TLS = "the client does not speak TLS (a plain DICOM or HTTP client on the TLS port?)"
    NO_CLIENT_CERTIFICATE = "the client sent no certificate (tls.verify_client is on)"
    CLIENT_CERTIFICATE_REFUSED = (
        "the client's certificate is not signed by tls.ca_certificates, has expired,"
        " or is not meant for a TLS client"
    )
    SERVER_CERTIFICATE_REFUSED = (
        "the client does not trust the engine's certificate (give it the CA that signed"
        " tls.certificate)"
    )
    NO_COMMON_PROTOCOL = (
        "no TLS version or cipher in common (the client's TLS is older than tls.minimum_version?)"
    )
    STALLED = "the client did not complete the handshake in time (dicom.acse_timeout)"
    CLOSED = "the client closed the connection during the handshake"
    OTHER = "the handshake failed"

    @classmethod
    def of(cls, exc: BaseException) -> HandshakeFailure:
        if isinstance(exc, TimeoutError) or (
            isinstance(exc, ConnectionAbortedError) and "longer than" in str(exc)
        ):
            return cls.STALLED
        if isinstance(exc, ssl.SSLCertVerificationError):
            return cls.CLIENT_CERTIFICATE_REFUSED
        if isinstance(exc, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError):
            return cls.CLOSED
        if not isinstance(exc, ssl.SSLError):
            return cls.OTHER
        return _BY_REASON.get(str(exc.reason), cls.OTHER)


_BY_REASON = {
    "WRONG_VERSION_NUMBER": HandshakeFailure.NOT_TLS,
    "HTTP_REQUEST": HandshakeFailure.NOT_TLS,
    "HTTPS_PROXY_REQUEST": HandshakeFailure.NOT_TLS,
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": HandshakeFailure.NO_CLIENT_CERTIFICATE,
    "CERTIFICATE_VERIFY_FAILED": HandshakeFailure.CLIENT_CERTIFICATE_REFUSED,
    "TLSV1_ALERT_UNKNOWN_CA": HandshakeFailure.SERVER_CERTIFICATE_REFUSED,
    "SSLV3_ALERT_BAD_CERTIFICATE": HandshakeFailure.SERVER_CERTIFICATE_REFUSED,
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": HandshakeFailure.SERVER_CERTIFICATE_REFUSED,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": HandshakeFailure.SERVER_CERTIFICATE_REFUSED,
    "TLSV1_ALERT_DECRYPT_ERROR": HandshakeFailure.SERVER_CERTIFICATE_REFUSED,
    "UNSUPPORTED_PROTOCOL": HandshakeFailure.NO_COMMON_PROTOCOL,
    "NO_SHARED_CIPHER": HandshakeFailure.NO_COMMON_PROTOCOL,
    "TLSV1_ALERT_PROTOCOL_VERSION": HandshakeFailure.NO_COMMON_PROTOCOL,
    "VERSION_TOO_LOW": HandshakeFailure.NO_COMMON_PROTOCOL,
    "UNEXPECTED_EOF_WHILE_READING": HandshakeFailure.CLOSED,
}
