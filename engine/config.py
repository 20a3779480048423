"""The engine's configuration: frozen dataclasses loaded once from a TOML file.

Defaults live here and nowhere else. A config file only needs ``[dicom]``,
``[storage]`` and ``[index]``; every other key falls back to the default below.
An unknown key or a value of the wrong type stops the engine at start with a
message naming the key (``ConfigError``). Relative paths are resolved against
the folder that holds the config file, so the repository's ``config.toml``
runs as is from any working directory.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

# PS3.8: an AE title is 1 to 16 characters of the default repertoire, no backslash.
AE_TITLE_MAX = 16


class TransportKind(StrEnum):
    """Which DICOM upper layer receives associations."""

    NATIVE = "native"  # asyncio-native (engine/dicom/association.py)
    PYNETDICOM = "pynetdicom"  # pynetdicom's threaded server, bridged into the loop


class DuplicatePolicy(StrEnum):
    """What to do when a SOP Instance UID arrives again with different content."""

    KEEP = "keep"  # keep the first copy, answer success
    OVERWRITE = "overwrite"  # replace the stored copy with the new one
    REJECT = "reject"  # answer "Duplicate SOP Instance" (0x0111), keep the first copy


class SyncMethod(StrEnum):
    """How ``[storage] fsync`` makes a batch durable."""

    SYNCFS = "syncfs"  # one syncfs(2) of the storage filesystem per batch (Linux)
    FSYNC = "fsync"  # fsync of every file, the journal and each changed directory


class Transcode(StrEnum):
    """What the write stage stores for compressed (JPEG-family, RLE) images."""

    NONE = "none"  # keep the transfer syntax the scanner sent
    EXPLICIT_LITTLE = "explicit-little"  # decompress to Explicit VR Little Endian


class TlsVersion(StrEnum):
    """The oldest TLS version the engine accepts (PS3.15 B.9, BCP 195: 1.2 or newer)."""

    TLS_1_2 = "1.2"
    TLS_1_3 = "1.3"


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """A known DICOM node: who it is, where it listens (C-MOVE and forwarding
    destination), and what it may ask of us (README, "Access control")."""

    ae_title: str
    # Its address (an IP address or a host name, resolved at start): where C-MOVE and
    # forwarding send to, and, with [dicom] check_calling_host, where it must call from.
    host: str
    port: int
    # C-STORE to us.
    store: bool = True
    # C-FIND.
    query: bool = True
    # C-MOVE and C-GET.
    retrieve: bool = True


@dataclass(frozen=True, slots=True)
class DicomConfig:
    ae_title: str = "ENGINE"
    transport: TransportKind = TransportKind.NATIVE
    host: str = "0.0.0.0"
    port: int = 11112
    # Refuse associations whose called AE title is not ours.
    require_called_ae_title: bool = False
    # A declared peer must call from its host's address; from another address it is
    # served as an unknown caller (like Orthanc's DicomCheckModalityHost).
    check_calling_host: bool = True
    # What callers that are not a declared peer may do (Orthanc's DicomAlwaysAllow*).
    # With all four false they are refused at association ("calling AE not recognized").
    allow_unknown_echo: bool = False
    allow_unknown_store: bool = False
    allow_unknown_query: bool = False
    allow_unknown_retrieve: bool = False
    maximum_associations: int = 64
    maximum_pdu_size: int = 262144
    # Seconds a peer may stay silent on an open association before it is aborted.
    network_timeout: float = 60.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    # Seconds granted to open associations at shutdown before they are aborted.
    shutdown_grace: float = 5.0
    # Bytes of one association's incoming dataset held in memory while the disk catches
    # up (native transport, which writes datasets to disk as they arrive); past this,
    # the engine stops reading from that peer until the writes are done.
    receive_buffer: int = 8 * 1024 * 1024
    # Known nodes, as [[dicom.peers]] tables: ae_title, host, port, store, query, retrieve.
    peers: tuple[PeerConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class StorageConfig:
    path: Path = Path("storage")
    # Where rejected input goes, with a JSON note each; default <path>/.quarantine.
    quarantine_path: Path | None = None
    fsync: bool = True
    sync_method: SyncMethod = SyncMethod.SYNCFS
    # Threads writing incoming datasets to temp files as they arrive (native transport)
    # and renaming them into place; 0: the event loop writes them itself (local disks).
    write_threads: int = 0

    @property
    def quarantine(self) -> Path:
        if self.quarantine_path is not None:
            return self.quarantine_path
        return self.path / ".quarantine"


class IndexBackend(StrEnum):
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


@dataclass(frozen=True, slots=True)
class IndexConfig:
    # "sqlite": an embedded file (``path``); "postgresql": a server (``url``) that several
    # engine nodes may share with one storage folder.
    backend: IndexBackend = IndexBackend.SQLITE
    path: Path = Path("index.sqlite")
    # postgresql://user@host:port/database; the password comes from the environment
    # variable named by ``password_env`` (or libpq's PGPASSWORD), never from this file.
    url: str = ""
    password_env: str = "ENGINE_INDEX_PASSWORD"
    # Connections for reads (look-ups, queries, stats); the writer has its own.
    pool_size: int = 4
    # This engine's name among the nodes sharing one index and storage folder: in the
    # names of its files and of its temp, journal and lock entries. Empty: the host
    # name and DICOM port with the postgresql backend, no name (a single node) with
    # sqlite.
    node: str = ""

    @property
    def shared(self) -> bool:
        return self.backend is IndexBackend.POSTGRESQL


@dataclass(frozen=True, slots=True)
class IngestConfig:
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP
    check_pixels: bool = False
    transcode: Transcode = Transcode.NONE
    # Seconds a C-STORE may wait for the pipeline before it is answered 0xA700.
    store_timeout: float = 120.0
    # Processes that decode pixel data (check_pixels, transcode); 0 = one per core.
    decode_workers: int = 0
    # Seconds one image may take to decode before it is refused and the pool replaced.
    decode_timeout: float = 60.0
    # Seconds without a new instance after which a study is stable (Orthanc's StableAge):
    # stable studies are what [[forward]] rules send.
    stable_age: float = 60.0


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    # Capacity of each bounded queue between two stages.
    queue_size: int = 256
    # Most items one stage takes from its queue at a time (one batch).
    batch_max: int = 64


@dataclass(frozen=True, slots=True)
class QueryConfig:
    # Most matches one C-FIND answers; past it the query ends with "out of resources"
    # and a comment asking for a narrower query.
    max_matches: int = 1000
    # Person names match case-insensitively (single value and wildcards).
    case_insensitive_names: bool = False


@dataclass(frozen=True, slots=True)
class DicomWebConfig:
    """The DICOMweb server (QIDO-RS, WADO-RS, STOW-RS); it runs only when the config file
    has a ``[dicomweb]`` section."""

    host: str = "0.0.0.0"
    port: int = 8080
    # Path prefix of every DICOMweb resource (the "service root" a viewer is given).
    base_path: str = "/dicom-web"
    # Origins whose web pages may call the server (CORS): ["*"] for any, [] for none
    # (a viewer served from the same origin needs none).
    cors_origins: tuple[str, ...] = ()
    # Authentication: with a bearer_token, requests must carry "Authorization: Bearer
    # <token>"; with a username and password, HTTP basic authentication. Both empty: open.
    bearer_token: str = ""
    username: str = ""
    password: str = ""
    # Largest STOW-RS request body accepted, in bytes (larger: 413).
    max_request_size: int = 4 * 1024 * 1024 * 1024
    # Matches a QIDO-RS search answers when the request gives no limit (and at most).
    max_results: int = 1000
    # HTTPS with the certificate and key of the [tls] section (which must be present).
    tls: bool = False


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """DICOM over TLS (PS3.15 B.9, the BCP 195 secure transport connection profile) on a
    port of its own beside the plain one, with the same services; and the certificate of
    DICOMweb over HTTPS (``[dicomweb] tls``). Only when the config file has ``[tls]``."""

    # The DICOM TLS port (same host and AE title as [dicom]); 2762 is DICOM's registered one.
    port: int = 2762
    # PEM file of the engine's certificate, followed by any intermediate certificates.
    # Required.
    certificate: Path | None = None
    # PEM file of its private key (not encrypted); None: the key is in the certificate file.
    private_key: Path | None = None
    # PEM file of the certificate authorities that sign client certificates (verify_client).
    ca_certificates: Path | None = None
    # Require of every DICOM TLS client a certificate signed by one of ca_certificates.
    verify_client: bool = False
    # The oldest TLS version accepted.
    minimum_version: TlsVersion = TlsVersion.TLS_1_2


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus metrics at ``/metrics`` on a listener of their own, when the config file
    has a ``[metrics]`` section; without it they are served by the DICOMweb server (if any)."""

    host: str = "0.0.0.0"
    port: int = 9464


@dataclass(frozen=True, slots=True)
class ForwardRule:
    """A ``[[forward]]`` table: send each study that becomes stable and matches every
    filter given to ``destination``. A filter is a pattern (``*`` and ``?`` wildcards,
    case-insensitive); an empty one matches anything."""

    destination: str = ""  # an ae_title of [[dicom.peers]]; required
    # One of the study's modalities (ModalitiesInStudy).
    modality: str = ""
    # The AE title that sent the study (one of them, if several did).
    calling_ae: str = ""
    study_description: str = ""


@dataclass(frozen=True, slots=True)
class ForwardingConfig:
    """How queued forwards are sent and retried (engine/forwarding.py)."""

    # Seconds before the first retry of a failed forward; each retry waits twice as long.
    retry_initial: float = 30.0
    # The longest wait between two attempts, in seconds.
    retry_max: float = 3600.0
    # Attempts after which a forward is given up ('failed', logged as an ERROR).
    max_attempts: int = 20
    # Seconds the C-STORE SCU waits to connect, to negotiate, and for each response.
    timeout: float = 30.0
    # Forwards sent at once (one association each).
    associations: int = 2


@dataclass(frozen=True, slots=True)
class BackupConfig:
    """Backups made by the running engine (engine/backup/schedule.py); off by default.
    ``python -m engine backup`` makes one at any time, whatever this says."""

    # The backup folder (a backup disk or NAS mount); it must exist. Also the default
    # of ``python -m engine backup`` without --to.
    destination: Path | None = None
    # Seconds between two scheduled backups; 0 = no scheduled backups.
    interval: float = 0.0
    # A WARNING is logged when the last good backup is older than this (seconds);
    # 0 = twice the interval.
    warn_after: float = 0.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "INFO"


@dataclass(frozen=True, slots=True)
class Config:
    dicom: DicomConfig = field(default_factory=DicomConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    # None: no [dicomweb] section, no HTTP listener.
    dicomweb: DicomWebConfig | None = None
    # None: no [metrics] section; metrics at /metrics on the DICOMweb server, if there is one.
    metrics: MetricsConfig | None = None
    # None: no [tls] section, no DICOM TLS port, no HTTPS.
    tls: TlsConfig | None = None
    forwarding: ForwardingConfig = field(default_factory=ForwardingConfig)
    # The [[forward]] rules: which stable studies go to which peer.
    forward: tuple[ForwardRule, ...] = ()
    backup: BackupConfig = field(default_factory=BackupConfig)
    log: LogConfig = field(default_factory=LogConfig)


REQUIRED_SECTIONS = ("dicom", "storage", "index")


def load(path: Path) -> Config:
    """Read and check a config file; relative paths are taken from its folder."""
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return from_mapping(raw, base=path.resolve().parent)


def from_mapping(raw: dict[str, Any], base: Path) -> Config:
    """Build a Config from parsed TOML, checking every key and type."""
    for name in REQUIRED_SECTIONS:
        if name not in raw:
            raise ConfigError(f"missing section [{name}]")
    config: Config = _build(Config, raw, "", base)
    _check(config)
    return config


def _build(cls: type[Any], raw: Any, where: str, base: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{where}] must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key '{key}'")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        values[name] = _convert(hints[name], value, key, base)
    return cls(**values)


def _convert(hint: Any, value: Any, key: str, base: Path) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type[Any], hint), value, key, base)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, list):
            if dataclasses.is_dataclass(args[0]):
                raise ConfigError(f"'{key}' must be a list of tables ([[{key}]])")
            raise ConfigError(f"'{key}' must be a list, not {value!r}")
        return tuple(_convert(args[0], item, f"{key}[{n}]", base) for n, item in enumerate(value))
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key, base)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"'{key}' must be a non-empty path string, not {value!r}")
        return (base / os.path.expanduser(value)).resolve()
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        choices = ", ".join(f'"{m.value}"' for m in hint)
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be one of {choices}, not {value!r}")
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"'{key}' must be one of {choices}, not {value!r}") from None
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, not {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer, not {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"'{key}' must be a number, not {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string, not {value!r}")
        return value
    raise ConfigError(f"'{key}': unsupported setting type {hint!r}")  # pragma: no cover


def _check(config: Config) -> None:
    """Range checks that types alone cannot express."""
    ae = config.dicom.ae_title
    if not 0 < len(ae.strip()) <= AE_TITLE_MAX or "\\" in ae or not ae.isascii():
        raise ConfigError(f"'dicom.ae_title' must be 1-16 ASCII characters, not {ae!r}")
    if not 0 < config.dicom.port < 65536:
        raise ConfigError(f"'dicom.port' must be between 1 and 65535, not {config.dicom.port}")
    positive = {
        "dicom.maximum_associations": config.dicom.maximum_associations,
        "dicom.network_timeout": config.dicom.network_timeout,
        "dicom.acse_timeout": config.dicom.acse_timeout,
        "dicom.dimse_timeout": config.dicom.dimse_timeout,
        "ingest.store_timeout": config.ingest.store_timeout,
        "ingest.decode_timeout": config.ingest.decode_timeout,
        "pipeline.queue_size": config.pipeline.queue_size,
        "pipeline.batch_max": config.pipeline.batch_max,
        "dicom.receive_buffer": config.dicom.receive_buffer,
        "query.max_matches": config.query.max_matches,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"'{key}' must be greater than 0, not {value}")
    if config.dicom.maximum_pdu_size < 0:
        raise ConfigError("'dicom.maximum_pdu_size' must be 0 (unlimited) or more")
    if config.storage.write_threads < 0:
        raise ConfigError("'storage.write_threads' must be 0 (the event loop writes) or more")
    if config.ingest.decode_workers < 0:
        raise ConfigError("'ingest.decode_workers' must be 0 (one per core) or more")
    seen: set[str] = set()
    for n, peer in enumerate(config.dicom.peers):
        where = f"dicom.peers[{n}]"
        if not 0 < len(peer.ae_title.strip()) <= AE_TITLE_MAX or not peer.ae_title.isascii():
            raise ConfigError(f"'{where}.ae_title' must be 1-16 ASCII characters")
        if peer.ae_title.strip() in seen:
            raise ConfigError(f"'{where}.ae_title' {peer.ae_title!r} is declared twice")
        seen.add(peer.ae_title.strip())
        if not 0 < peer.port < 65536:
            raise ConfigError(f"'{where}.port' must be between 1 and 65535, not {peer.port}")
        if not peer.host:
            raise ConfigError(f"'{where}.host' must not be empty")
        if "/" in peer.host or "*" in peer.host:
            raise ConfigError(
                f"'{where}.host' must be one address or host name, not {peer.host!r}"
                " (set dicom.check_calling_host = false to accept a peer from anywhere)"
            )
    web = config.dicomweb
    if web is not None:
        if not 0 <= web.port < 65536:
            raise ConfigError(f"'dicomweb.port' must be between 0 and 65535, not {web.port}")
        if web.base_path and (not web.base_path.startswith("/") or web.base_path.endswith("/")):
            raise ConfigError(
                "'dicomweb.base_path' must be empty or start with / and not end with one,"
                f" not {web.base_path!r}"
            )
        if bool(web.username) != bool(web.password):
            raise ConfigError("'dicomweb.username' and 'dicomweb.password' go together")
        if web.bearer_token and web.username:
            raise ConfigError("choose one of 'dicomweb.bearer_token' and 'dicomweb.username'")
        for key, value in (
            ("dicomweb.max_request_size", web.max_request_size),
            ("dicomweb.max_results", web.max_results),
        ):
            if value <= 0:
                raise ConfigError(f"'{key}' must be greater than 0, not {value}")
    if config.metrics is not None and not 0 <= config.metrics.port < 65536:
        raise ConfigError(f"'metrics.port' must be between 0 and 65535, not {config.metrics.port}")
    backup = config.backup
    if backup.interval < 0 or backup.warn_after < 0:
        raise ConfigError("'backup.interval' and 'backup.warn_after' must be 0 or more")
    if backup.interval > 0 and backup.destination is None:
        raise ConfigError("'backup.destination' must be set when 'backup.interval' is not 0")
    if config.log.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(
            f"'log.level' must be DEBUG, INFO, WARNING or ERROR, not {config.log.level!r}"
        )
    _check_forwarding(config)
    _check_tls(config)
    _check_index(config)


# A node name: a letter, then letters, digits, "-" or "_" (it goes into file names).
_NODE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")


def _check_index(config: Config) -> None:
    index = config.index
    if index.pool_size <= 0:
        raise ConfigError(f"'index.pool_size' must be greater than 0, not {index.pool_size}")
    if index.node and not _NODE_NAME.match(index.node):
        raise ConfigError(
            f"'index.node' must be a letter then up to 62 letters, digits, - or _,"
            f" not {index.node!r}"
        )
    if index.backend is IndexBackend.POSTGRESQL:
        if not index.url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(
                "'index.url' must be a postgresql://user@host:port/database URL with"
                f" backend = \"postgresql\", not {index.url!r}"
            )
        if _url_password(index.url):
            raise ConfigError(
                f"'index.url' must not hold a password: put it in the environment variable"
                f" {index.password_env} (index.password_env)"
            )
        if config.backup.interval > 0:
            raise ConfigError(
                "'backup.interval': scheduled backups copy an SQLite index; with backend ="
                " \"postgresql\" back up the database with PostgreSQL's tools (pg_dump,"
                " base backups) and the storage folder with yours"
            )
    elif index.url:
        raise ConfigError("'index.url' is for backend = \"postgresql\"; sqlite uses 'index.path'")


def _url_password(url: str) -> str | None:
    return urllib.parse.urlsplit(url).password


def require_sqlite(config: Config, command: str) -> None:
    """Refuse a command that works on an SQLite index file only."""
    if config.index.shared:
        raise ConfigError(
            f"'{command}' works on an SQLite index; with backend = \"postgresql\" use"
            " PostgreSQL's own tools for the database (pg_dump, base backups)"
        )


def node_name(config: Config) -> str:
    """This engine's node name ("" for a lone SQLite engine without one)."""
    if config.index.node or not config.index.shared:
        return config.index.node
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0]) or "node"
    if not host[0].isalpha():
        host = f"n{host}"
    return f"{host[:50]}-{config.dicom.port}"


def _check_forwarding(config: Config) -> None:
    """Stable studies, [forwarding] and the [[forward]] rules."""
    forwarding = config.forwarding
    positive = {
        "ingest.stable_age": config.ingest.stable_age,
        "forwarding.retry_initial": forwarding.retry_initial,
        "forwarding.max_attempts": forwarding.max_attempts,
        "forwarding.timeout": forwarding.timeout,
        "forwarding.associations": forwarding.associations,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"'{key}' must be greater than 0, not {value}")
    if forwarding.retry_max < forwarding.retry_initial:
        raise ConfigError(
            f"'forwarding.retry_max' ({forwarding.retry_max}) must not be less than"
            f" 'forwarding.retry_initial' ({forwarding.retry_initial})"
        )
    peers = {peer.ae_title.strip() for peer in config.dicom.peers}
    for n, rule in enumerate(config.forward):
        if not rule.destination.strip():
            raise ConfigError(
                f"'forward[{n}].destination' is required: a [[dicom.peers]] ae_title"
            )
        if rule.destination.strip() not in peers:
            raise ConfigError(
                f"'forward[{n}].destination' {rule.destination!r} is not the ae_title of"
                " a [[dicom.peers]] entry"
            )


def _check_tls(config: Config) -> None:
    """[tls] and [dicomweb] tls; the files themselves are read at start (engine/certificates.py)."""
    tls = config.tls
    if config.dicomweb is not None and config.dicomweb.tls and tls is None:
        raise ConfigError("'dicomweb.tls' needs a [tls] section with the certificate to use")
    if tls is None:
        return
    if tls.certificate is None:
        raise ConfigError("'tls.certificate' is required: the PEM file of the engine's certificate")
    if not 0 < tls.port < 65536:
        raise ConfigError(f"'tls.port' must be between 1 and 65535, not {tls.port}")
    if tls.port == config.dicom.port:
        raise ConfigError(f"'tls.port' must differ from 'dicom.port' ({tls.port})")
    if tls.verify_client and tls.ca_certificates is None:
        raise ConfigError(
            "'tls.verify_client' needs 'tls.ca_certificates': the PEM file of the"
            " certificate authorities that sign client certificates"
        )


def describe(config: Config) -> dict[str, Any]:
    """The effective configuration as plain values, for the start-up log line."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path | StrEnum):
            return str(value)
        return value

    result: dict[str, Any] = plain(config)
    return result
