"""A scanner for the crash campaign: one process, one association, an acknowledgement log.

Each scanner builds its datasets (slices of the bench's synthetic CT series, see
``generate.series_slices``), waits for the campaign's go, then stores them one by one
on one pynetdicom association. As soon as a C-STORE-RSP arrives it appends a line to
its **acknowledgement log** and syncs it (``fsync``): the log says exactly what the
engine answered, whatever happens next, so the campaign knows which instances the
engine promised to keep. A request that gets no answer (the engine was killed) ends the
association and is never counted.

Log lines, space-separated:

- ``A <SOPInstanceUID> <digest> <status, 4 hex> <monotonic time> <Study UID> <Series UID>
  <slice key>``: an answer; ``<digest>`` is the content digest of the dataset bytes sent
  (``engine.digest`` of the Explicit VR Little Endian encoding pynetdicom sends), the
  slice key names the slice in the campaign's plan (``slice_key``);
- ``C <time>``: associated; ``R <time>``: association refused or not possible;
- ``U <SOPInstanceUID>``: a request sent that got no answer; ``E <message>``: an error.

Scanners are separate processes, as separate scanners are (pynetdicom's client is least
reliable with several associations in threads of one process).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode

from bench.generate import StudySpec, series_slices
from engine import digest, status

log = logging.getLogger(__name__)

ANSWER, CONNECTED, REFUSED, UNANSWERED, ERROR = "A", "C", "R", "U", "E"
# The go comes once every scanner has built its data: wait this many timeouts for it.
GO_WAIT = 4


@dataclass(frozen=True)
class Share:
    """Slices of one series of a synthetic study (``StudySpec``, study index 0)."""

    spec: StudySpec
    series: int
    slices: tuple[int, ...]


@dataclass(frozen=True)
class ScannerJob:
    """What one scanner sends, where, and where it logs (picklable: it crosses ``spawn``)."""

    calling_ae: str
    port: int
    called_ae: str
    shares: tuple[Share, ...]
    ack_log: Path
    log_file: Path
    timeout: float

    @property
    def count(self) -> int:
        return sum(len(s.slices) for s in self.shares)


def slice_key(share: Share, index: int) -> str:
    """Names one slice of the campaign: its data set's seed, its series, its index."""
    return f"{share.spec.seed}:{share.series}:{index}"


def datasets(job: ScannerJob) -> Iterator[tuple[str, Dataset]]:
    for share in job.shares:
        slices = series_slices(share.spec, 0, share.series, share.slices)
        for index, ds in zip(share.slices, slices, strict=True):
            yield slice_key(share, index), ds


def sent_digest(ds: Dataset) -> str:
    """The digest of the dataset bytes as they go on the wire (what the engine keeps)."""
    data = encode(ds, is_implicit_vr=False, is_little_endian=True)
    if data is None:
        raise ValueError(f"{ds.SOPInstanceUID} cannot be encoded")
    return digest.of(data)


class _AckLog:
    """Append-only, each line synced before the next request goes."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, *fields: object) -> None:
        line = (" ".join(str(f) for f in fields) + "\n").encode()
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def run(job: ScannerJob, ready: Any, go: Any) -> None:
    """The scanner process: build the datasets, set ``ready``, wait for ``go``, send.

    ``ready`` and ``go`` are multiprocessing events. Never raises: errors are logged.
    """
    logging.basicConfig(
        filename=job.log_file,
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    acks = _AckLog(job.ack_log)
    try:
        items = [(key, ds, sent_digest(ds)) for key, ds in datasets(job)]
        ready.set()
        if not go.wait(job.timeout * GO_WAIT):
            acks.write(ERROR, "no go from the campaign")
            return
        _send(job, items, acks)
    except Exception as exc:
        log.exception("scanner %s failed", job.calling_ae)
        acks.write(ERROR, repr(exc).replace("\n", " "))
    finally:
        acks.close()


def _send(job: ScannerJob, items: list[tuple[str, Dataset, str]], acks: _AckLog) -> None:
    ae = AE(ae_title=job.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = job.timeout
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    try:
        assoc = ae.associate("127.0.0.1", job.port, ae_title=job.called_ae)
        if not assoc.is_established:
            acks.write(REFUSED, f"{time.monotonic():.6f}")
            return
        acks.write(CONNECTED, f"{time.monotonic():.6f}")
        for key, ds, sent in items:
            if not assoc.is_established:
                break
            rsp = assoc.send_c_store(ds)
            if "Status" not in rsp:
                # Aborted or timed out: the association is over, even when pynetdicom
                # has not flagged it yet (another send would wait the whole timeout).
                acks.write(UNANSWERED, ds.SOPInstanceUID)
                break
            acks.write(
                ANSWER,
                ds.SOPInstanceUID,
                sent,
                f"{int(rsp.Status):04X}",
                f"{time.monotonic():.6f}",
                ds.StudyInstanceUID,
                ds.SeriesInstanceUID,
                key,
            )
        if assoc.is_established:
            assoc.release()
    finally:
        ae.shutdown()


@dataclass(frozen=True)
class Answer:
    uid: str
    digest: str
    status: int
    at: float
    study_uid: str
    series_uid: str
    key: str


@dataclass
class AckLog:
    """A scanner's acknowledgement log, read back."""

    answers: list[Answer] = field(default_factory=list)
    connected: bool = False
    refused_at: float | None = None  # monotonic time the association failed
    unanswered: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def acked(self) -> list[Answer]:
        return [a for a in self.answers if a.status == status.SUCCESS]

    @classmethod
    def read(cls, path: Path) -> AckLog:
        """Every complete line (a line without its newline was being written: skipped)."""
        found = cls()
        if not path.exists():
            return found
        for line in path.read_text().split("\n")[:-1]:
            kind, _, rest = line.partition(" ")
            parts = rest.split()
            if kind == ANSWER:
                uid, sent, code, at, study_uid, series_uid, key = parts
                found.answers.append(
                    Answer(uid, sent, int(code, 16), float(at), study_uid, series_uid, key)
                )
            elif kind == CONNECTED:
                found.connected = True
            elif kind == REFUSED:
                found.refused_at = float(rest)
            elif kind == UNANSWERED:
                found.unanswered.append(rest)
            elif kind == ERROR:
                found.errors.append(rest)
        return found
