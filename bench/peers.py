"""The receivers under test, each started fresh in an empty folder on 127.0.0.1.

- ``EnginePeer``: ``python -m engine serve`` with a config the bench writes.
- ``OrthancPeer``: Debian's Orthanc with a JSON config the bench writes (SQLite index
  and storage under the run folder, DICOM and HTTP on loopback, no plugins).

Both can also serve DICOMweb on 127.0.0.1 (``dicomweb=True``; off by default, so the
ingest runs are unchanged): the engine's own server, Orthanc's DICOMweb plugin.
- ``StorescpPeer``: dcmtk ``storescp --fork -od DIR``: files only, indexes nothing.

Fairness: dcmtk and Debian's Orthanc leave Nagle's algorithm on unless ``TCP_NODELAY=1``
is in their environment (about 20x slower); every rival and the client get it. The
engine sets TCP_NODELAY on its accepted sockets itself.

Every peer is stopped by the PID the bench started (and, for ``storescp --fork``, the
process group it leads), never by name.
"""

from __future__ import annotations

import contextlib
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


PEERS: dict[str, type[Peer]] = {
    "engine": EnginePeer,
    "engine-nosync": NoSyncEnginePeer,
    "engine-pynetdicom": PynetdicomEnginePeer,
    "orthanc": OrthancPeer,
    "storescp": StorescpPeer,
}


def available(name: str) -> str | None:
    """Why a peer cannot run here, or None when it can."""
    needs = {"orthanc": "Orthanc", "storescp": "storescp"}.get(name)
    if needs and shutil.which(needs) is None and not Path(f"/usr/sbin/{needs}").exists():
        return f"{needs} is not installed (python -m bench setup installs it)"
    return None
