"""Test helpers: a real engine process on 127.0.0.1, synthetic datasets, dcmtk calls."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from engine import config as config_module
from engine.cli import serve
from engine.dicom.listener import Listener
from engine.pipeline import Pipeline
from engine.storage.area import StorageArea
from tests import postgres

REPO = Path(__file__).resolve().parent.parent
# The suite runs once per DICOM transport: ENGINE_TRANSPORT=native or pynetdicom.
TRANSPORT = os.environ.get("ENGINE_TRANSPORT", "")
# Test engines serve any caller (the tests use many AE titles); production refuses
# unknown callers by default. tests/test_access.py overrides these to test the rules.
OPEN_ACCESS: dict[str, Any] = {
    "allow_unknown_echo": True,
    "allow_unknown_store": True,
    "allow_unknown_query": True,
    "allow_unknown_retrieve": True,
}
WAIT = 30.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def write_config(folder: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(v)}" for key, v in values.items())
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Engine:
    """``python -m engine serve`` in a subprocess, on an ephemeral port of 127.0.0.1."""

    folder: Path
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    ae_title: str = "ENGINE"
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    config_path: Path | None = None
    # A command that runs the engine's command line given after it, in the same process
    # (it must ``exec``): e.g. ``unshare`` with a small filesystem (tests/test_full_disk.py).
    launcher: tuple[str, ...] = ()
    # The index: "" is SQLite in ``index.sqlite`` of the folder; a postgresql:// URL is
    # that database (tests/postgres.py gives each test a fresh one).
    index_url: str = ""
    # The node name ([index] node); the nodes of tests/test_nodes.py share one storage
    # folder, given by ``storage_path``.
    node: str = ""
    storage_path: Path | None = None

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        index: dict[str, Any] = (
            {"backend": "postgresql", "url": self.index_url}
            if self.index_url
            else {"path": "index.sqlite"}
        )
        if self.node:
            index["node"] = self.node
        sections: dict[str, dict[str, Any]] = {
            "dicom": {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}
            | OPEN_ACCESS
            | ({"transport": TRANSPORT} if TRANSPORT else {}),
            "storage": {"path": str(self.storage_path) if self.storage_path else "storage"},
            "index": index,
        }
        for section, values in self.overrides.items():
            sections.setdefault(section, {}).update(values)
        self.config_path = write_config(self.folder, sections)

    @property
    def postgresql(self) -> bool:
        return bool(self.index_url)

    @property
    def storage(self) -> Path:
        return self.storage_path or self.folder / "storage"

    @property
    def node_name(self) -> str:
        """The node name the engine runs under (in its file names and work areas): the
        configured one, else the engine's default (none on SQLite)."""
        assert self.config_path is not None
        return config_module.node_name(config_module.load(self.config_path))

    def area(self) -> StorageArea:
        """The engine's storage area as the engine sees it (paths, temp files, journals);
        for reading, never for a second writer."""
        return StorageArea(self.storage, self.quarantine, fsync=False, node=self.node_name)

    def instance_path(self, study_uid: str, sop_instance_uid: str, digest: str) -> str:
        """Where this engine writes an instance (relative to the storage folder)."""
        return StorageArea.instance_path(study_uid, sop_instance_uid, digest, self.node_name)

    @property
    def quarantine(self) -> Path:
        return self.storage / ".quarantine"

    @property
    def index_path(self) -> Path:
        """The SQLite index file (see ``query_rows`` for a read on either backend)."""
        assert not self.postgresql, "this engine's index is a PostgreSQL database"
        return self.folder / "index.sqlite"

    @property
    def log_path(self) -> Path:
        return self.folder / "engine.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> Engine:
        assert self.process is None
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    *self.launcher,
                    *(sys.executable, "-m", "engine", "serve", "--config", str(self.config_path)),
                ],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"engine exited at start:\n{self.log()}")
            if b"engine ready" in self.log_path.read_bytes()[offset:]:
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"engine did not start in {START_TIMEOUT}s:\n{self.log()}")

    def stop(self) -> int:
        """SIGTERM and wait: the graceful path."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(STOP_TIMEOUT)
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL: the crash path."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
            self.process = None

    def stats(self) -> dict[str, int]:
        out = subprocess.run(
            [sys.executable, "-m", "engine", "stats", "--config", str(self.config_path)],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=60,
        )
        result: dict[str, int] = orjson.loads(out.stdout)
        return result

    def query_rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of one statement on the index, SQLite or PostgreSQL, whichever this engine
        uses (works while it runs: SQLite is opened read-only). The SQL is SQLite's form
        (``?`` parameters), kept to what both databases understand."""
        if self.postgresql:
            return postgres.fetch(self.index_url, sql, *args)
        uri = f"file:{self.index_path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=WAIT)) as db:
            return list(db.execute(sql, args).fetchall())

    def execute(self, sql: str, *args: Any) -> None:
        """One statement on the index, committed: a test setting up a state (what a crash
        leaves, a row changed behind the engine's back)."""
        if self.postgresql:
            postgres.execute(self.index_url, sql, *args)
            return
        with contextlib.closing(sqlite3.connect(self.index_path, timeout=WAIT)) as db, db:
            db.execute(sql, args)

    def stored_files(self) -> list[Path]:
        return sorted(
            p
            for p in self.storage.rglob("*.dcm")
            if not any(part.startswith(".") for part in p.relative_to(self.storage).parts)
        )

    def quarantine_notes(self) -> list[dict[str, Any]]:
        """The JSON notes of the quarantine; ``_data`` is the path of the kept bytes."""
        notes = []
        for path in sorted(self.quarantine.rglob("*.json")):
            note = orjson.loads(path.read_bytes())
            note["_data"] = path.parent / note["file"]
            notes.append(note)
        return notes


def serve_until_exit(config_path: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``python -m engine serve`` for a start that must fail: returns with its message."""
    return subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--config", str(config_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dcmtk_env() -> dict[str, str]:
    """dcmtk leaves Nagle's algorithm on unless told: 45 ms per message otherwise."""
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(
    engine: Engine, *inputs: str, options: tuple[str, ...] = ("+sd", "+r"), check: bool = True
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu: one association sending ``inputs`` (files or folders)."""
    return subprocess.run(
        [
            "storescu",
            "-aet",
            "TESTSCU",
            "-aec",
            engine.ae_title,
            *options,
            "127.0.0.1",
            str(engine.port),
            *inputs,
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=check,
    )


def ct_dataset(
    study_uid: str,
    series_uid: str,
    number: int,
    *,
    patient_id: str = "PAT001",
    patient_name: str = "Test^Patient",
    size: int = 32,
    seed: int = 0,
) -> Dataset:
    """A small but complete CT image with non-constant pixel data."""
    rng = np.random.default_rng(seed * 100003 + number)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = "20261126"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "ACC" + study_uid[-6:]
    ds.StudyID = "1"
    ds.StudyDescription = "CT test study"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = rng.integers(-1000, 2000, (size, size), dtype=np.int16).tobytes()
    return ds


def write_study(
    folder: Path, n_series: int = 2, n_instances: int = 5, seed: int = 0, **kwargs: Any
) -> list[Dataset]:
    """A study as Part 10 files under ``folder``; returns the datasets."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    datasets = []
    for s in range(n_series):
        series_uid = generate_uid()
        for i in range(1, n_instances + 1):
            ds = ct_dataset(study_uid, series_uid, i, seed=seed + s, **kwargs)
            ds.SeriesNumber = s + 1
            ds.save_as(folder / f"s{s}_{i:04d}.dcm", enforce_file_format=True)
            datasets.append(ds)
    return datasets


def send_datasets(
    engine: Engine, datasets: list[Dataset], calling_ae: str = "PYSCU"
) -> list[tuple[str, int]]:
    """One pynetdicom association sending ``datasets``; (SOP Instance UID, status) each."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for syntax in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(syntax, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", engine.port, ae_title=engine.ae_title)
    assert assoc.is_established, "association refused"
    results: list[tuple[str, int]] = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            results.append((str(ds.SOPInstanceUID), int(rsp.Status) if "Status" in rsp else -1))
    finally:
        assoc.release()
    return results


@dataclass
class InProcess:
    pipeline: Pipeline
    listener: Listener
    port: int
    ae_title: str = "ENGINE"


@contextmanager
def engine_in_thread(folder: Path, **sections: dict[str, Any]) -> Iterator[InProcess]:
    port = free_port()
    raw: dict[str, dict[str, Any]] = {
        "dicom": {"ae_title": "ENGINE", "host": "127.0.0.1", "port": port}
        | OPEN_ACCESS
        | ({"transport": TRANSPORT} if TRANSPORT else {}),
        "storage": {"path": "storage"},
        "index": {"path": "index.sqlite"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    config = config_module.from_mapping(raw, base=folder)
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        holder["stop"] = stop
        holder["loop"] = asyncio.get_running_loop()

        def on_ready(pipeline: Pipeline, listener: Listener) -> None:
            holder["engine"] = InProcess(pipeline, listener, listener.port)
            ready.set()

        await serve(config, stop, on_ready)

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    assert ready.wait(WAIT), "engine did not start"
    try:
        yield holder["engine"]
    finally:
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(WAIT)
        assert not thread.is_alive(), "engine did not stop"
