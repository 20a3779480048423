"""The records that flow through the pipeline, and the outcomes it can reach.

``Received`` is what the network adapter hands in; ``Validated`` adds what the
header said; ``Stored`` is a file that is in place and waits for its index row.
Every item ends with a ``Result``: an ``Outcome`` (a value, never an exception)
and a message for the log and the response's Error Comment.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.storage.spool import Spooled


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an instance came from."""

    peer_ip: str
    peer_port: int
    calling_ae: str
    called_ae: str


@dataclass(slots=True)
class Received:
    """One C-STORE (or later STOW-RS) request as it arrived.

    ``data`` is the encoded dataset exactly as sent, without file meta
    information, in ``transfer_syntax``; or, when the transport spooled it to a
    temp file as it arrived, ``data`` is empty and ``spooled`` has the file, its
    digest and its first bytes. ``received_at`` is wall-clock time (for the
    index), ``started`` a monotonic stamp (for latency).
    """

    origin: Origin
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data: bytes
    received_at: float
    started: float
    spooled: Spooled | None = None

    @property
    def size(self) -> int:
        """Dataset bytes received."""
        return self.spooled.size if self.spooled is not None else len(self.data)

    def discard(self) -> None:
        """Remove the spooled temp file of an item that leaves the pipeline unwritten."""
        if self.spooled is not None:
            self.spooled.discard()


@dataclass(slots=True)
class Validated:
    """A received instance whose header parsed and passed the checks.

    ``attributes`` holds the values the index keeps, by index column name.
    ``digest`` is the content digest of the data as received
    (``engine/digest.py``): a re-sent identical instance has the same digest.
    ``payload`` and ``payload_syntax`` are what the write stage stores (the
    received bytes, or a transcoded copy), unless ``spooled`` names the temp file
    that already holds them.
    """

    received: Received
    attributes: dict[str, Any]
    digest: str
    payload: bytes
    payload_syntax: str
    # The received dataset's temp file, stored as it is (renamed into place); None
    # when ``payload`` is what gets written.
    spooled: Spooled | None = None
    # The stored dataset up to its pixel data, kept in the index for metadata queries
    # (None: too long or not cut; metadata then comes from the file).
    header: bytes | None = None


class Outcome(enum.Enum):
    """How an item left the pipeline. ``status.for_outcome`` gives its DIMSE status."""

    STORED = "stored"
    ALREADY_STORED = "already stored"  # same UID, same bytes: nothing written
    KEPT_EXISTING = "kept existing"  # same UID, other bytes, policy keep
    OVERWRITTEN = "overwritten"  # same UID, other bytes, policy overwrite
    DUPLICATE_REJECTED = "duplicate rejected"  # same UID, other bytes, policy reject
    CANNOT_UNDERSTAND = "cannot understand"  # the dataset does not parse
    MISSING_ATTRIBUTE = "missing attribute"  # a UID or key the store needs is absent
    INVALID_UID = "invalid UID"  # a UID is malformed
    INSTANCE_MISMATCH = "instance mismatch"  # dataset's SOP Instance UID != request's
    SOP_CLASS_MISMATCH = "SOP class mismatch"  # dataset's SOP Class UID != request's
    UNSUPPORTED_SYNTAX = "unsupported transfer syntax"
    CORRUPT_PIXEL_DATA = "corrupt pixel data"  # check_pixels or transcode failed to decode
    OUT_OF_RESOURCES = "out of resources"  # disk full, pipeline full past the wait limit
    PROCESSING_FAILURE = "processing failure"  # a fault inside the engine
    NOT_AUTHORIZED = "not authorized"  # the caller may not store here (access control)

    @property
    def is_success(self) -> bool:
        return self in _SUCCESSES

    @property
    def quarantines(self) -> bool:
        """Outcomes whose bytes go to the quarantine folder with a note."""
        return self in _QUARANTINED


_SUCCESSES = frozenset(
    {Outcome.STORED, Outcome.ALREADY_STORED, Outcome.KEPT_EXISTING, Outcome.OVERWRITTEN}
)
_QUARANTINED = frozenset(
    {
        Outcome.CANNOT_UNDERSTAND,
        Outcome.MISSING_ATTRIBUTE,
        Outcome.INVALID_UID,
        Outcome.INSTANCE_MISMATCH,
        Outcome.SOP_CLASS_MISMATCH,
        Outcome.UNSUPPORTED_SYNTAX,
        Outcome.CORRUPT_PIXEL_DATA,
        Outcome.DUPLICATE_REJECTED,
    }
)


@dataclass(frozen=True, slots=True)
class Result:
    """The answer for one item."""

    outcome: Outcome
    message: str = ""
    path: str | None = field(default=None)  # stored (or quarantined) file, relative


class Rejection(Exception):
    """Raised by stage logic to end an item with a failure outcome.

    Stage functions are plain code; raising keeps them short. The stage runner
    turns it into a ``Result`` at once: it never escapes the pipeline.
    """

    def __init__(self, outcome: Outcome, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message
