"""The DIMSE command set codec (PS3.7 section 9.3, 10.3 and annex E), free of I/O.

A DIMSE message is a command set, optionally followed by a dataset. The command set is
always Implicit VR Little Endian and holds only group 0000 elements::

    tag group (2) | tag element (2) | value length (4) | value (value length bytes)

``decode_command`` turns the joined command fragments of one message into a ``Command``;
``encode_request`` and ``encode_response`` build the bytes to send. No pydicom here: a
C-STORE request's command set is decoded once per image, a thousand times a second, so
the decoder is a loop of ``struct.unpack_from`` over one ``bytes`` object.

What the decoder checks, and why it stops there (Rule: a ``ProtocolError`` aborts the
association, so only what makes the message unusable is one):

- framing: every element complete, no length past the end, group 0000 only, no tag twice,
  US values 2 bytes and UL values 4 bytes, the Command Group Length (if sent) first and
  equal to the byte count that follows it;
- what any reply needs: the Command Field, the Command Data Set Type (without it the
  framing of the next fragments is unknown), the Message ID of a request or the Message
  ID Being Responded To of a response or C-CANCEL-RQ, and the Status of a response;
- UIDs and AE titles in ASCII (the command set has no Specific Character Set).

What a given service needs (a C-STORE-RQ's Affected SOP Instance UID, a well-formed
UID) is left to the service, which answers with a status instead of an abort: bad input
gets a clear answer. Elements the engine does not interpret (Offending Element, Error
ID, retired elements, ...) are kept raw in ``Command.extra``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType

from engine.errors import ProtocolError


class CommandField(IntEnum):
    """(0000,0100) Command Field values, PS3.7 annex E. Responses set bit 15."""

    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_GET_RQ = 0x0010
    C_GET_RSP = 0x8010
    C_FIND_RQ = 0x0020
    C_FIND_RSP = 0x8020
    C_MOVE_RQ = 0x0021
    C_MOVE_RSP = 0x8021
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    N_EVENT_REPORT_RQ = 0x0100
    N_EVENT_REPORT_RSP = 0x8100
    N_GET_RQ = 0x0110
    N_GET_RSP = 0x8110
    N_SET_RQ = 0x0120
    N_SET_RSP = 0x8120
    N_ACTION_RQ = 0x0130
    N_ACTION_RSP = 0x8130
    N_CREATE_RQ = 0x0140
    N_CREATE_RSP = 0x8140
    N_DELETE_RQ = 0x0150
    N_DELETE_RSP = 0x8150
    C_CANCEL_RQ = 0x0FFF


class Priority(IntEnum):
    """(0000,0700) Priority values, PS3.7 annex E."""

    MEDIUM = 0x0000
    HIGH = 0x0001
    LOW = 0x0002


RESPONSE_BIT = 0x8000  # PS3.7 E.1: set in the Command Field of every response
MAX_MESSAGE_ID = 0xFFFF  # Message ID is a US

# (0000,0800) Command Data Set Type. 0x0101 means "no dataset follows"; PS3.7 E.1 says
# any other value means one does, so the decoder reads it that way. pynetdicom and dcmtk
# send 0x0001, dcm4che 0x0000; we send DATASET_PRESENT.
NO_DATASET = 0x0101
DATASET_PRESENT = 0x0000

# PS3.5 table 6.2-1: LO holds at most 64 characters.
ERROR_COMMENT_MAX = 64

# No standard limit, but real command sets are a few hundred bytes; the largest legitimate
# one (an N-GET-RQ listing attributes) stays far below this. The association should stop
# collecting command fragments past it rather than buffer whatever a peer sends.
MAX_COMMAND_SET_LENGTH = 64 * 1024

# Group 0000 element numbers (the tag's group is always 0, so the element number is also
# the full 32-bit tag). PS3.7 annex E, table E.1-1.
COMMAND_GROUP_LENGTH = 0x0000  # UL
AFFECTED_SOP_CLASS_UID = 0x0002  # UI
REQUESTED_SOP_CLASS_UID = 0x0003  # UI
COMMAND_FIELD = 0x0100  # US
MESSAGE_ID = 0x0110  # US
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120  # US
MOVE_DESTINATION = 0x0600  # AE
PRIORITY = 0x0700  # US
COMMAND_DATA_SET_TYPE = 0x0800  # US
STATUS = 0x0900  # US
OFFENDING_ELEMENT = 0x0901  # AT, VM 1-n
ERROR_COMMENT = 0x0902  # LO
ERROR_ID = 0x0903  # US
AFFECTED_SOP_INSTANCE_UID = 0x1000  # UI
REQUESTED_SOP_INSTANCE_UID = 0x1001  # UI
NUMBER_OF_REMAINING_SUBOPERATIONS = 0x1020  # US
NUMBER_OF_COMPLETED_SUBOPERATIONS = 0x1021  # US
NUMBER_OF_FAILED_SUBOPERATIONS = 0x1022  # US
NUMBER_OF_WARNING_SUBOPERATIONS = 0x1023  # US
MOVE_ORIGINATOR_AE_TITLE = 0x1030  # AE
MOVE_ORIGINATOR_MESSAGE_ID = 0x1031  # US

_HEADER = struct.Struct("<HHI")  # tag group, tag element, value length
_HEADER_LENGTH = _HEADER.size
_US_LENGTH = 2
_UL_LENGTH = 4
_US_ELEMENT = struct.Struct("<HHIH")  # a whole US element: header and value
_UL_ELEMENT = struct.Struct("<HHII")
_AT_VALUE = struct.Struct("<HH")
_GROUP_LENGTH_ELEMENT_SIZE = _UL_ELEMENT.size
_COMMAND_GROUP = 0x0000
_TAG_ELEMENT_MASK = 0xFFFF
_TAG_GROUP_SHIFT = 16

# Padding to an even value length, PS3.5 6.2: UI with NUL, the text VRs with a space.
_UID_PAD = b"\x00"
_TEXT_PAD = b" "
_STRIP = b"\x00 "

# The request commands that carry a Priority (PS3.7 tables 9.3-1, -3, -5, -7).
_WITH_PRIORITY = frozenset(
    {CommandField.C_STORE_RQ, CommandField.C_FIND_RQ, CommandField.C_GET_RQ, CommandField.C_MOVE_RQ}
)

# ErrorComment is free text from our own exception messages: anything outside printable
# ASCII, and the backslash (LO's value separator), becomes "?" so the peer reads one value.
# The ASCII codec replaces what is not ASCII; this table handles the rest.
_PRINTABLE_FIRST = 0x20
_DELETE = 0x7F
_COMMENT_SAFE = {code: "?" for code in (*range(_PRINTABLE_FIRST), ord("\\"), _DELETE)}

_SHOWN_BYTES = 64  # of a bad value, in an error message

_NO_EXTRA: Mapping[int, bytes] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Command:
    """One decoded command set. ``None`` means the element was absent.

    Strings lose their padding (trailing NULs and spaces); an element sent empty decodes
    to ``""``. ``command_field`` is a plain ``int`` so that unknown commands still
    decode and get an "unrecognized operation" answer. ``extra`` maps the element number
    of every element not named here to its raw value bytes; it is left out of the hash.
    """

    command_field: int
    message_id: int | None = None
    message_id_being_responded_to: int | None = None
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    requested_sop_class_uid: str | None = None
    requested_sop_instance_uid: str | None = None
    has_dataset: bool = False
    priority: int | None = None
    status: int | None = None
    move_destination: str | None = None
    move_originator_ae: str | None = None
    move_originator_message_id: int | None = None
    error_comment: str | None = None
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    extra: Mapping[int, bytes] = field(default_factory=lambda: _NO_EXTRA, hash=False)

    @property
    def is_response(self) -> bool:
        return bool(self.command_field & RESPONSE_BIT)


# -- decoding ---------------------------------------------------------------------------


def _us(raw: bytes | None, name: str) -> int | None:
    if raw is None:
        return None
    if len(raw) != _US_LENGTH:
        raise ProtocolError(f"{name} (US) has {len(raw)} bytes, not {_US_LENGTH}")
    return int.from_bytes(raw, "little")


def _uid(raw: bytes | None, name: str) -> str | None:
    """A UI value: an identifier the engine routes on, so anything but ASCII is fatal.

    Only the padding goes; whether the rest is a well-formed UID is the service's call.
    """
    if raw is None:
        return None
    try:
        return raw.rstrip(_STRIP).decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"{name} is not ASCII: {raw[:_SHOWN_BYTES]!r}") from None


def _ae(raw: bytes | None, name: str) -> str | None:
    """An AE value: ASCII like a UID; leading spaces are not significant either (PS3.5)."""
    if raw is None:
        return None
    try:
        return raw.strip(_STRIP).decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"{name} is not ASCII: {raw[:_SHOWN_BYTES]!r}") from None


def _text(raw: bytes | None) -> str | None:
    """Free text for a log line: not worth an abort, so bad bytes become U+FFFD."""
    if raw is None:
        return None
    return raw.strip(_STRIP).decode("ascii", "replace")


def decode_command(data: bytes | memoryview) -> Command:
    """Decode one complete command set; ``ProtocolError`` if it is malformed.

    ``data`` is exactly the command set: the joined command fragments of one message.
    Elements are accepted in any order (PS3.5 asks for ascending order; being strict
    there would only abort peers that are otherwise fine).
    """
    buf = data if type(data) is bytes else bytes(data)
    end = len(buf)
    if end > MAX_COMMAND_SET_LENGTH:
        raise ProtocolError(f"command set of {end} bytes, more than {MAX_COMMAND_SET_LENGTH}")
    values: dict[int, bytes] = {}
    unpack = _HEADER.unpack_from
    offset = 0
    while offset < end:
        if end - offset < _HEADER_LENGTH:
            raise ProtocolError(f"command set ends inside an element header at byte {offset}")
        group, element, length = unpack(buf, offset)
        if group != _COMMAND_GROUP:
            raise ProtocolError(
                f"command set holds tag ({group:04X},{element:04X}) outside group 0000"
            )
        if element in values:
            raise ProtocolError(f"command set holds (0000,{element:04X}) twice")
        if element == COMMAND_GROUP_LENGTH and offset:
            raise ProtocolError("CommandGroupLength (0000,0000) is not the first element")
        start = offset + _HEADER_LENGTH
        offset = start + length
        if offset > end:
            raise ProtocolError(f"(0000,{element:04X}) claims {length} bytes, {end - start} remain")
        values[element] = buf[start:offset]

    pop = values.pop
    group_length = pop(COMMAND_GROUP_LENGTH, None)
    if group_length is not None:
        if len(group_length) != _UL_LENGTH:
            raise ProtocolError(
                f"CommandGroupLength (UL) has {len(group_length)} bytes, not {_UL_LENGTH}"
            )
        claimed = int.from_bytes(group_length, "little")
        if claimed != end - _GROUP_LENGTH_ELEMENT_SIZE:
            raise ProtocolError(
                f"CommandGroupLength says {claimed} bytes, "
                f"{end - _GROUP_LENGTH_ELEMENT_SIZE} follow"
            )

    command_field = _us(pop(COMMAND_FIELD, None), "CommandField")
    if command_field is None:
        raise ProtocolError("command set has no CommandField (0000,0100)")
    data_set_type = _us(pop(COMMAND_DATA_SET_TYPE, None), "CommandDataSetType")
    if data_set_type is None:
        raise ProtocolError("command set has no CommandDataSetType (0000,0800)")
    message_id = _us(pop(MESSAGE_ID, None), "MessageID")
    responded_to = _us(pop(MESSAGE_ID_BEING_RESPONDED_TO, None), "MessageIDBeingRespondedTo")
    status = _us(pop(STATUS, None), "Status")
    if command_field & RESPONSE_BIT:
        if responded_to is None:
            raise ProtocolError(f"response 0x{command_field:04X} has no MessageIDBeingRespondedTo")
        if status is None:
            raise ProtocolError(f"response 0x{command_field:04X} has no Status")
    elif command_field == CommandField.C_CANCEL_RQ:
        if responded_to is None:
            raise ProtocolError("C-CANCEL-RQ has no MessageIDBeingRespondedTo")
    elif message_id is None:
        raise ProtocolError(f"request 0x{command_field:04X} has no MessageID")

    return Command(
        command_field=command_field,
        message_id=message_id,
        message_id_being_responded_to=responded_to,
        affected_sop_class_uid=_uid(pop(AFFECTED_SOP_CLASS_UID, None), "AffectedSOPClassUID"),
        affected_sop_instance_uid=_uid(
            pop(AFFECTED_SOP_INSTANCE_UID, None), "AffectedSOPInstanceUID"
        ),
        requested_sop_class_uid=_uid(pop(REQUESTED_SOP_CLASS_UID, None), "RequestedSOPClassUID"),
        requested_sop_instance_uid=_uid(
            pop(REQUESTED_SOP_INSTANCE_UID, None), "RequestedSOPInstanceUID"
        ),
        has_dataset=data_set_type != NO_DATASET,
        priority=_us(pop(PRIORITY, None), "Priority"),
        status=status,
        move_destination=_ae(pop(MOVE_DESTINATION, None), "MoveDestination"),
        move_originator_ae=_ae(
            pop(MOVE_ORIGINATOR_AE_TITLE, None), "MoveOriginatorApplicationEntityTitle"
        ),
        move_originator_message_id=_us(
            pop(MOVE_ORIGINATOR_MESSAGE_ID, None), "MoveOriginatorMessageID"
        ),
        error_comment=_text(pop(ERROR_COMMENT, None)),
        remaining=_us(
            pop(NUMBER_OF_REMAINING_SUBOPERATIONS, None), "NumberOfRemainingSuboperations"
        ),
        completed=_us(
            pop(NUMBER_OF_COMPLETED_SUBOPERATIONS, None), "NumberOfCompletedSuboperations"
        ),
        failed=_us(pop(NUMBER_OF_FAILED_SUBOPERATIONS, None), "NumberOfFailedSuboperations"),
        warning=_us(pop(NUMBER_OF_WARNING_SUBOPERATIONS, None), "NumberOfWarningSuboperations"),
        extra=MappingProxyType(values) if values else _NO_EXTRA,
    )


# -- encoding ---------------------------------------------------------------------------
#
# Both encoders append complete elements to a list in ascending tag order (the order is
# the order of the code, which follows table E.1-1), then put the CommandGroupLength in
# front. Values that do not fit their VR (a US above 65535, a non-ASCII UID) are caller
# bugs and raise ValueError, never ProtocolError: they are not the peer's fault.

_DATA_SET_TYPE_ELEMENTS = {
    False: _US_ELEMENT.pack(_COMMAND_GROUP, COMMAND_DATA_SET_TYPE, _US_LENGTH, NO_DATASET),
    True: _US_ELEMENT.pack(_COMMAND_GROUP, COMMAND_DATA_SET_TYPE, _US_LENGTH, DATASET_PRESENT),
}
_COMMAND_FIELD_ELEMENTS = {
    member.value: _US_ELEMENT.pack(_COMMAND_GROUP, COMMAND_FIELD, _US_LENGTH, member)
    for member in CommandField
}


def _command_field_element(command_field: int) -> bytes:
    """The packed Command Field element: prebuilt for the known fields."""
    packed = _COMMAND_FIELD_ELEMENTS.get(command_field)
    if packed is None:  # an unknown command echoed in an "unrecognized operation" answer
        packed = _US_ELEMENT.pack(_COMMAND_GROUP, COMMAND_FIELD, _US_LENGTH, command_field)
    return packed


def _us_element(element: int, value: int) -> bytes:
    return _US_ELEMENT.pack(_COMMAND_GROUP, element, _US_LENGTH, value)


def _string_element(element: int, value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += pad
    return _HEADER.pack(_COMMAND_GROUP, element, len(raw)) + raw


def _with_group_length(parts: list[bytes]) -> bytes:
    body = b"".join(parts)
    return _UL_ELEMENT.pack(_COMMAND_GROUP, COMMAND_GROUP_LENGTH, _UL_LENGTH, len(body)) + body


def _error_comment(comment: str) -> str:
    ascii_only = comment[:ERROR_COMMENT_MAX].encode("ascii", "replace").decode("ascii")
    return ascii_only.translate(_COMMENT_SAFE)


def encode_request(
    command_field: int,
    message_id: int,
    *,
    affected_sop_class_uid: str | None = None,
    affected_sop_instance_uid: str | None = None,
    requested_sop_class_uid: str | None = None,
    requested_sop_instance_uid: str | None = None,
    priority: int | None = Priority.MEDIUM,
    has_dataset: bool = False,
    move_destination: str | None = None,
    move_originator_ae: str | None = None,
    move_originator_message_id: int | None = None,
) -> bytes:
    """The command set of a request; ``None`` leaves an element out.

    ``priority`` is written only for the commands that carry one (C-STORE, C-FIND,
    C-GET, C-MOVE): C-ECHO-RQ and the N- requests have no Priority element. For
    C-CANCEL-RQ, ``message_id`` is the ID of the request to cancel and is written as
    MessageIDBeingRespondedTo, as PS3.7 table 9.3-9 asks.
    """
    if command_field & RESPONSE_BIT:
        raise ValueError(f"0x{command_field:04X} is a response, not a request")
    try:
        parts: list[bytes] = []
        if affected_sop_class_uid is not None:
            parts.append(_string_element(AFFECTED_SOP_CLASS_UID, affected_sop_class_uid, _UID_PAD))
        if requested_sop_class_uid is not None:
            parts.append(
                _string_element(REQUESTED_SOP_CLASS_UID, requested_sop_class_uid, _UID_PAD)
            )
        parts.append(_command_field_element(command_field))
        if command_field == CommandField.C_CANCEL_RQ:
            parts.append(_us_element(MESSAGE_ID_BEING_RESPONDED_TO, message_id))
        else:
            parts.append(_us_element(MESSAGE_ID, message_id))
        if move_destination is not None:
            parts.append(_string_element(MOVE_DESTINATION, move_destination, _TEXT_PAD))
        if priority is not None and command_field in _WITH_PRIORITY:
            parts.append(_us_element(PRIORITY, priority))
        parts.append(_DATA_SET_TYPE_ELEMENTS[has_dataset])
        if affected_sop_instance_uid is not None:
            parts.append(
                _string_element(AFFECTED_SOP_INSTANCE_UID, affected_sop_instance_uid, _UID_PAD)
            )
        if requested_sop_instance_uid is not None:
            parts.append(
                _string_element(REQUESTED_SOP_INSTANCE_UID, requested_sop_instance_uid, _UID_PAD)
            )
        if move_originator_ae is not None:
            parts.append(_string_element(MOVE_ORIGINATOR_AE_TITLE, move_originator_ae, _TEXT_PAD))
        if move_originator_message_id is not None:
            parts.append(_us_element(MOVE_ORIGINATOR_MESSAGE_ID, move_originator_message_id))
    except struct.error as exc:
        raise ValueError(f"a US value does not fit in 16 bits: {exc}") from None
    return _with_group_length(parts)


def encode_response(
    command_field: int,
    message_id_being_responded_to: int,
    status: int,
    *,
    affected_sop_class_uid: str | None = None,
    affected_sop_instance_uid: str | None = None,
    error_comment: str | None = None,
    has_dataset: bool = False,
    remaining: int | None = None,
    completed: int | None = None,
    failed: int | None = None,
    warning: int | None = None,
    offending_element: Iterable[int] | None = None,
) -> bytes:
    """The command set of a response; ``None`` leaves an element out.

    A C-STORE-RSP should echo the request's Affected SOP Class and Instance UIDs and a
    C-ECHO-RSP its Affected SOP Class UID: the caller passes them, this function does
    not invent them. ``error_comment`` is cut to 64 characters and made printable
    ASCII, so an exception message can be passed as it is. ``offending_element`` holds
    32-bit tags (group << 16 | element).
    """
    if not command_field & RESPONSE_BIT:
        raise ValueError(f"0x{command_field:04X} is a request, not a response")
    try:
        parts: list[bytes] = []
        if affected_sop_class_uid is not None:
            parts.append(_string_element(AFFECTED_SOP_CLASS_UID, affected_sop_class_uid, _UID_PAD))
        parts.append(_command_field_element(command_field))
        parts.append(_us_element(MESSAGE_ID_BEING_RESPONDED_TO, message_id_being_responded_to))
        parts.append(_DATA_SET_TYPE_ELEMENTS[has_dataset])
        parts.append(_us_element(STATUS, status))
        if offending_element is not None:
            tags = b"".join(
                _AT_VALUE.pack(tag >> _TAG_GROUP_SHIFT, tag & _TAG_ELEMENT_MASK)
                for tag in offending_element
            )
            parts.append(_HEADER.pack(_COMMAND_GROUP, OFFENDING_ELEMENT, len(tags)) + tags)
        if error_comment is not None:
            parts.append(_string_element(ERROR_COMMENT, _error_comment(error_comment), _TEXT_PAD))
        if affected_sop_instance_uid is not None:
            parts.append(
                _string_element(AFFECTED_SOP_INSTANCE_UID, affected_sop_instance_uid, _UID_PAD)
            )
        if remaining is not None:
            parts.append(_us_element(NUMBER_OF_REMAINING_SUBOPERATIONS, remaining))
        if completed is not None:
            parts.append(_us_element(NUMBER_OF_COMPLETED_SUBOPERATIONS, completed))
        if failed is not None:
            parts.append(_us_element(NUMBER_OF_FAILED_SUBOPERATIONS, failed))
        if warning is not None:
            parts.append(_us_element(NUMBER_OF_WARNING_SUBOPERATIONS, warning))
    except struct.error as exc:
        raise ValueError(f"a value does not fit its VR: {exc}") from None
    return _with_group_length(parts)
