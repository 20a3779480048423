"""PDU framing and the P-DATA-TF hot path of the DICOM upper layer (PS3.8 section 9.3).

No I/O here: a ``Framer`` takes the bytes a socket delivered and returns whole PDUs;
the functions below take and return bytes. The association adapter does the sockets.

At hundreds of images a second in 16 KB PDUs this module runs tens of thousands of
times a second, so it is written lean: one ``struct`` call per header, memoryviews
instead of slices of bytes. Invariants:

- A complete PDU inside one received chunk is handed out as a view of that chunk; the
  chunk is immutable ``bytes``, so the view stays valid however long the caller keeps
  it. Only a PDU that spans chunks is copied, once, into a buffer of its exact size.
- A PDU header is judged (type known, length within bounds) as soon as its six bytes
  are here, before any of its body is buffered: a peer cannot make us allocate what
  we never agreed to receive.
- Bad peer input raises ``ProtocolError`` and nothing else; the caller aborts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from engine.errors import ProtocolError


class PDUType(IntEnum):
    """The seven PDU types of PS3.8 table 9-1."""

    ASSOCIATE_RQ = 0x01
    ASSOCIATE_AC = 0x02
    ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    RELEASE_RQ = 0x05
    RELEASE_RP = 0x06
    ABORT = 0x07


# PDU header: type (1), reserved (1), length of the rest (4, big endian).
HEADER = 6
_HEADER = struct.Struct(">BxL")
_KNOWN_TYPES = frozenset(int(t) for t in PDUType)

# The association PDUs are not bound by the maximum length we advertise (PS3.8 says
# it limits P-DATA-TF, and it has not even been sent when an A-ASSOCIATE-RQ arrives).
# A request proposing all 128 contexts with dozens of transfer syntaxes each stays
# well below this; it only bounds what a hostile peer can make us buffer.
CONTROL_PDU_MAX_LENGTH = 1024 * 1024

# PDV item (PS3.8 9.3.5.1): item length (4), presentation context ID (1), message
# control header (1), then the fragment. The item length counts the ID and the header.
PDV_ITEM_HEADER = 6
PDV_LENGTH_FIELD = 4
PDV_MIN_ITEM_LENGTH = PDV_ITEM_HEADER - PDV_LENGTH_FIELD
_PDV_LENGTH = struct.Struct(">L")
# A P-DATA-TF PDU with one PDV: PDU header and PDV item header in one pack.
_PDATA_ONE_PDV = struct.Struct(">BxLLBB")

# Message control header (PS3.8 annex E.2): bit 0 command / data set, bit 1 last fragment.
MCH_COMMAND = 0x01
MCH_LAST = 0x02

# 0 as a maximum PDU length means "no limit" (PS3.8 annex D.1).
UNLIMITED = 0

# A-RELEASE-RQ/RP and A-ABORT have a fixed 4-byte body (PS3.8 9.3.6 - 9.3.8).
FIXED_BODY_LENGTH = 4
_FIXED = struct.Struct(">BxLxxBB")

RELEASE_RQ_PDU = _FIXED.pack(PDUType.RELEASE_RQ, FIXED_BODY_LENGTH, 0, 0)
RELEASE_RP_PDU = _FIXED.pack(PDUType.RELEASE_RP, FIXED_BODY_LENGTH, 0, 0)


class AbortSource(IntEnum):
    """A-ABORT source field (PS3.8 table 9-26); 1 is reserved."""

    SERVICE_USER = 0
    SERVICE_PROVIDER = 2


class AbortReason(IntEnum):
    """A-ABORT reason/diagnostic, significant only when the provider aborts."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER = 6


class Framer:
    """Cuts a TCP byte stream into PDUs.

    Complete PDUs inside one received chunk are returned as memoryviews of that
    (immutable bytes) chunk, no copy; a PDU spanning chunks is kept as views of them
    and joined once, when its last byte is here.

    After a ``ProtocolError`` the stream has lost its framing: abort, do not feed more.
    """

    def __init__(self, max_length: int) -> None:
        """``max_length`` is the largest P-DATA-TF body accepted, our advertised maximum.

        The association PDUs may be larger, up to ``CONTROL_PDU_MAX_LENGTH``.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be positive, not {max_length}")
        self.max_length = max_length
        # The PDU in progress: its header bytes until they are all here (``_partial``),
        # then views of the chunks holding it, ``_filled`` of its ``_total`` bytes.
        self._partial = bytearray()
        self._parts: list[memoryview] = []
        self._filled = 0
        self._total = 0
        self._type = 0

    @property
    def pending(self) -> int:
        """Bytes buffered of an incomplete PDU; non-zero at EOF means a truncated PDU."""
        return self._filled if self._type else len(self._partial)

    def _check(self, pdu_type: int, length: int) -> None:
        if pdu_type not in _KNOWN_TYPES:
            raise ProtocolError(f"unknown PDU type 0x{pdu_type:02x}")
        if length > self.max_length and (
            pdu_type == PDUType.P_DATA_TF or length > CONTROL_PDU_MAX_LENGTH
        ):
            raise ProtocolError(
                f"{PDUType(pdu_type).name} PDU of {length} bytes, more than the "
                f"{self.max_length} accepted"
            )

    def feed(self, data: bytes) -> list[tuple[int, memoryview]]:
        """The PDUs completed by ``data``: (PDU type, body without the 6-byte header)."""
        out: list[tuple[int, memoryview]] = []
        view = memoryview(data)
        size = len(data)
        pos = 0
        if self._type or self._partial:
            pos = self._resume(view, out)
        while size - pos >= HEADER:
            pdu_type, length = _HEADER.unpack_from(data, pos)
            self._check(pdu_type, length)
            end = pos + HEADER + length
            if end > size:
                self._start(pdu_type, length, view[pos:])
                return out
            out.append((pdu_type, view[pos + HEADER : end]))
            pos = end
        if pos < size:
            self._partial = bytearray(view[pos:])
        return out

    def _start(self, pdu_type: int, length: int, head: memoryview) -> None:
        """Begin collecting a PDU whose header is judged and whose body is incomplete."""
        self._parts = [head]
        self._filled = len(head)
        self._total = HEADER + length
        self._type = pdu_type

    def _resume(self, view: memoryview, out: list[tuple[int, memoryview]]) -> int:
        """Continue the buffered PDU with ``view``; return how much of it was used."""
        pos = 0
        if not self._type:
            # Still collecting the header itself.
            pos = min(HEADER - len(self._partial), len(view))
            self._partial += view[:pos]
            if len(self._partial) < HEADER:
                return pos
            pdu_type, length = _HEADER.unpack_from(self._partial)
            self._check(pdu_type, length)
            head = memoryview(bytes(self._partial))
            self._partial = bytearray()
            self._start(pdu_type, length, head)
        take = min(self._total - self._filled, len(view) - pos)
        if take:
            self._parts.append(view[pos : pos + take])
        self._filled += take
        pos += take
        if self._filled == self._total:
            whole = b"".join(self._parts)  # the one copy of a PDU that spanned chunks
            out.append((self._type, memoryview(whole)[HEADER:]))
            self._parts = []
            self._filled = 0
            self._total = 0
            self._type = 0
        return pos


@dataclass(frozen=True, slots=True)
class PDV:
    """One presentation data value: a fragment of a command or data set (PS3.8 9.3.5.1)."""

    context_id: int
    is_command: bool
    is_last: bool
    data: memoryview


def parse_pdata(body: bytes | memoryview) -> list[PDV]:
    """The PDV items of a P-DATA-TF body; every item's data is a view into ``body``."""
    view = memoryview(body)
    size = len(view)
    if not size:
        raise ProtocolError("P-DATA-TF without a presentation data value item")
    pdvs: list[PDV] = []
    pos = 0
    while pos < size:
        if size - pos < PDV_ITEM_HEADER:
            raise ProtocolError(f"truncated PDV item header at offset {pos} of {size}")
        (length,) = _PDV_LENGTH.unpack_from(view, pos)
        end = pos + PDV_LENGTH_FIELD + length
        if length < PDV_MIN_ITEM_LENGTH or end > size:
            raise ProtocolError(f"PDV item length {length} at offset {pos} of {size}")
        control = view[pos + PDV_LENGTH_FIELD + 1]
        pdvs.append(
            PDV(
                context_id=view[pos + PDV_LENGTH_FIELD],
                is_command=bool(control & MCH_COMMAND),
                is_last=bool(control & MCH_LAST),
                data=view[pos + PDV_ITEM_HEADER : end],
            )
        )
        pos = end
    return pdvs


def encode_pdata(
    context_id: int, is_command: bool, data: bytes | memoryview, max_pdu_length: int
) -> list[bytes]:
    """``data`` as P-DATA-TF PDUs of one PDV each, the last one flagged last.

    ``max_pdu_length`` is the peer's maximum: per PS3.8 it bounds the PDU's variable
    field (the PDV item header included, the 6-byte PDU header not); 0 means no limit.
    A peer whose maximum leaves no room for a single byte of data has broken the
    protocol, hence ``ProtocolError``.
    """
    view = memoryview(data)
    size = len(view)
    if max_pdu_length == UNLIMITED:
        room = max(size, 1)
    else:
        room = max_pdu_length - PDV_ITEM_HEADER
        if room < 1:
            raise ProtocolError(f"the peer's maximum PDU length {max_pdu_length} is too small")
    control = MCH_COMMAND if is_command else 0
    pdus: list[bytes] = []
    pos = 0
    while True:
        end = pos + room
        last = end >= size
        if last:
            end = size
        item_length = PDV_MIN_ITEM_LENGTH + end - pos
        header = _PDATA_ONE_PDV.pack(
            PDUType.P_DATA_TF,
            PDV_LENGTH_FIELD + item_length,
            item_length,
            context_id,
            (control | MCH_LAST) if last else control,
        )
        pdus.append(header + view[pos:end])
        if last:
            return pdus
        pos = end


def encode_abort(source: AbortSource, reason: AbortReason = AbortReason.NOT_SPECIFIED) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8); the reason counts only when the provider aborts."""
    return _FIXED.pack(PDUType.ABORT, FIXED_BODY_LENGTH, source, reason)


def parse_abort(body: bytes | memoryview) -> tuple[int, int]:
    """(source, reason) of an A-ABORT body, for the log line; values are not judged."""
    if len(body) != FIXED_BODY_LENGTH:
        raise ProtocolError(f"A-ABORT body of {len(body)} bytes, not {FIXED_BODY_LENGTH}")
    return body[2], body[3]
