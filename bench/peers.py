"""The receivers under test, each started fresh in an empty folder on 127.0.0.1.

- ``EnginePeer``: ``python -m engine serve`` with a config the bench writes.
- ``OrthancPeer``: Debian's Orthanc with a JSON config the bench writes (SQLite index
  and storage under the run folder, DICOM and HTTP on loopback, no plugins).

Both can also serve DICOMweb on 127.0.0.1 (``dicomweb=True``; off by default, so the
ingest runs are unchanged): the engine's own server, Orthanc's DICOMweb plugin.
- ``StorescpPeer``: dcmtk ``storescp --fork -od DIR``: files only, indexes nothing.
- ``PostgresEnginePeer`` (``engine-pg``): the engine with ``[index] backend = "postgresql"``
  on a throwaway cluster (bench/postgres.py) the peer starts and stops, a fresh database
  per run. ``engine-pg2``: two engine nodes ("a" and "b", each its own DICOM port) sharing
  that database and one storage folder; the replay spreads the associations over both
  ports (``Peer.ports``). PostgreSQL is part of the system under test: its processes are
  in the sampled memory and CPU (``Peer.pids``), as Orthanc's SQLite is in Orthanc's.

Fairness: dcmtk and Debian's Orthanc leave Nagle's algorithm on unless ``TCP_NODELAY=1``
is in their environment (about 20x slower); every rival and the client get it. The
engine sets TCP_NODELAY on its accepted sockets itself.

Every peer is stopped by the PID the bench started (and, for ``storescp --fork``, the
process group it leads), never by name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import orjson

from bench import postgres

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0
STOP_TIMEOUT = 120.0
POLL = 0.05
ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
# Path of the DICOMweb service root on both peers (the engine's default base_path).
DICOMWEB_PATH = "/dicom-web"


def nodelay_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"peer exited at start with code {process.returncode}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(POLL)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


@dataclass
class Peer:
    """One receiver process (tree) in its own folder."""

    folder: Path
    name: str = "peer"
    ae_title: str = "PEER"
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.folder / f"{self.name}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def pids(self) -> list[int]:
        """The roots of the process trees whose memory and CPU the run samples."""
        return [self.pid]

    @property
    def ports(self) -> list[int]:
        """The DICOM ports to send to; association ``i`` goes to ``ports[i % len(ports)]``."""
        return [self.port]

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                argv,
                cwd=self.folder,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def start(self) -> None:
        raise NotImplementedError

    def count_instances(self) -> int:
        """The peer's own count of what it holds, cheap enough to poll."""
        raise NotImplementedError

    def verify_count(self) -> int:
        """The count the run is verified against (the peer's official answer)."""
        return self.count_instances()

    def details(self) -> dict[str, Any]:
        """Peer-specific figures read after the run (the engine's latency)."""
        return {}

    @property
    def dicomweb_root(self) -> str:
        """The DICOMweb service root, for a peer started with DICOMweb on."""
        raise NotImplementedError(f"{self.name} serves no DICOMweb")

    def stop(self) -> None:
        """SIGTERM the process group this peer leads, then wait; SIGKILL if it hangs."""
        if self.process is None:
            return
        with _suppress_missing():
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("%s did not stop in %.0f s; killing it", self.name, STOP_TIMEOUT)
            with _suppress_missing():
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT)
        self.process = None


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: object, tb: object) -> bool:
        return isinstance(exc, ProcessLookupError)


@dataclass
class EnginePeer(Peer):
    """The engine as configured by default: native transport, fsync on (``--fsync``)."""

    name: str = "engine"
    ae_title: str = "ENGINE"
    fsync: bool = True
    transport: str = "native"
    # A [dicomweb] section on 127.0.0.1:http_port (a free port chosen at start).
    dicomweb: bool = False
    http_port: int = 0
    # Whether ``bench run --fsync`` sets ``fsync`` (not for the variants that fix it).
    fsync_from_args: ClassVar[bool] = True

    def start(self) -> None:
        config = self.folder / "config.toml"
        text = (
            "[dicom]\n"
            f'ae_title = "{self.ae_title}"\nhost = "127.0.0.1"\nport = {self.port}\n'
            f'transport = "{self.transport}"\n'
            # Any caller, like the rivals' configs (Orthanc's DicomAlwaysAllow*).
            "allow_unknown_echo = true\nallow_unknown_store = true\n"
            "allow_unknown_query = true\nallow_unknown_retrieve = true\n"
            '[storage]\npath = "storage"\n'
            f"fsync = {'true' if self.fsync else 'false'}\n"
            '[index]\npath = "index.sqlite"\n'
        )
        if self.dicomweb:
            self.http_port = free_port()
            text += f'[dicomweb]\nhost = "127.0.0.1"\nport = {self.http_port}\n'
        config.write_text(text)
        self._spawn([sys.executable, "-m", "engine", "serve", "--config", str(config.resolve())])
        assert self.process is not None
        wait_for_port(self.port, self.process, START_TIMEOUT)
        if self.dicomweb:
            wait_for_port(self.http_port, self.process, START_TIMEOUT)

    @property
    def dicomweb_root(self) -> str:
        if not self.dicomweb:
            raise NotImplementedError("the engine was started without [dicomweb]")
        return f"http://127.0.0.1:{self.http_port}{DICOMWEB_PATH}"

    def count_instances(self) -> int:
        uri = f"file:{self.folder / 'index.sqlite'}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=60)) as db:
            (count,) = db.execute("SELECT COUNT(*) FROM instances").fetchone()
        return int(count)

    def verify_count(self) -> int:
        """``python -m engine stats``, as an administrator would ask."""
        out = subprocess.run(
            [sys.executable, "-m", "engine", "stats", "--config", str(self.folder / "config.toml")],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=60,
        )
        return int(orjson.loads(out.stdout)["instances"])

    def details(self) -> dict[str, Any]:
        """The engine logs its answered count and latency percentiles when it stops."""
        marker = "ingest summary: "
        for line in reversed(self.log_path.read_text(errors="replace").splitlines()):
            if marker in line:
                summary: dict[str, Any] = json.loads(line.split(marker, 1)[1])
                return summary
        return {}


@dataclass
class OrthancPeer(Peer):
    name: str = "orthanc"
    ae_title: str = "ORTHANC"
    http_port: int = 0
    # Load Debian's DICOMweb plugin (its defaults otherwise: StudiesMetadata "Full").
    dicomweb: bool = False

    def start(self) -> None:
        self.http_port = free_port()
        config: dict[str, Any] = {
            "Name": "BENCH",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "StorageCompression": False,
            "Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)] if self.dicomweb else [],
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckCalledAet": False,
        }
        if self.dicomweb:
            config["DicomWeb"] = {"Enable": True, "Root": DICOMWEB_PATH + "/"}
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        self._spawn([binary, str(path)], env=nodelay_env())
        assert self.process is not None
        wait_for_port(self.http_port, self.process, START_TIMEOUT)
        wait_for_port(self.port, self.process, START_TIMEOUT)

    def count_instances(self) -> int:
        url = f"http://127.0.0.1:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=60) as response:
            return int(json.load(response)["CountInstances"])

    @property
    def dicomweb_root(self) -> str:
        if not self.dicomweb:
            raise NotImplementedError("Orthanc was started without its DICOMweb plugin")
        return f"http://127.0.0.1:{self.http_port}{DICOMWEB_PATH}"


@dataclass
class StorescpPeer(Peer):
    name: str = "storescp"
    ae_title: str = "STORESCP"

    def start(self) -> None:
        out = self.folder / "files"
        out.mkdir(exist_ok=True)
        self._spawn(
            ["storescp", "-aet", self.ae_title, "-od", str(out), "+xa", "--fork", str(self.port)],
            env=nodelay_env(),
        )
        assert self.process is not None
        wait_for_port(self.port, self.process, START_TIMEOUT)

    def count_instances(self) -> int:
        return sum(1 for p in (self.folder / "files").iterdir() if p.is_file())


@dataclass
class NoSyncEnginePeer(EnginePeer):
    """The engine with ``[storage] fsync = false``: dcmtk storescp's durability."""

    name: str = "engine-nosync"
    fsync: bool = False
    fsync_from_args: ClassVar[bool] = False


@dataclass
class PynetdicomEnginePeer(EnginePeer):
    """The engine on pynetdicom's threaded DICOM server (``transport = "pynetdicom"``)."""

    name: str = "engine-pynetdicom"
    transport: str = "pynetdicom"


@dataclass
class PostgresEnginePeer(EnginePeer):
    """The engine on a PostgreSQL index; one node per name in ``nodes``, one storage folder.

    Folder layout: ``pg/`` (the cluster), ``storage/`` (shared by the nodes),
    ``node-<name>/config.toml`` and ``engine-<name>.log`` per node. ``process`` is node
    "a"; ``port`` is node "a"'s port.
    """

    name: str = "engine-pg"
    ae_title: str = "ENGINE"
    nodes: tuple[str, ...] = ("a",)
    database: str = "bench"
    cluster: postgres.Cluster | None = field(default=None, init=False)
    node_ports: dict[str, int] = field(default_factory=dict, init=False)
    node_processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)

    def start(self) -> None:
        if self.dicomweb:
            raise NotImplementedError("the bench serves DICOMweb from the SQLite engine only")
        self.cluster = postgres.Cluster(self.folder / "pg", fsync=self.fsync)
        try:
            self.cluster.start()
            url = self.cluster.create_database(self.database)
            # initdb does not sync (--no-sync): its files must not reach the disk in the
            # timed run (the engine's syncfs would flush them).
            os.sync()
            for n, node in enumerate(self.nodes):
                self.node_ports[node] = self.port if n == 0 else free_port()
                self._start_node(node, url)
            for node, process in self.node_processes.items():
                try:
                    wait_for_port(self.node_ports[node], process, START_TIMEOUT)
                except RuntimeError as exc:
                    raise RuntimeError(
                        f"engine node {node}: {exc}; {self._log_tail(node)}"
                    ) from None
        except BaseException:
            self.stop()
            raise
        self.process = self.node_processes[self.nodes[0]]

    def _start_node(self, node: str, url: str) -> None:
        folder = self.folder / f"node-{node}"
        folder.mkdir(exist_ok=True)
        config = folder / "config.toml"
        config.write_text(
            "[dicom]\n"
            f'ae_title = "{self.ae_title}"\nhost = "127.0.0.1"\nport = {self.node_ports[node]}\n'
            f'transport = "{self.transport}"\n'
            "allow_unknown_echo = true\nallow_unknown_store = true\n"
            "allow_unknown_query = true\nallow_unknown_retrieve = true\n"
            f"[storage]\npath = {json.dumps(str(self.storage))}\n"
            f"fsync = {'true' if self.fsync else 'false'}\n"
            f'[index]\nbackend = "postgresql"\nurl = "{url}"\nnode = "{node}"\n'
        )
        with open(self.folder / f"engine-{node}.log", "ab") as out:
            self.node_processes[node] = subprocess.Popen(
                [sys.executable, "-m", "engine", "serve", "--config", str(config.resolve())],
                cwd=folder,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _log_tail(self, node: str) -> str:
        path = self.folder / f"engine-{node}.log"
        try:
            lines = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return f"no log at {path}"
        return f"{path.name} ends: " + " | ".join(lines[-3:])

    @property
    def storage(self) -> Path:
        return (self.folder / "storage").resolve()

    @property
    def pids(self) -> list[int]:
        engines = [p.pid for p in self.node_processes.values()]
        postmaster = self.cluster.pid if self.cluster is not None else None
        return engines + ([postmaster] if postmaster is not None else [])

    @property
    def ports(self) -> list[int]:
        return [self.node_ports[node] for node in self.nodes]

    def _psql(self, sql: str) -> str:
        assert self.cluster is not None
        return self.cluster.psql(sql, self.database)

    def count_instances(self) -> int:
        return int(self._psql("SELECT COUNT(*) FROM instances"))

    def verify_count(self) -> int:
        """The rows in PostgreSQL whose file is in the storage folder with the indexed size."""
        rows = self._psql("SELECT path || chr(9) || size FROM instances").splitlines()
        good = 0
        for row in rows:
            path, size = row.rsplit("\t", 1)
            try:
                if (self.storage / path).stat().st_size == int(size):
                    good += 1
            except OSError:
                pass
        if good != len(rows):
            log.error(
                "%s: %d of %d indexed files missing or of another size",
                self.name,
                len(rows) - good,
                len(rows),
            )
        return good

    def details(self) -> dict[str, Any]:
        """Each node's ingest summary; with several nodes: answers summed, and the slowest
        node's percentiles (a percentile of the union cannot be had from the parts)."""
        marker = "ingest summary: "
        summaries: list[dict[str, Any]] = []
        for node in self.nodes:
            path = self.folder / f"engine-{node}.log"
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
            for line in reversed(lines):
                if marker in line:
                    summaries.append(json.loads(line.split(marker, 1)[1]))
                    break
        if len(summaries) <= 1:
            return summaries[0] if summaries else {}
        merged: dict[str, Any] = {"answered": sum(s.get("answered", 0) for s in summaries)}
        for key in ("latency_p50_ms", "latency_p99_ms"):
            values = [s[key] for s in summaries if s.get(key) is not None]
            if values:
                merged[key] = max(values)
        merged["nodes"] = summaries
        return merged

    def stop(self) -> None:
        """SIGTERM every node (each leads its process group), wait, then stop the cluster."""
        for process in self.node_processes.values():
            with _suppress_missing():
                os.killpg(process.pid, signal.SIGTERM)
        for node, process in self.node_processes.items():
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("engine node %s did not stop in %.0f s; killing it", node, STOP_TIMEOUT)
                with _suppress_missing():
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(STOP_TIMEOUT)
        self.node_processes.clear()
        self.process = None
        if self.cluster is not None:
            self.cluster.stop()


@dataclass
class TwoNodePostgresEnginePeer(PostgresEnginePeer):
    """Two engine nodes, "a" and "b", on one PostgreSQL database and one storage folder."""

    name: str = "engine-pg2"
    nodes: tuple[str, ...] = ("a", "b")


PEERS: dict[str, type[Peer]] = {
    "engine": EnginePeer,
    "engine-nosync": NoSyncEnginePeer,
    "engine-pynetdicom": PynetdicomEnginePeer,
    "engine-pg": PostgresEnginePeer,
    "engine-pg2": TwoNodePostgresEnginePeer,
    "orthanc": OrthancPeer,
    "storescp": StorescpPeer,
}


def available(name: str) -> str | None:
    """Why a peer cannot run here, or None when it can."""
    needs = {"orthanc": "Orthanc", "storescp": "storescp"}.get(name)
    if needs and shutil.which(needs) is None and not Path(f"/usr/sbin/{needs}").exists():
        return f"{needs} is not installed (python -m bench setup installs it)"
    if name in ("engine-pg", "engine-pg2"):
        if postgres.find_bin() is None:
            return f"no PostgreSQL binaries: {postgres.INSTALL_HINT}"
        if importlib.util.find_spec("asyncpg") is None:
            return f"asyncpg is not installed for {sys.executable}"
    return None
