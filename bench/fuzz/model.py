"""The records of a fuzz campaign: an input (``Case``), what the engine did (``Outcome``), and
what counts as a finding (``FindingKind``)."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class Family(enum.StrEnum):
    """What an input breaks. Each family is one generator in ``upper_layer`` or
    ``dimse_layer``; ``cases.FAMILY_WEIGHTS`` says how often it is drawn."""

    VALID = "valid"  # control: the recorded exchange, unmodified; must be stored
    GARBAGE = "garbage"  # random bytes where the first PDU should be
    TRUNCATED = "truncated"  # a valid PDU cut short, then silence or a close
    ABSURD_LENGTH = "absurd-length"  # PDU lengths 0, 0xFFFFFFFF, over the maximum, ...
    ASSOCIATE_RQ = "associate-rq"  # an A-ASSOCIATE-RQ with one broken item or field
    WRONG_PDU = "wrong-pdu"  # every PDU type, and unknown ones, in every state
    P_DATA = "p-data"  # broken PDV items on an established association
    COMMAND = "command"  # DIMSE command sets with broken elements
    DATASET = "dataset"  # C-STORE datasets with broken elements, lengths, sequences
    NEVER_ENDS = "never-ends"  # a PDU or message that never completes; a silent peer
    BYTE_FLIP = "byte-flip"  # seeded mutation of the recorded valid exchange
    PREMATURE_CLOSE = "premature-close"  # the recorded exchange cut at an offset


class Ending(enum.StrEnum):
    """What the fuzzer does after its last byte."""

    WAIT = "wait"  # read until the engine's last word (A-ABORT, -RJ, -RELEASE-RP) or close
    FIN = "fin"  # half-close (shutdown SHUT_WR), then read until the engine closes
    RESET = "reset"  # close with SO_LINGER 0: a TCP reset, nothing more to observe


@dataclass(frozen=True)
class Step:
    """Part of the preamble: bytes to send and the PDU type the engine must answer."""

    send: bytes
    expect: int


@dataclass(frozen=True)
class Case:
    """One fuzz input, on its own TCP connection: a pure function of (seed, number)."""

    number: int
    family: Family
    variant: str  # low-cardinality name of what is broken (for counting)
    preamble: tuple[Step, ...]  # steps that must succeed first (a valid association)
    payload: bytes
    ending: Ending = Ending.WAIT
    chunks: tuple[int, ...] = ()  # the payload's split into separate writes
    # Offsets in the payload after which the peer waits for the engine's next PDU before
    # going on, as a requestor waits for the A-ASSOCIATE-AC and for each DIMSE answer.
    pauses: tuple[int, ...] = ()
    linger: bool = False  # after the engine's last word, wait for it to close the socket
    note: str = ""  # the specifics (offsets, lengths) for a reader of inputs.jsonl


class Reaction(enum.StrEnum):
    """The engine's reaction to one input, as seen from the peer."""

    A_ABORT = "A-ABORT"  # promptly
    A_ASSOCIATE_RJ = "A-ASSOCIATE-RJ"
    A_RELEASE_RP = "A-RELEASE-RP"  # the input was harmless or answered, then released
    CLOSED = "connection closed"  # closed without a PDU, promptly
    TIMEOUT_ABORT = "A-ABORT after timeout"  # no reaction until the idle timeout
    TIMEOUT_CLOSE = "closed after timeout"  # no reaction until a timer closed the socket
    RESET_BY_PEER = "reset by us"  # the input ended with a TCP reset: nothing to observe
    HANG = "no close by the deadline"  # a finding
    PREAMBLE_REFUSED = "valid association refused"  # a finding
    CONNECT_FAILED = "connection refused"  # a finding


class FindingKind(enum.StrEnum):
    """What fails a campaign."""

    CRASH = "engine process exited"
    LOG_ERROR = "unexpected error or traceback in the engine's log"
    LIBRARY_CRASH = "uncaught exception in a pynetdicom thread (pynetdicom transport)"
    HANG = "connection left open past its timeout"
    LEFT_OPEN = "connections still open on the engine's port at the end"
    LOSS = "acknowledged instance not stored and indexed"
    SENDER_FAILED = "the well-behaved sender got a failure"
    ECHO_FAILED = "no C-ECHO answer at the end"
    BUSY = "engine busy while idle (a spinning loop)"
    MEMORY = "memory growth over the limit"
    SHUTDOWN = "engine did not stop cleanly"
    VALID_REFUSED = "a valid association or exchange was refused"
    CONNECT_FAILED = "engine refused a connection"
    MALFORMED_ANSWER = "engine sent a PDU or DIMSE message that does not decode"


@dataclass
class Outcome:
    number: int
    family: str
    variant: str
    reaction: Reaction
    detail: str = ""  # e.g. "source 2 reason 6" of an A-ABORT
    answers: list[str] = field(default_factory=list)  # DIMSE responses, e.g. "0x8001 0xC000"
    received: str = ""  # PDU types received after the preamble, e.g. "4 4 6"
    seconds: float = 0.0  # from our last byte to the engine's last word or close
    finding: FindingKind | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["reaction"] = str(self.reaction)
        out["finding"] = None if self.finding is None else self.finding.name
        return out
