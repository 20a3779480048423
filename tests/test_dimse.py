"""The DIMSE command set codec: round trips, pynetdicom and pydicom interop, malformed input.

The property tests pin down the decoder's contract: for any bytes it returns a
``Command`` or raises ``ProtocolError``, nothing else; and a truncated command set is
rejected exactly when the framing or a required element says it is incomplete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from io import BytesIO
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pynetdicom import dimse_messages
from pynetdicom.dimse_primitives import C_CANCEL, C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA

from engine.dicom.dimse import (
    DATASET_PRESENT,
    ERROR_COMMENT_MAX,
    MAX_COMMAND_SET_LENGTH,
    NO_DATASET,
    Command,
    CommandField,
    Priority,
    decode_command,
    encode_request,
    encode_response,
)
from engine.errors import ProtocolError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
INSTANCE_UID = "1.2.826.0.1.3680043.8.498.1234567890123456789"  # odd length: padded
SUCCESS = 0x0000
PENDING = 0xFF00
SUB_OPERATIONS_FAILED = 0xB000
PROCESSING_FAILURE = 0x0110
US_MAX = 0xFFFF
GROUP_LENGTH_ELEMENT_SIZE = 12  # (0000,0000) UL: tag 4, length 4, value 4
HEADER = struct.Struct("<HHI")
COMMAND_CONTROL_LAST = b"\x03"  # PS3.8 E.2 message control header: command, last fragment
DATASET_CONTROL_LAST = b"\x02"

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def elements(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(offset, element, length, value) of each element of a well-formed command set."""
    found = []
    offset = 0
    while offset < len(data):
        _, element, length = HEADER.unpack_from(data, offset)
        start = offset + HEADER.size
        found.append((offset, element, length, data[start : start + length]))
        offset = start + length
    return found


def element(number: int, value: bytes) -> bytes:
    return HEADER.pack(0, number, len(value)) + value


def us(number: int, value: int) -> bytes:
    return element(number, struct.pack("<H", value))


def without_group_length(data: bytes) -> bytes:
    assert data[:4] == b"\x00\x00\x00\x00"
    return data[GROUP_LENGTH_ELEMENT_SIZE:]


def with_group_length(body: bytes) -> bytes:
    return element(0x0000, struct.pack("<I", len(body))) + body


# -- round trips --------------------------------------------------------------------------


def test_c_echo_round_trip() -> None:
    rq = decode_command(
        encode_request(CommandField.C_ECHO_RQ, 1, affected_sop_class_uid=VERIFICATION)
    )
    assert rq == Command(
        command_field=CommandField.C_ECHO_RQ, message_id=1, affected_sop_class_uid=VERIFICATION
    )
    assert rq.priority is None  # C-ECHO-RQ has no Priority element (PS3.7 table 9.3-12)
    assert not rq.is_response

    rsp = decode_command(
        encode_response(CommandField.C_ECHO_RSP, 1, SUCCESS, affected_sop_class_uid=VERIFICATION)
    )
    assert rsp == Command(
        command_field=CommandField.C_ECHO_RSP,
        message_id_being_responded_to=1,
        affected_sop_class_uid=VERIFICATION,
        status=SUCCESS,
    )
    assert rsp.is_response


@pytest.mark.parametrize(
    ("priority", "originator"),
    [(Priority.MEDIUM, None), (Priority.HIGH, None), (Priority.LOW, ("MOVESCU", 42)), (None, None)],
)
def test_c_store_request_round_trip(
    priority: Priority | None, originator: tuple[str, int] | None
) -> None:
    ae, move_id = originator or (None, None)
    data = encode_request(
        CommandField.C_STORE_RQ,
        65535,
        affected_sop_class_uid=CT_IMAGE_STORAGE,
        affected_sop_instance_uid=INSTANCE_UID,
        priority=priority,
        has_dataset=True,
        move_originator_ae=ae,
        move_originator_message_id=move_id,
    )
    assert decode_command(data) == Command(
        command_field=CommandField.C_STORE_RQ,
        message_id=65535,
        affected_sop_class_uid=CT_IMAGE_STORAGE,
        affected_sop_instance_uid=INSTANCE_UID,
        has_dataset=True,
        priority=priority,
        move_originator_ae=ae,
        move_originator_message_id=move_id,
    )


def test_c_store_response_round_trip() -> None:
    data = encode_response(
        CommandField.C_STORE_RSP,
        9,
        PROCESSING_FAILURE,
        affected_sop_class_uid=CT_IMAGE_STORAGE,
        affected_sop_instance_uid=INSTANCE_UID,
        error_comment="disk full",
        offending_element=[0x00080018, 0x7FE00010],
    )
    command = decode_command(data)
    assert command == Command(
        command_field=CommandField.C_STORE_RSP,
        message_id_being_responded_to=9,
        affected_sop_class_uid=CT_IMAGE_STORAGE,
        affected_sop_instance_uid=INSTANCE_UID,
        status=PROCESSING_FAILURE,
        error_comment="disk full",
        extra={0x0901: bytes.fromhex("08001800 e07f1000")},
    )


@pytest.mark.parametrize(
    ("rsp", "sop_class"),
    [
        (CommandField.C_FIND_RSP, STUDY_ROOT_FIND),
        (CommandField.C_MOVE_RSP, STUDY_ROOT_MOVE),
        (CommandField.C_GET_RSP, STUDY_ROOT_GET),
    ],
)
def test_query_retrieve_responses_round_trip(rsp: CommandField, sop_class: str) -> None:
    pending = decode_command(
        encode_response(
            rsp,
            3,
            PENDING,
            affected_sop_class_uid=sop_class,
            has_dataset=rsp == CommandField.C_FIND_RSP,
            remaining=7,
            completed=2,
            failed=0,
            warning=1,
        )
    )
    assert (pending.remaining, pending.completed, pending.failed, pending.warning) == (7, 2, 0, 1)
    assert pending.has_dataset == (rsp == CommandField.C_FIND_RSP)
    assert pending.status == PENDING
    assert pending.affected_sop_class_uid == sop_class

    final = decode_command(
        encode_response(rsp, 3, SUB_OPERATIONS_FAILED, has_dataset=True, completed=9, failed=1)
    )
    assert final == Command(
        command_field=rsp,
        message_id_being_responded_to=3,
        has_dataset=True,
        status=SUB_OPERATIONS_FAILED,
        completed=9,
        failed=1,
    )


def test_move_and_cancel_requests_round_trip() -> None:
    move = decode_command(
        encode_request(
            CommandField.C_MOVE_RQ,
            4,
            affected_sop_class_uid=STUDY_ROOT_MOVE,
            move_destination="VIEWER",
            has_dataset=True,
            priority=Priority.HIGH,
        )
    )
    assert (move.move_destination, move.priority, move.has_dataset) == (
        "VIEWER",
        Priority.HIGH,
        True,
    )

    # C-CANCEL-RQ names the request it cancels in MessageIDBeingRespondedTo (table 9.3-9).
    cancel = decode_command(encode_request(CommandField.C_CANCEL_RQ, 4))
    assert cancel == Command(
        command_field=CommandField.C_CANCEL_RQ, message_id_being_responded_to=4
    )


def test_n_requests_carry_requested_uids() -> None:
    data = encode_request(
        CommandField.N_GET_RQ,
        5,
        requested_sop_class_uid="1.2.3",
        requested_sop_instance_uid="1.2.3.4",
    )
    assert decode_command(data) == Command(
        command_field=CommandField.N_GET_RQ,
        message_id=5,
        requested_sop_class_uid="1.2.3",
        requested_sop_instance_uid="1.2.3.4",
    )


def test_memoryview_and_bytearray_decode_like_bytes() -> None:
    data = encode_request(CommandField.C_ECHO_RQ, 1, affected_sop_class_uid=VERIFICATION)
    framed = b"\xff" * 6 + data + b"\xff" * 3  # as a PDU layer hands a slice of its buffer
    view = memoryview(framed)[6 : 6 + len(data)]
    assert decode_command(view) == decode_command(data) == decode_command(bytearray(data))  # type: ignore[arg-type]


# -- encoding rules -----------------------------------------------------------------------


def test_encoding_layout() -> None:
    data = encode_response(
        CommandField.C_STORE_RSP,
        1,
        SUCCESS,
        affected_sop_class_uid=CT_IMAGE_STORAGE,
        affected_sop_instance_uid=INSTANCE_UID,
        error_comment="odd",
    )
    found = elements(data)
    tags = [number for _, number, _, _ in found]
    assert tags == sorted(tags) and tags[0] == 0x0000
    assert all(length % 2 == 0 for _, _, length, _ in found)
    by_tag = {number: value for _, number, _, value in found}
    assert struct.unpack("<I", by_tag[0x0000]) == (len(data) - GROUP_LENGTH_ELEMENT_SIZE,)
    assert by_tag[0x1000] == INSTANCE_UID.encode() + b"\x00"  # UI padded with NUL
    assert by_tag[0x0902] == b"odd "  # LO padded with space
    assert struct.unpack("<H", by_tag[0x0800]) == (NO_DATASET,)

    with_data = encode_response(CommandField.C_FIND_RSP, 1, PENDING, has_dataset=True)
    assert {n: v for _, n, _, v in elements(with_data)}[0x0800] == struct.pack(
        "<H", DATASET_PRESENT
    )


def test_error_comment_is_cut_and_made_printable() -> None:
    long = decode_command(
        encode_response(CommandField.C_STORE_RSP, 1, PROCESSING_FAILURE, error_comment="x" * 100)
    )
    assert long.error_comment == "x" * ERROR_COMMENT_MAX
    odd = decode_command(
        encode_response(CommandField.C_STORE_RSP, 1, PROCESSING_FAILURE, error_comment="é\\n\nok")
    )
    assert odd.error_comment == "??n?ok"
    wide = decode_command(
        encode_response(
            CommandField.C_STORE_RSP, 1, PROCESSING_FAILURE, error_comment="日本\U0001f600\x7f"
        )
    )
    assert wide.error_comment == "????"


@pytest.mark.parametrize(
    "call",
    [
        lambda: encode_response(CommandField.C_STORE_RQ, 1, SUCCESS),  # a request field
        lambda: encode_request(CommandField.C_STORE_RSP, 1),  # a response field
        lambda: encode_response(CommandField.C_STORE_RSP, 1, US_MAX + 1),
        lambda: encode_response(CommandField.C_STORE_RSP, -1, SUCCESS),
        lambda: encode_response(CommandField.C_MOVE_RSP, 1, PENDING, remaining=US_MAX + 1),
        lambda: encode_request(CommandField.C_STORE_RQ, 1, affected_sop_instance_uid="1.2.é"),
        lambda: encode_request(CommandField.C_MOVE_RQ, 1, move_destination="VIEWÉR"),
    ],
)
def test_unencodable_values_are_caller_bugs(call: Any) -> None:
    with pytest.raises(ValueError):
        call()


# -- interoperability: pynetdicom's encoder and decoder, pydicom's reader ------------------


def pynetdicom_command_set(message: type[Any], primitive: Any) -> bytes:
    msg = message()
    msg.primitive_to_message(primitive)
    data = encode(msg.command_set, True, True)
    assert data is not None
    return bytes(data)


def test_decodes_pynetdicom_c_store_rq() -> None:
    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = CT_IMAGE_STORAGE
    primitive.AffectedSOPInstanceUID = INSTANCE_UID
    primitive.Priority = Priority.LOW
    primitive.MoveOriginatorApplicationEntityTitle = "MOVESCU"
    primitive.MoveOriginatorMessageID = 3
    primitive.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    command = decode_command(pynetdicom_command_set(dimse_messages.C_STORE_RQ, primitive))
    assert command == Command(
        command_field=CommandField.C_STORE_RQ,
        message_id=7,
        affected_sop_class_uid=CT_IMAGE_STORAGE,
        affected_sop_instance_uid=INSTANCE_UID,
        has_dataset=True,  # pynetdicom writes 0x0001
        priority=Priority.LOW,
        move_originator_ae="MOVESCU",
        move_originator_message_id=3,
    )


def test_decodes_pynetdicom_c_echo_and_cancel() -> None:
    echo = C_ECHO()
    echo.MessageID = 12
    echo.AffectedSOPClassUID = VERIFICATION
    data = pynetdicom_command_set(dimse_messages.C_ECHO_RQ, echo)
    assert decode_command(data) == Command(
        command_field=CommandField.C_ECHO_RQ, message_id=12, affected_sop_class_uid=VERIFICATION
    )
    assert data == encode_request(CommandField.C_ECHO_RQ, 12, affected_sop_class_uid=VERIFICATION)

    cancel = C_CANCEL()
    cancel.MessageIDBeingRespondedTo = 12
    data = pynetdicom_command_set(dimse_messages.C_CANCEL_RQ, cancel)
    assert decode_command(data).message_id_being_responded_to == 12
    assert data == encode_request(CommandField.C_CANCEL_RQ, 12)


@pytest.mark.parametrize(
    ("primitive_type", "message", "field", "sop_class"),
    [
        (C_FIND, dimse_messages.C_FIND_RSP, CommandField.C_FIND_RSP, STUDY_ROOT_FIND),
        (C_MOVE, dimse_messages.C_MOVE_RSP, CommandField.C_MOVE_RSP, STUDY_ROOT_MOVE),
        (C_GET, dimse_messages.C_GET_RSP, CommandField.C_GET_RSP, STUDY_ROOT_GET),
    ],
)
def test_decodes_pynetdicom_query_retrieve_responses(
    primitive_type: type[Any], message: type[Any], field: CommandField, sop_class: str
) -> None:
    primitive = primitive_type()
    primitive.MessageIDBeingRespondedTo = 5
    primitive.AffectedSOPClassUID = sop_class
    primitive.Status = SUB_OPERATIONS_FAILED
    primitive.ErrorComment = "some failed"
    if field != CommandField.C_FIND_RSP:
        primitive.NumberOfRemainingSuboperations = 0
        primitive.NumberOfCompletedSuboperations = 4
        primitive.NumberOfFailedSuboperations = 1
        primitive.NumberOfWarningSuboperations = 0
    command = decode_command(pynetdicom_command_set(message, primitive))
    assert command.command_field == field
    assert command.message_id_being_responded_to == 5
    assert command.status == SUB_OPERATIONS_FAILED
    assert command.error_comment == "some failed"
    assert command.affected_sop_class_uid == sop_class
    assert not command.has_dataset
    counts = (command.remaining, command.completed, command.failed, command.warning)
    assert counts == ((None,) * 4 if field == CommandField.C_FIND_RSP else (0, 4, 1, 0))


def test_c_store_rsp_is_byte_identical_to_pynetdicom() -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.Status = SUCCESS
    primitive.AffectedSOPClassUID = CT_IMAGE_STORAGE
    primitive.AffectedSOPInstanceUID = INSTANCE_UID
    theirs = pynetdicom_command_set(dimse_messages.C_STORE_RSP, primitive)
    ours = encode_response(
        CommandField.C_STORE_RSP,
        7,
        SUCCESS,
        affected_sop_class_uid=CT_IMAGE_STORAGE,
        affected_sop_instance_uid=INSTANCE_UID,
    )
    assert ours == theirs


def read_with_pydicom(data: bytes) -> Dataset:
    return read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)


def test_pydicom_reads_our_c_store_rsp() -> None:
    data = encode_response(
        CommandField.C_STORE_RSP,
        321,
        PROCESSING_FAILURE,
        affected_sop_class_uid=CT_IMAGE_STORAGE,
        affected_sop_instance_uid=INSTANCE_UID,
        error_comment="could not write",
        offending_element=[0x00080018],
    )
    ds = read_with_pydicom(data)
    assert ds.CommandGroupLength == len(data) - GROUP_LENGTH_ELEMENT_SIZE
    assert ds.CommandField == CommandField.C_STORE_RSP
    assert ds.MessageIDBeingRespondedTo == 321
    assert ds.Status == PROCESSING_FAILURE
    assert ds.AffectedSOPClassUID == CT_IMAGE_STORAGE
    assert ds.AffectedSOPInstanceUID == INSTANCE_UID
    assert ds.CommandDataSetType == NO_DATASET
    assert ds.ErrorComment == "could not write"
    assert ds.OffendingElement == Tag(0x00080018)


def test_pydicom_reads_our_c_move_rsp() -> None:
    data = encode_response(
        CommandField.C_MOVE_RSP,
        2,
        PENDING,
        affected_sop_class_uid=STUDY_ROOT_MOVE,
        remaining=10,
        completed=5,
        failed=1,
        warning=2,
    )
    ds = read_with_pydicom(data)
    assert ds.CommandGroupLength == len(data) - GROUP_LENGTH_ELEMENT_SIZE
    assert (ds.Status, ds.MessageIDBeingRespondedTo) == (PENDING, 2)
    assert ds.NumberOfRemainingSuboperations == 10
    assert ds.NumberOfCompletedSuboperations == 5
    assert ds.NumberOfFailedSuboperations == 1
    assert ds.NumberOfWarningSuboperations == 2


def pynetdicom_decode(command_set: bytes, dataset: bytes | None) -> Any:
    """pynetdicom's own receive path: P-DATA fragments -> DIMSE message -> primitive."""
    p_data = P_DATA()
    fragments: list[Any] = [[1, COMMAND_CONTROL_LAST + command_set]]
    if dataset is not None:
        fragments.append([1, DATASET_CONTROL_LAST + dataset])
    p_data.presentation_data_value_list = fragments
    message = dimse_messages.DIMSEMessage()
    assert message.decode_msg(p_data)
    return message.message_to_primitive()


def test_pynetdicom_decodes_our_messages() -> None:
    store = pynetdicom_decode(
        encode_request(
            CommandField.C_STORE_RQ,
            17,
            affected_sop_class_uid=CT_IMAGE_STORAGE,
            affected_sop_instance_uid=INSTANCE_UID,
            has_dataset=True,
            move_originator_ae="MOVESCU",
            move_originator_message_id=2,
        ),
        b"\x08\x00\x16\x00\x00\x00\x00\x00",
    )
    assert isinstance(store, C_STORE)
    assert store.MessageID == 17
    assert store.AffectedSOPInstanceUID == INSTANCE_UID
    assert store.Priority == Priority.MEDIUM
    assert store.MoveOriginatorApplicationEntityTitle == "MOVESCU"
    assert store.DataSet is not None
    assert store.DataSet.getvalue() == b"\x08\x00\x16\x00\x00\x00\x00\x00"

    rsp = pynetdicom_decode(
        encode_response(CommandField.C_GET_RSP, 17, SUCCESS, completed=3, failed=0), None
    )
    assert isinstance(rsp, C_GET)
    assert (rsp.MessageIDBeingRespondedTo, rsp.Status) == (17, SUCCESS)
    assert rsp.NumberOfCompletedSuboperations == 3


# -- malformed input ----------------------------------------------------------------------

STORE_RQ_BODY = without_group_length(
    encode_request(
        CommandField.C_STORE_RQ,
        1,
        affected_sop_class_uid=CT_IMAGE_STORAGE,
        affected_sop_instance_uid=INSTANCE_UID,
        has_dataset=True,
    )
)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "no CommandField"),
        (STORE_RQ_BODY + element(0x4000, bytes(MAX_COMMAND_SET_LENGTH)), "more than"),
        (b"\x00\x00\x00\x01\x02\x00", "inside an element header"),
        (element(0x0100, b"\x01\x00")[:-1], "claims 2 bytes, 1 remain"),
        (HEADER.pack(0, 0x0002, 0xFFFFFFFF) + b"1.2", "claims 4294967295 bytes"),
        (HEADER.pack(0x0008, 0x0018, 2) + b"1\x00" + STORE_RQ_BODY, r"\(0008,0018\) outside"),
        (STORE_RQ_BODY + us(0x0100, 1), "twice"),
        (us(0x0100, 1) + element(0x0800, b"\x01\x01\x00\x00") + us(0x0110, 1), "4 bytes, not 2"),
        (element(0x0000, b"\x10\x00") + STORE_RQ_BODY, "2 bytes, not 4"),
        (STORE_RQ_BODY + HEADER.pack(0, 0x1030, 64) + b"MOVE", "claims 64 bytes, 4 remain"),
        (element(0x0000, struct.pack("<I", len(STORE_RQ_BODY) + 2)) + STORE_RQ_BODY, "says"),
        (STORE_RQ_BODY + element(0x0000, struct.pack("<I", 0)), "not the first"),
        (us(0x0800, NO_DATASET) + us(0x0110, 1), "no CommandField"),
        (us(0x0100, CommandField.C_ECHO_RQ) + us(0x0110, 1), "no CommandDataSetType"),
        (us(0x0100, CommandField.C_ECHO_RQ) + us(0x0800, NO_DATASET), "no MessageID"),
        (us(0x0100, CommandField.C_CANCEL_RQ) + us(0x0110, 1) + us(0x0800, NO_DATASET), "C-CANCEL"),
        (
            us(0x0100, CommandField.C_STORE_RSP) + us(0x0800, NO_DATASET) + us(0x0900, 0),
            "no MessageIDBeing",
        ),
        (
            us(0x0100, CommandField.C_STORE_RSP) + us(0x0800, NO_DATASET) + us(0x0120, 1),
            "no Status",
        ),
        (STORE_RQ_BODY + element(0x1030, b"M\xd6VE "), "MoveOriginator.* not ASCII"),
        (STORE_RQ_BODY.replace(b"1.2.840", b"1.\xb2.840"), "AffectedSOPClassUID is not ASCII"),
    ],
)
def test_malformed_command_sets_are_protocol_errors(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_command(data)


def test_tolerated_irregularities() -> None:
    """What real peers send that is off the letter of the standard but harmless."""
    echo = us(0x0100, CommandField.C_ECHO_RQ) + us(0x0110, 1) + us(0x0800, NO_DATASET)
    # No group length, elements out of order, an unknown element, odd-length padding-free
    # strings, a space-padded UID, a data set type that is neither 0x0101 nor 0x0000.
    data = (
        us(0x0800, 0xFEFE)
        + element(0x1000, b"1.2.3 ")
        + us(0x0110, 1)
        + element(0x0002, b"1.2.3")
        + us(0x0100, CommandField.C_STORE_RQ)
        + element(0x4000, b"?")
        + element(0x1030, b" SCU  ")
    )
    assert decode_command(data) == Command(
        command_field=CommandField.C_STORE_RQ,
        message_id=1,
        affected_sop_class_uid="1.2.3",
        affected_sop_instance_uid="1.2.3",
        has_dataset=True,
        move_originator_ae="SCU",
        extra={0x4000: b"?"},
    )
    assert decode_command(with_group_length(echo)) == decode_command(echo)
    unknown = us(0x0100, 0x0042) + us(0x0110, 1) + us(0x0800, NO_DATASET)
    assert decode_command(unknown).command_field == 0x0042  # answered, not aborted
    latin1 = echo + element(0x0902, b"d\xe9faut")  # free text is never worth an abort
    assert decode_command(latin1).error_comment == "d\ufffdfaut"
    empty_uid = decode_command(echo + element(0x0002, b""))
    assert empty_uid.affected_sop_class_uid == ""


# -- properties ---------------------------------------------------------------------------

uids = st.lists(st.integers(0, 10**12).map(str), min_size=1, max_size=8).map(".".join)
ae_titles = st.text("ABCXYZ019_- ", min_size=1, max_size=16).map(str.strip).filter(bool)
comments = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\"),
    max_size=ERROR_COMMENT_MAX,
)
ids = st.integers(0, US_MAX)
REQUESTS = [f for f in CommandField if not f & 0x8000]
RESPONSES = [f for f in CommandField if f & 0x8000]
WITH_PRIORITY = {
    CommandField.C_STORE_RQ,
    CommandField.C_FIND_RQ,
    CommandField.C_GET_RQ,
    CommandField.C_MOVE_RQ,
}


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, Command]:
    field = draw(st.sampled_from(REQUESTS))
    message_id = draw(ids)
    kw: dict[str, Any] = {
        "affected_sop_class_uid": draw(st.none() | uids),
        "affected_sop_instance_uid": draw(st.none() | uids),
        "requested_sop_class_uid": draw(st.none() | uids),
        "requested_sop_instance_uid": draw(st.none() | uids),
        "priority": draw(st.none() | st.sampled_from(Priority)),
        "has_dataset": draw(st.booleans()),
        "move_destination": draw(st.none() | ae_titles),
        "move_originator_ae": draw(st.none() | ae_titles),
        "move_originator_message_id": draw(st.none() | ids),
    }
    data = encode_request(field, message_id, **kw)
    if field not in WITH_PRIORITY:
        kw["priority"] = None
    if field == CommandField.C_CANCEL_RQ:
        kw["message_id_being_responded_to"] = message_id
    else:
        kw["message_id"] = message_id
    return data, Command(command_field=field, **kw)


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, Command]:
    field = draw(st.sampled_from(RESPONSES))
    responded_to = draw(ids)
    status = draw(ids)
    kw: dict[str, Any] = {
        "affected_sop_class_uid": draw(st.none() | uids),
        "affected_sop_instance_uid": draw(st.none() | uids),
        "error_comment": draw(st.none() | comments),
        "has_dataset": draw(st.booleans()),
        "remaining": draw(st.none() | ids),
        "completed": draw(st.none() | ids),
        "failed": draw(st.none() | ids),
        "warning": draw(st.none() | ids),
    }
    data = encode_response(field, responded_to, status, **kw)
    expected = Command(
        command_field=field, message_id_being_responded_to=responded_to, status=status, **kw
    )
    return data, expected


commands = requests() | responses()


@FAST
@given(commands)
def test_valid_commands_round_trip(case: tuple[bytes, Command]) -> None:
    data, expected = case
    assert decode_command(data) == expected
    found = elements(data)
    tags = [number for _, number, _, _ in found]
    assert tags == sorted(set(tags)) and tags[0] == 0x0000
    assert all(length % 2 == 0 for _, _, length, _ in found)


@FAST
@given(st.binary(max_size=256))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_command(data)


# Well-framed group 0000 elements with arbitrary numbers and values: reaches the value
# checks (lengths, ASCII, required elements) that random bytes rarely get past.
known_elements = st.sampled_from(
    [
        0x0000,
        0x0002,
        0x0003,
        0x0100,
        0x0110,
        0x0120,
        0x0600,
        0x0700,
        0x0800,
        0x0900,
        0x0902,
        0x1000,
        0x1001,
        0x1020,
        0x1021,
        0x1022,
        0x1023,
        0x1030,
        0x1031,
    ]
)
framed = st.lists(
    st.tuples(known_elements | st.integers(0, US_MAX), st.binary(max_size=8)), max_size=12
).map(lambda pairs: b"".join(element(n, v) for n, v in pairs))


@FAST
@given(framed)
def test_framed_garbage_only_raises_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_command(data)


@FAST
@given(commands, st.data())
def test_mutated_commands_only_raise_protocol_error(
    case: tuple[bytes, Command], data: st.DataObject
) -> None:
    buf = bytearray(case[0])
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 0xFF))
    with contextlib.suppress(ProtocolError):
        decode_command(bytes(buf))


@FAST
@given(commands)
def test_every_truncation_with_group_length_is_rejected(case: tuple[bytes, Command]) -> None:
    """Our encoder always writes the group length, so any cut shows: nothing half-decodes."""
    data = case[0]
    for cut in range(len(data)):
        with pytest.raises(ProtocolError):
            decode_command(data[:cut])


FIELD_OF_ELEMENT = {
    0x0002: "affected_sop_class_uid",
    0x0003: "requested_sop_class_uid",
    0x0110: "message_id",
    0x0120: "message_id_being_responded_to",
    0x0600: "move_destination",
    0x0700: "priority",
    0x0900: "status",
    0x0902: "error_comment",
    0x1000: "affected_sop_instance_uid",
    0x1001: "requested_sop_instance_uid",
    0x1020: "remaining",
    0x1021: "completed",
    0x1022: "failed",
    0x1023: "warning",
    0x1030: "move_originator_ae",
    0x1031: "move_originator_message_id",
}


def required_elements(command: Command) -> set[int]:
    """What decode_command insists on: enough to frame the message and to answer it."""
    if command.is_response:
        return {0x0100, 0x0800, 0x0120, 0x0900}
    if command.command_field == CommandField.C_CANCEL_RQ:
        return {0x0100, 0x0800, 0x0120}
    return {0x0100, 0x0800, 0x0110}


@FAST
@given(commands)
def test_truncation_without_group_length_decodes_only_complete_prefixes(
    case: tuple[bytes, Command],
) -> None:
    """Without a group length, a cut decodes iff it falls on an element boundary and the
    required elements are before it; the result is the full command minus what was cut."""
    data, full = without_group_length(case[0]), case[1]
    found = elements(data)
    boundaries = {offset: i for i, (offset, _, _, _) in enumerate(found)}
    for cut in range(len(data)):
        kept = (
            {number for _, number, _, _ in found[: boundaries[cut]]} if cut in boundaries else None
        )
        if kept is None or not required_elements(full) <= kept:
            with pytest.raises(ProtocolError):
                decode_command(data[:cut])
            continue
        lost: dict[str, Any] = {FIELD_OF_ELEMENT[n]: None for _, n, _, _ in found if n not in kept}
        assert decode_command(data[:cut]) == dataclasses.replace(full, **lost)


@FAST
@given(st.text(max_size=100))
def test_any_error_comment_encodes_as_one_printable_value(comment: str) -> None:
    """Exception text goes straight into a response: it must never fail the encoder."""
    data = encode_response(CommandField.C_STORE_RSP, 1, PROCESSING_FAILURE, error_comment=comment)
    decoded = decode_command(data).error_comment
    assert decoded is not None and len(decoded) <= ERROR_COMMENT_MAX
    assert all(" " <= c <= "~" and c != "\\" for c in decoded)
