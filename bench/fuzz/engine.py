"""The engine under fuzz: ``python -m engine serve`` in its own folder, with short timers.

Short ``acse_timeout`` and ``network_timeout`` make the silent inputs end in seconds, and
any caller is served; everything else is the engine's default (fsync on, 64
associations, 256 KB PDUs).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bench.fuzz.peer import Timing
from bench.peers import START_TIMEOUT, STOP_TIMEOUT, Peer, wait_for_port

READY = b"engine ready"
POLL = 0.05
DIMSE_TIMEOUT = 5.0  # a C-GET's sub-operation waiting for an answer we never send
UID_BATCH = 500  # SQLite's parameter limit is far above; keeps each statement short


@dataclass
class FuzzedEngine(Peer):
    name: str = "engine"
    ae_title: str = "ENGINE"
    transport: str = "native"
    timing: Timing = field(default_factory=lambda: Timing(acse_timeout=1.0, network_timeout=2.0))

    @property
    def config_path(self) -> Path:
        return self.folder / "config.toml"

    def start(self) -> None:
        self.config_path.write_text(
            "[dicom]\n"
            f'ae_title = "{self.ae_title}"\nhost = "127.0.0.1"\nport = {self.port}\n'
            f'transport = "{self.transport}"\n'
            f"acse_timeout = {self.timing.acse_timeout}\n"
            f"network_timeout = {self.timing.network_timeout}\n"
            f"dimse_timeout = {DIMSE_TIMEOUT}\n"
            # Any caller may do anything: the fuzzer explores the protocol, not the rules
            # of access control (tests/test_access.py has those).
            "allow_unknown_echo = true\nallow_unknown_store = true\n"
            "allow_unknown_query = true\nallow_unknown_retrieve = true\n"
            '[storage]\npath = "storage"\n'
            '[index]\npath = "index.sqlite"\n'
        )
        self._spawn(
            [sys.executable, "-m", "engine", "serve", "--config", str(self.config_path.resolve())]
        )
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while READY not in self.log_path.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the engine did not start; see {self.log_path}")
            time.sleep(POLL)
        wait_for_port(self.port, self.process, START_TIMEOUT)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop_cleanly(self) -> int | None:
        """SIGTERM, then the exit code; None if it had to be killed after ``STOP_TIMEOUT``."""
        if self.process is None:
            return None
        process = self.process
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        try:
            code: int | None = process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)
            code = None
        self.process = None
        return code

    def _index(self) -> contextlib.closing[sqlite3.Connection]:
        uri = f"file:{self.folder / 'index.sqlite'}?mode=ro"
        return contextlib.closing(sqlite3.connect(uri, uri=True, timeout=60))

    def stored(self, uids: Iterable[str]) -> dict[str, Path]:
        """The files the index holds for these SOP Instance UIDs (those it has)."""
        wanted = list(uids)
        found: dict[str, Path] = {}
        with self._index() as db:
            for start in range(0, len(wanted), UID_BATCH):
                chunk = wanted[start : start + UID_BATCH]
                marks = ",".join("?" * len(chunk))
                query = (
                    "SELECT sop_instance_uid, path FROM instances "
                    f"WHERE sop_instance_uid IN ({marks})"
                )
                rows = db.execute(query, chunk)
                for uid, path in rows:
                    found[uid] = self.folder / "storage" / path
        return found

    def counts(self) -> dict[str, int]:
        with self._index() as db:
            (instances,) = db.execute("SELECT COUNT(*) FROM instances").fetchone()
            (quarantined,) = db.execute("SELECT COUNT(*) FROM quarantine").fetchone()
        return {"instances": int(instances), "quarantined": int(quarantined)}
