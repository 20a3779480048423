"""STOW-RS (PS3.18 section 10.5): instances posted over HTTP, into the C-STORE pipeline.

Each part of a ``multipart/related; type="application/dicom"`` body is a Part 10 file.
Its dataset goes into the same pipeline as a C-STORE (the same validation, dedupe,
durability, quarantine); the part is read while the previous ones are still in the
pipeline, so a large request is stored in batches like an association's images.
The answer (PS3.18 10.5.3) lists the stored instances in ReferencedSOPSequence and
the refused ones in FailedSOPSequence with the C-STORE status as FailureReason:
200 when all were stored, 202 when some were, 409 when none was.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag

from engine import status
from engine.model import Origin, Outcome, Received, Result
from engine.stages.receive import Receiver
from engine.stages.validate import parse_complete

log = logging.getLogger(__name__)

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_CLASS = "00081150"
REFERENCED_SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
RETRIEVE_URL = "00081190"
# PS3.18 10.5.3: an instance of another study than the one in the request's URL.
STUDY_MISMATCH = status.DATASET_DOES_NOT_MATCH_SOP_CLASS
# PS3.4 B.2.3 "Coercion of data elements" warning, for an identical re-send kept.
COERCED = 0xB000
# Parts in the pipeline at once for one request (each holds its bytes in memory).
IN_FLIGHT = 16


# Preamble (128 bytes) and "DICM" (PS3.10 7.1).
PREFIX_END = 132


def _past_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != FILE_META_GROUP


FILE_META_GROUP = 0x0002
FILE_META_START = b"\x02\x00"  # group 0002, little endian


class StowError(Exception):
    """A part that cannot go into the pipeline: its failure reason and a message."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Part:
    """One posted instance, read from its Part 10 framing."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data: bytes  # the dataset after the file meta group


def read_part(raw: bytes) -> Part:
    """Split a posted Part 10 file; StowError when it is not one."""
    if raw[PREFIX_END - 4 : PREFIX_END] == b"DICM":
        start = PREFIX_END
    elif raw[:2] == FILE_META_START:
        start = 0  # written without preamble (pydicom does so unless told otherwise)
    else:
        raise StowError(status.CANNOT_UNDERSTAND, "not a DICOM Part 10 file (no DICM prefix)")
    stream = BytesIO(raw)
    stream.seek(start)
    try:
        # File meta is group 0002, explicit VR little endian; the dataset starts after it.
        meta = read_dataset(stream, False, True, stop_when=_past_file_meta)
    except Exception as exc:
        raise StowError(
            status.CANNOT_UNDERSTAND, f"unreadable file meta information: {exc}"
        ) from exc
    offset = stream.tell()
    values = {}
    for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID"):
        value = str(meta.get(keyword, "") or "").strip().rstrip("\x00")
        if not value:
            raise StowError(status.MISSING_ATTRIBUTE, f"the file meta information has no {keyword}")
        values[keyword] = value
    return Part(
        values["MediaStorageSOPClassUID"],
        values["MediaStorageSOPInstanceUID"],
        values["TransferSyntaxUID"],
        raw[offset:],
    )


def study_of(part: Part) -> str | None:
    """The posted dataset's StudyInstanceUID (None if it has none or does not parse:
    the pipeline then refuses it with the right status)."""
    try:
        header = parse_complete(part.data, part.transfer_syntax)
    except Exception:
        return None
    if header.attributes is not None:
        value = header.attributes.get("study_uid")
    else:
        value = header.ds.get("StudyInstanceUID")
    return str(value).strip() if value else None


class StowResponse:
    """The PS3.18 10.5.3 response body, filled as the parts' results come in."""

    def __init__(self, base: str, study: str | None) -> None:
        self.base = base
        self.study = study
        self.stored: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self.studies: set[str] = set()

    def add_stored(self, part: Part, study: str | None, result: Result) -> None:
        item = _reference(part)
        if study:
            self.studies.add(study)
            item[RETRIEVE_URL] = {
                "vr": "UR",
                "Value": [f"{self.base}/studies/{study}/instances/{part.sop_instance_uid}"],
            }
        if result.outcome is Outcome.KEPT_EXISTING:
            item[WARNING_REASON] = {"vr": "US", "Value": [COERCED]}
        self.stored.append(item)

    def add_failed(self, sop_class: str, instance: str, reason: int, message: str) -> None:
        item: dict[str, Any] = {}
        if sop_class:
            item[REFERENCED_SOP_CLASS] = {"vr": "UI", "Value": [sop_class]}
        if instance:
            item[REFERENCED_SOP_INSTANCE] = {"vr": "UI", "Value": [instance]}
        item[FAILURE_REASON] = {"vr": "US", "Value": [reason]}
        # Not in the standard's item, but what a person reading the answer needs.
        item["00000902"] = {"vr": "LO", "Value": [message[:64]]}
        self.failed.append(item)

    @property
    def http_status(self) -> int:
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        study = self.study or (next(iter(self.studies)) if len(self.studies) == 1 else None)
        if study:
            body[RETRIEVE_URL] = {"vr": "UR", "Value": [f"{self.base}/studies/{study}"]}
        body[FAILED_SOP_SEQUENCE] = {"vr": "SQ", **({"Value": self.failed} if self.failed else {})}
        body[REFERENCED_SOP_SEQUENCE] = {
            "vr": "SQ",
            **({"Value": self.stored} if self.stored else {}),
        }
        return dict(sorted(body.items()))


def _reference(part: Part) -> dict[str, Any]:
    return {
        REFERENCED_SOP_CLASS: {"vr": "UI", "Value": [part.sop_class_uid]},
        REFERENCED_SOP_INSTANCE: {"vr": "UI", "Value": [part.sop_instance_uid]},
    }


class Stower:
    """Feeds the parts of one request into the pipeline, a bounded number at a time."""

    def __init__(self, receiver: Receiver, origin: Origin, response: StowResponse) -> None:
        self.receiver = receiver
        self.origin = origin
        self.response = response
        self._slots = asyncio.Semaphore(IN_FLIGHT)
        self._tasks: list[asyncio.Task[None]] = []

    async def add(self, raw: bytes) -> None:
        """Check one part and send it into the pipeline (returns once it is queued)."""
        try:
            part = await asyncio.to_thread(read_part, raw)
            study = await asyncio.to_thread(study_of, part)
        except StowError as exc:
            log.warning("STOW-RS part refused: %s", exc.message)
            self.response.add_failed("", "", exc.reason, exc.message)
            return
        expected = self.response.study
        if expected is not None and study is not None and study != expected:
            message = f"posted to another study; it belongs to {study}"
            log.warning("STOW-RS %s refused: %s", part.sop_instance_uid, message)
            self.response.add_failed(
                part.sop_class_uid, part.sop_instance_uid, STUDY_MISMATCH, message
            )
            return
        await self._slots.acquire()
        self._tasks.append(asyncio.create_task(self._store(part, study)))

    async def _store(self, part: Part, study: str | None) -> None:
        try:
            received = Received(
                origin=self.origin,
                sop_class_uid=part.sop_class_uid,
                sop_instance_uid=part.sop_instance_uid,
                transfer_syntax=part.transfer_syntax,
                data=part.data,
                received_at=time.time(),
                started=time.monotonic(),
            )
            result = await self.receiver.submit(received)
            if result.outcome.is_success:
                self.response.add_stored(part, study, result)
            else:
                self.response.add_failed(
                    part.sop_class_uid,
                    part.sop_instance_uid,
                    status.for_outcome(result.outcome),
                    result.message,
                )
        finally:
            self._slots.release()

    async def finish(self) -> None:
        """Wait for every part's result."""
        await asyncio.gather(*self._tasks)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
