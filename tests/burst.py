"""Shared by the crash and shutdown tests: a burst of pynetdicom associations, and a
check that the storage folder and the index agree with each other and with what was
acknowledged."""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dsutils import encode

from bench import audit
from bench.audit import COUNTER_CHECKS, Row
from engine import digest, status
from tests.helpers import Engine, ct_dataset

# Seconds a sender's association waits for the engine before it gives up (bounds every send).
SCU_TIMEOUT = 15.0
POLL = 0.005


def burst_datasets(senders: int, per_sender: int, size: int) -> list[list[Dataset]]:
    """One study, one series per sender."""
    study_uid = generate_uid()
    burst = []
    for s in range(senders):
        series_uid = generate_uid()
        batch = [ct_dataset(study_uid, series_uid, i, size=size, seed=s) for i in range(per_sender)]
        for ds in batch:
            ds.SeriesNumber = s + 1
        burst.append(batch)
    return burst


def received_digest(ds: Dataset) -> str:
    """The digest the engine computes of the dataset as sent on the wire."""
    data = encode(ds, is_implicit_vr=False, is_little_endian=True)
    assert data is not None
    return digest.of(data)


@dataclass
class Burst:
    """Several associations sending at once, one thread each; every answer recorded.

    ``answers`` maps each SOP Instance UID that got a C-STORE-RSP to its status;
    ``unanswered`` counts requests sent that got no response (association aborted);
    ``errors`` holds anything a sender raised (expected only once the engine is gone).
    """

    engine: Engine
    batches: list[list[Dataset]]
    answers: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0
    refused: int = 0
    connected: int = 0
    errors: list[BaseException] = field(default_factory=list)
    threads: list[Any] = field(default_factory=list)  # the sender processes
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def total(self) -> int:
        return sum(len(b) for b in self.batches)

    @property
    def acked(self) -> set[str]:
        with self.lock:
            return {uid for uid, code in self.answers.items() if code == status.SUCCESS}

    @property
    def datasets(self) -> dict[str, Dataset]:
        return {str(ds.SOPInstanceUID): ds for batch in self.batches for ds in batch}

    def start(self) -> Burst:
        """One process per sender, as separate scanners are (pynetdicom's client is
        least reliable with several associations in threads of one process; compare
        pynetdicom issues 842 and 850)."""
        context = multiprocessing.get_context("spawn")
        self._events = context.Queue()
        for n, batch in enumerate(self.batches):
            # Encoded here, read back there without touching values: the bytes on the
            # wire are exactly what the parent's datasets encode to (a pickled Dataset
            # may come back with values that encode differently).
            files = [_part10(ds) for ds in batch]
            process = context.Process(
                target=_sender,
                args=(self.engine.port, self.engine.ae_title, f"SCU{n}", files, self._events),
                name=f"SCU{n}",
                daemon=True,
            )
            self.threads.append(process)
            process.start()
        self._collector = threading.Thread(target=self._collect, daemon=True)
        self._collector.start()
        return self

    def _collect(self) -> None:
        """Record what the sender processes report, until they are all gone."""
        while True:
            try:
                event = self._events.get(timeout=POLL * 20)
            except queue.Empty:
                if not any(p.is_alive() for p in self.threads):
                    # Whatever a process put before it ended is readable now.
                    with contextlib.suppress(queue.Empty):
                        while True:
                            self._record(self._events.get(timeout=POLL * 20))
                    return
                continue
            self._record(event)

    def _record(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        with self.lock:
            if kind == "connected":
                self.connected += 1
            elif kind == "refused":
                self.refused += 1
            elif kind == "answer":
                self.answers[event[1]] = event[2]
            elif kind == "unanswered":
                self.unanswered += 1
            elif kind == "error":
                self.errors.append(event[1])

    def wait_for_answers(self, count: int, timeout: float) -> int:
        """Wait (bounded) until every sender is connected and ``count`` requests were
        answered; returns how many were."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                done = len(self.answers)
                ready = done >= count and self.connected == len(self.batches)
            if ready or not any(t.is_alive() for t in self.threads):
                return done
            time.sleep(POLL)
        with self.lock:
            return len(self.answers)

    def join(self, timeout: float) -> None:
        """Every sender must end within ``timeout`` seconds: no C-STORE hangs."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self.threads if t.is_alive()]
        assert not stuck, f"senders still waiting after {timeout}s: {stuck}"
        self._collector.join(max(1.0, deadline - time.monotonic()))
        assert not self._collector.is_alive(), "sender reports still being read"


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _sender(port: int, called_ae: str, calling_ae: str, files: list[bytes], events: Any) -> None:
    """One scanner, in its own process: store ``files``, report every answer."""
    datasets = [dcmread(io.BytesIO(data)) for data in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = SCU_TIMEOUT
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = None
    raw = None
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
        raw = raw_socket(assoc)
        if not assoc.is_established:
            events.put(("refused",))
            return
        events.put(("connected",))
        for ds in datasets:
            if not assoc.is_established:
                break
            rsp = assoc.send_c_store(ds)
            if "Status" not in rsp:
                # Aborted or timed out: the association is over, even when pynetdicom
                # has not flagged it yet (another send would wait the whole timeout).
                events.put(("unanswered",))
                break
            events.put(("answer", str(ds.SOPInstanceUID), int(rsp.Status)))
        if assoc.is_established:
            assoc.release()
    except Exception as exc:  # reported; the test decides what is acceptable
        events.put(("error", exc))
    finally:
        ae.shutdown()
        if assoc is not None:
            close_socket(assoc, raw)


def raw_socket(assoc: Association) -> socket.socket | None:
    """The association's TCP socket, to close at the end with ``close_socket``."""
    wrapper = assoc.dul.socket
    raw: socket.socket | None = getattr(wrapper, "socket", None)
    return raw


def close_socket(assoc: Association, raw: socket.socket | None) -> None:
    """Close what pynetdicom leaves open when the peer resets or aborts the connection.

    Its socket shutdown skips ``close()`` when ``shutdown()`` raises (ENOTCONN after a
    reset) and then forgets the socket, which leaks it (a ResourceWarning, an error
    under pytest here): ``raw`` is taken right after the association is established.
    """
    assoc.join(SCU_TIMEOUT)
    if raw is not None:
        raw.close()


def restart(engine: Engine) -> str:
    """Start a stopped engine again on the same folder; returns the new run's log so far.

    ``Engine.start`` waits for "engine ready" anywhere in its log file, which the
    previous run already wrote: the old log is moved aside first.
    """
    old = engine.log_path.read_bytes() if engine.log_path.exists() else b""
    with open(engine.log_path.with_name("engine.previous.log"), "ab") as previous:
        previous.write(old)
    engine.log_path.unlink(missing_ok=True)
    engine.start()
    return engine.log()


def index_rows(engine: Engine) -> dict[str, Row]:
    """The instances table (works while the engine runs), on either backend."""
    rows = engine.query_rows(
        "SELECT sop_instance_uid, path, size, digest, series_uid, study_uid FROM instances"
    )
    return {str(r[0]): Row(*r) for r in rows}


def query(engine: Engine, sql: str) -> list[tuple[object, ...]]:
    return engine.query_rows(sql)


def leftovers(engine: Engine) -> tuple[list[Path], list[str]]:
    """Temp files with data in them, and journaled batches not marked done.

    A running engine keeps a few empty temp files ready and its journal log open;
    those are not leftovers.
    """
    area = engine.area()
    written = sorted(p for p in area.incoming.iterdir() if p.stat().st_size)
    return written, sorted(name for name, _ in area.journals())


def consistency(engine: Engine, acked: set[str]) -> list[str]:
    """What is wrong between the index, the storage folder and ``acked``, on either
    backend: acknowledged instances without a row or file, rows without their file (or
    with another size), instance files no row names, counters that disagree with the
    rows, and temp files or journal batches left behind."""
    rows = index_rows(engine)
    files = set(audit.instance_files(engine.storage))
    problems = [f"acknowledged {uid} has no row" for uid in sorted(acked - set(rows))]
    for uid, row in sorted(rows.items()):
        path = engine.storage / row.path
        if not path.is_file():
            problems.append(f"{uid}: its file {row.path} is missing")
        elif path.stat().st_size != row.size:
            problems.append(f"{uid}: {row.path} has {path.stat().st_size} bytes, not {row.size}")
    problems += [f"orphan file {rel}" for rel in sorted(files - {r.path for r in rows.values()})]
    problems += [f"counter: {r[0]}" for sql in COUNTER_CHECKS for r in engine.query_rows(sql)]
    temps, journals = leftovers(engine)
    problems += [f"temp file {p}" for p in temps] + [f"journal batch {j}" for j in journals]
    return problems


def check_store(engine: Engine, acked: set[str], sent: dict[str, Dataset]) -> dict[str, Row]:
    """Storage folder and index agree, and every acknowledged instance is there, intact.

    The audit the crash campaign makes (``bench.audit``; on PostgreSQL, ``consistency``,
    which reads only the files of the instances sent here), over every row:
    - every acknowledged UID has a row;
    - every row's file exists, has the recorded size, parses, carries the row's UID
      (dataset and file meta) and holds the dataset bytes of the row's digest;
    - every instance file under the storage folder is referenced by a row;
    - no temp file with data or unsettled journal batch is left;
    - the series and study counters match the rows.
    And here: what this test sent is stored as sent (the dataset, and the digest of its
    bytes on the wire), and ``engine stats`` counts the rows.
    """
    if engine.postgresql:
        # bench.audit reads an SQLite index: the same checks, through either backend.
        problems = consistency(engine, acked)
        assert not problems, problems[:10]
    else:
        findings = audit.audit(engine.storage, engine.index_path, dict.fromkeys(acked))
        assert findings.ok, findings.summary()
    rows = index_rows(engine)
    for uid, original in sent.items():
        row = rows.get(uid)
        if row is not None:
            stored = dcmread(engine.storage / row.path)
            assert stored == original, f"{uid}: stored dataset differs from the one sent"
            assert row.digest == received_digest(original)
    stats = engine.stats()
    assert stats["instances"] == len(rows)
    assert stats["bytes"] == sum(r.size for r in rows.values())
    assert stats["series"] == len({r.series_uid for r in rows.values()})
    assert stats["studies"] == len({r.study_uid for r in rows.values()})
    return rows
