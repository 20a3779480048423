"""One fuzz input on its own TCP connection, and the engine's reaction to it.

The peer sends the preamble (each step must get its expected answer: a valid association
refused is a finding), then the payload, then ends as the case says, and reads until the
engine's last word (A-ABORT, A-ASSOCIATE-RJ, A-RELEASE-RP) or until it closes. A proper
requestor closes the transport once it has that last word; a lingering input waits for
the engine to close it (ARTIM). Every wait is bounded by ``Timing``: a connection still
open past its deadline is a ``HANG`` finding.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field

from bench.fuzz.model import Case, Ending, FindingKind, Outcome, Reaction
from engine.dicom import dimse, pdu
from engine.errors import ProtocolError

T = pdu.PDUType
_HEADER = struct.Struct(">BxL")
_LINGER_RESET = struct.pack("ii", 1, 0)
READ_SIZE = 65536
# The engine never sends more than this in one PDU to a peer whose maximum is 16 KB,
# an A-ASSOCIATE-AC included; anything larger is a malformed answer.
LARGEST_ANSWER = 1024 * 1024
LAST_WORDS = frozenset({T.ABORT, T.ASSOCIATE_RJ, T.RELEASE_RP})
KNOWN_TYPES = frozenset(int(t) for t in T)
ANY_PDU = KNOWN_TYPES
CONNECT_TIMEOUT = 10.0
NOT_ASCII = "is not ASCII"  # how dimse.decode_command names a UID it cannot read
ECHOED_GARBAGE = "answer echoing a non-ASCII UID"


@dataclass(frozen=True)
class Timing:
    """The engine's timers (its config) and the slack granted on top of them."""

    acse_timeout: float
    network_timeout: float
    slack: float = 5.0

    @property
    def silence(self) -> float:
        """Longest the engine may take to end a silent connection: the idle check runs
        every ``network_timeout``, so an association may wait up to twice that before
        its A-ABORT, then ARTIM before the close."""
        return 2 * self.network_timeout + self.acse_timeout + self.slack

    @property
    def after_last_word(self) -> float:
        return self.acse_timeout + self.slack

    @property
    def pause(self) -> float:
        """How long a pausing peer waits for an answer before it sends on anyway."""
        return self.network_timeout

    @property
    def prompt(self) -> float:
        """A reaction slower than this came from a timer, not from the input."""
        return 0.8 * min(self.acse_timeout, self.network_timeout)


class PDUReader:
    """Cuts the engine's answers into PDUs and decodes the DIMSE responses they carry."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.types: list[int] = []
        self.answers: list[str] = []
        self.malformed = ""
        self._command: dict[int, bytearray] = {}

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        out = []
        while len(self.buffer) >= pdu.HEADER:
            pdu_type, length = _HEADER.unpack_from(self.buffer)
            if pdu_type not in KNOWN_TYPES or length > LARGEST_ANSWER:
                self.malformed = f"PDU type 0x{pdu_type:02X} of {length} bytes"
                self.buffer.clear()
                break
            if len(self.buffer) < pdu.HEADER + length:
                break
            body = bytes(self.buffer[pdu.HEADER : pdu.HEADER + length])
            del self.buffer[: pdu.HEADER + length]
            self.types.append(pdu_type)
            if pdu_type == T.P_DATA_TF:
                self._pdata(body)
            out.append((pdu_type, body))
        return out

    def _pdata(self, body: bytes) -> None:
        try:
            for pdv in pdu.parse_pdata(body):
                if not pdv.is_command:
                    continue  # a C-FIND match: its identifier is not judged here
                parts = self._command.setdefault(pdv.context_id, bytearray())
                parts += pdv.data
                if pdv.is_last:
                    del self._command[pdv.context_id]
                    self.answers.append(_answer(bytes(parts)))
        except ProtocolError as exc:
            self.malformed = f"P-DATA: {exc}"


def _answer(command_set: bytes) -> str:
    """A DIMSE answer as "command-field status". An answer that echoes a request's
    non-ASCII UID (pynetdicom's do) is the request's doing, not a malformed answer."""
    try:
        command = dimse.decode_command(command_set)
    except ProtocolError as exc:
        if NOT_ASCII not in str(exc):
            raise
        return ECHOED_GARBAGE
    status = "" if command.status is None else f" 0x{command.status:04X}"
    return f"0x{command.command_field:04X}{status}"


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pdus: PDUReader = field(default_factory=PDUReader)
    eof: bool = False
    last_write: float = 0.0  # monotonic: when the peer's last bytes were handed over
    ended_at: float = 0.0  # monotonic: when the last word or EOF arrived

    async def read_until(self, deadline: float, stop: frozenset[int]) -> tuple[int, bytes] | None:
        """Read until a PDU of a type in ``stop`` arrives (returned), EOF or the deadline."""
        while not self.eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                data = await asyncio.wait_for(self.reader.read(READ_SIZE), remaining)
            except TimeoutError:
                return None
            except (ConnectionError, OSError):
                data = b""
            if not data:
                self.eof = True
                self.ended_at = time.monotonic()
                return None
            for pdu_type, body in self.pdus.feed(data):
                if pdu_type in stop:
                    self.ended_at = time.monotonic()
                    return pdu_type, body
        return None

    def close(self, reset: bool = False) -> None:
        if reset:
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            self.writer.transport.abort()
        else:
            self.writer.close()


async def run_case(case: Case, host: str, port: int, timing: Timing) -> Outcome:
    """Send ``case`` and name the engine's reaction; never raises for the engine's doing."""
    outcome = Outcome(case.number, case.family, case.variant, Reaction.CONNECT_FAILED,
                      note=case.note)  # fmt: skip
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), CONNECT_TIMEOUT
        )
    except (OSError, TimeoutError) as exc:
        outcome.detail = repr(exc)
        outcome.finding = FindingKind.CONNECT_FAILED
        return outcome
    connection = _Connection(reader, writer)
    try:
        await _run(case, connection, timing, outcome)
    finally:
        if not writer.is_closing():
            connection.close()
    if connection.pdus.malformed and outcome.finding is None:
        outcome.finding = FindingKind.MALFORMED_ANSWER
        outcome.detail = connection.pdus.malformed
    outcome.answers = connection.pdus.answers
    return outcome


async def _run(case: Case, connection: _Connection, timing: Timing, outcome: Outcome) -> None:
    for step in case.preamble:
        connection.writer.write(step.send)
        deadline = time.monotonic() + timing.after_last_word
        got = await connection.read_until(deadline, frozenset({step.expect}) | LAST_WORDS)
        if got is not None and got[0] == step.expect:
            continue
        if step.expect == T.ASSOCIATE_RJ and got is not None:
            # A request meant to be rejected was aborted instead: that is the reaction.
            _name_last_word(outcome, got, prompt=True)
            return
        outcome.reaction = Reaction.PREAMBLE_REFUSED
        outcome.finding = FindingKind.VALID_REFUSED
        outcome.detail = "no answer" if got is None else f"PDU type 0x{got[0]:02X}"
        return
    preamble_pdus = len(connection.pdus.types)
    connection.last_write = time.monotonic()
    early = await _send(case, connection, timing)
    if case.ending is Ending.RESET:
        connection.close(reset=True)
        outcome.reaction = Reaction.RESET_BY_PEER
        return
    if case.ending is Ending.FIN and not connection.eof:
        with contextlib.suppress(OSError):
            connection.writer.write_eof()
    sent_at = connection.last_write
    got = early or await connection.read_until(sent_at + timing.silence, LAST_WORDS)
    ended = connection.ended_at if (got is not None or connection.eof) else time.monotonic()
    outcome.seconds = round(max(ended - sent_at, 0.0), 3)
    outcome.received = " ".join(str(t) for t in connection.pdus.types[preamble_pdus:])
    prompt = outcome.seconds < timing.prompt
    if got is None:
        if not connection.eof:
            outcome.reaction, outcome.finding = Reaction.HANG, FindingKind.HANG
            outcome.detail = f"open {outcome.seconds:.1f} s after the input"
        else:
            outcome.reaction = Reaction.CLOSED if prompt else Reaction.TIMEOUT_CLOSE
        return
    _name_last_word(outcome, got, prompt)
    if case.linger:
        deadline = time.monotonic() + timing.after_last_word
        await connection.read_until(deadline, frozenset())
        if not connection.eof:
            outcome.finding = FindingKind.HANG
            outcome.note += f" (not closed {timing.after_last_word:.0f} s after its last word)"


def _name_last_word(outcome: Outcome, got: tuple[int, bytes], prompt: bool) -> None:
    pdu_type, body = got
    if pdu_type == T.ABORT:
        outcome.reaction = Reaction.A_ABORT if prompt else Reaction.TIMEOUT_ABORT
        outcome.detail = f"source {body[2]} reason {body[3]}" if len(body) == 4 else "short"
    elif pdu_type == T.ASSOCIATE_RJ:
        outcome.reaction = Reaction.A_ASSOCIATE_RJ
        outcome.detail = "result {} source {} reason {}".format(*body[1:4])
    else:
        outcome.reaction = Reaction.A_RELEASE_RP


async def _send(case: Case, connection: _Connection, timing: Timing) -> tuple[int, bytes] | None:
    """Write the payload in its chunks, waiting for the engine's next PDU at each pause.

    Returns the engine's last word if it came during a pause (the peer then stops
    sending, as a requestor would), else None. The engine may close before it has all.
    """
    data = case.payload
    cuts, pos = set(case.pauses), 0
    for size in case.chunks:
        pos += size
        cuts.add(pos)
    pos = 0
    try:
        for cut in [*sorted(c for c in cuts if 0 < c < len(data)), len(data)]:
            if cut <= pos:
                continue
            connection.writer.write(data[pos:cut])
            pos = cut
            await asyncio.wait_for(connection.writer.drain(), timing.silence)
            connection.last_write = time.monotonic()
            if cut in case.pauses:
                deadline = time.monotonic() + timing.pause
                got = await connection.read_until(deadline, ANY_PDU)
                if connection.eof or (got is not None and got[0] in LAST_WORDS):
                    return got
    except (ConnectionError, OSError, TimeoutError):
        pass  # what the engine said before it closed is still read
    return None
