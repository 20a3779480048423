"""PDU framing and P-DATA-TF: the stream cut anywhere, hostile bytes, pynetdicom as the referee."""

from __future__ import annotations

import itertools
import random
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom.pdu import A_ABORT_RQ, A_RELEASE_RP, A_RELEASE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from engine.dicom import pdu
from engine.dicom.pdu import (
    CONTROL_PDU_MAX_LENGTH,
    HEADER,
    PDV,
    AbortReason,
    AbortSource,
    Framer,
    PDUType,
    encode_pdata,
    parse_pdata,
)
from engine.errors import ProtocolError

MAX_BODY = 4096
EXAMPLES = 250
bounded = settings(max_examples=EXAMPLES, deadline=None)


def frame(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxL", pdu_type, len(body)) + body


def feed_in_pieces(framer: Framer, stream: bytes, cuts: list[int]) -> list[tuple[int, bytes]]:
    """Feed ``stream`` cut at ``cuts``; check ``pending`` after every piece."""
    views: list[tuple[int, memoryview]] = []
    complete = 0  # bytes of the stream that make up the PDUs returned so far
    bounds = [0, *sorted(cuts), len(stream)]
    for start, end in itertools.pairwise(bounds):
        got = framer.feed(stream[start:end])
        views.extend(got)
        complete += sum(HEADER + len(body) for _, body in got)
        assert framer.pending == end - complete
    # Views handed out earlier must survive everything fed after them.
    return [(pdu_type, bytes(body)) for pdu_type, body in views]


pdus = st.lists(
    st.tuples(st.sampled_from(list(PDUType)), st.binary(max_size=300)), min_size=1, max_size=8
)


@bounded
@given(pdus, st.data())
def test_any_cut_of_the_stream_gives_the_same_pdus(
    items: list[tuple[PDUType, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(frame(t, body) for t, body in items)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
    whole = [(t, bytes(body)) for t, body in Framer(MAX_BODY).feed(stream)]
    assert whole == [(int(t), body) for t, body in items]
    framer = Framer(MAX_BODY)
    assert feed_in_pieces(framer, stream, cuts) == whole
    assert framer.pending == 0


def test_byte_by_byte() -> None:
    stream = frame(PDUType.P_DATA_TF, b"abc") + frame(PDUType.RELEASE_RQ, bytes(4)) + frame(7, b"")
    assert feed_in_pieces(Framer(MAX_BODY), stream, list(range(len(stream)))) == [
        (PDUType.P_DATA_TF, b"abc"),
        (PDUType.RELEASE_RQ, bytes(4)),
        (PDUType.ABORT, b""),
    ]


def test_complete_pdus_are_views_of_the_chunk_not_copies() -> None:
    chunk = frame(PDUType.P_DATA_TF, b"x" * 100) + frame(PDUType.P_DATA_TF, b"y" * 50)
    got = Framer(MAX_BODY).feed(chunk)
    assert [body.obj for _, body in got] == [chunk, chunk]


def test_a_pdu_spanning_chunks_is_buffered_until_complete() -> None:
    stream = frame(PDUType.P_DATA_TF, bytes(range(200)))
    framer = Framer(MAX_BODY)
    assert framer.feed(stream[:3]) == []
    assert framer.pending == 3
    assert framer.feed(stream[3:100]) == []
    assert framer.pending == 100
    ((pdu_type, body),) = framer.feed(stream[100:])
    assert (pdu_type, bytes(body)) == (PDUType.P_DATA_TF, bytes(range(200)))
    assert framer.pending == 0


@bounded
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=6))
def test_random_bytes_raise_only_protocol_error(stream: bytes, cuts: list[int]) -> None:
    framer = Framer(MAX_BODY)
    bounds = [0, *sorted(c for c in cuts if c <= len(stream)), len(stream)]
    try:
        for start, end in itertools.pairwise(bounds):
            framer.feed(stream[start:end])
    except ProtocolError:
        pass


@pytest.mark.parametrize("split", [False, True])
def test_oversize_pdata_is_refused_before_its_body_arrives(split: bool) -> None:
    header = struct.pack(">BxL", PDUType.P_DATA_TF, MAX_BODY + 1)
    framer = Framer(MAX_BODY)
    with pytest.raises(ProtocolError, match="more than"):
        if split:
            for byte in header:
                framer.feed(bytes([byte]))
        else:
            framer.feed(header)


def test_association_pdus_may_exceed_the_pdata_maximum_up_to_a_bound() -> None:
    # An A-ASSOCIATE-RQ proposing many contexts is not bound by our P-DATA maximum.
    body = bytes(MAX_BODY * 3)
    ((pdu_type, got),) = Framer(MAX_BODY).feed(frame(PDUType.ASSOCIATE_RQ, body))
    assert (pdu_type, len(got)) == (PDUType.ASSOCIATE_RQ, len(body))
    with pytest.raises(ProtocolError):
        Framer(MAX_BODY).feed(struct.pack(">BxL", PDUType.ASSOCIATE_RQ, CONTROL_PDU_MAX_LENGTH + 1))


@pytest.mark.parametrize("pdu_type", [0x00, 0x08, 0x10, 0xFF])
def test_unknown_pdu_type_is_refused_at_once(pdu_type: int) -> None:
    with pytest.raises(ProtocolError, match="unknown PDU type"):
        Framer(MAX_BODY).feed(struct.pack(">BxL", pdu_type, 10))


def test_a_bad_header_after_good_pdus_still_raises() -> None:
    framer = Framer(MAX_BODY)
    with pytest.raises(ProtocolError):
        framer.feed(frame(PDUType.P_DATA_TF, b"ok") + struct.pack(">BxL", 0x09, 0))


def test_framer_needs_a_positive_maximum() -> None:
    with pytest.raises(ValueError):
        Framer(0)


# -- P-DATA-TF --------------------------------------------------------------------------

max_lengths = st.one_of(st.just(0), st.integers(4096, 131072))


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def check_pdata(
    pdus: list[bytes], context_id: int, is_command: bool, data: bytes, max_pdu_length: int
) -> None:
    framer = Framer(1 << 24)
    parts: list[PDV] = []
    for encoded in pdus:
        ((pdu_type, body),) = framer.feed(encoded)
        assert pdu_type == PDUType.P_DATA_TF
        if max_pdu_length:
            assert len(body) <= max_pdu_length
        (pdv,) = parse_pdata(body)
        parts.append(pdv)
    assert framer.pending == 0
    assert b"".join(bytes(p.data) for p in parts) == data
    assert all(p.context_id == context_id and p.is_command is is_command for p in parts)
    assert [p.is_last for p in parts] == [False] * (len(parts) - 1) + [True]


@bounded
@given(
    max_pdu_length=max_lengths,
    fragments=st.integers(0, 12),
    remainder=st.integers(0, 131072),
    seed=st.integers(0, 1000),
    context_id=st.integers(0, 127).map(lambda n: 2 * n + 1),
    is_command=st.booleans(),
)
def test_encode_then_parse_round_trips(
    max_pdu_length: int,
    fragments: int,
    remainder: int,
    seed: int,
    context_id: int,
    is_command: bool,
) -> None:
    room = max_pdu_length - pdu.PDV_ITEM_HEADER if max_pdu_length else 1 << 16
    size = fragments * room + remainder % room
    data = payload(size, seed)
    pdus = encode_pdata(context_id, is_command, data, max_pdu_length)
    check_pdata(pdus, context_id, is_command, data, max_pdu_length)
    if max_pdu_length:
        assert len(pdus) == max(1, -(-size // room))
        # Every fragment but the last is as large as the peer allows.
        assert all(len(p) == HEADER + max_pdu_length for p in pdus[:-1])
    else:
        assert len(pdus) == 1


@bounded
@given(
    size=st.integers(0, 70_000),
    max_pdu_length=max_lengths,
    context_id=st.integers(0, 127).map(lambda n: 2 * n + 1),
    is_command=st.booleans(),
)
def test_pynetdicom_reads_our_pdata_as_we_meant_it(
    size: int, max_pdu_length: int, context_id: int, is_command: bool
) -> None:
    data = payload(size, size)
    pdus = encode_pdata(context_id, is_command, memoryview(data), max_pdu_length)
    fragments = []
    for i, encoded in enumerate(pdus):
        theirs = P_DATA_TF()
        theirs.decode(encoded)
        assert theirs.pdu_length == len(encoded) - HEADER
        (item,) = theirs.presentation_data_value_items
        assert item.presentation_context_id == context_id
        assert item.presentation_data_value is not None
        control = item.presentation_data_value[0]
        last = i == len(pdus) - 1
        assert control == (pdu.MCH_COMMAND if is_command else 0) | (pdu.MCH_LAST if last else 0)
        fragments.append(item.presentation_data_value[1:])
        assert theirs.encode() == encoded
    assert b"".join(fragments) == data


def test_we_read_pynetdicom_pdata_with_several_pdvs() -> None:
    # pynetdicom wants lists here, whatever its annotation says.
    values: list[Any] = [
        [1, bytes([pdu.MCH_COMMAND]) + b"command part"],
        [1, bytes([pdu.MCH_COMMAND | pdu.MCH_LAST]) + b"command end"],
        [3, bytes([0]) + bytes(1000)],
        [3, bytes([pdu.MCH_LAST])],
    ]
    primitive = P_DATA()
    primitive.presentation_data_value_list = values
    encoded = P_DATA_TF(primitive).encode()
    ((_, body),) = Framer(MAX_BODY).feed(encoded)
    assert [(p.context_id, p.is_command, p.is_last, bytes(p.data)) for p in parse_pdata(body)] == [
        (1, True, False, b"command part"),
        (1, True, True, b"command end"),
        (3, False, False, bytes(1000)),
        (3, False, True, b""),
    ]


def test_pdv_data_are_views_into_the_body() -> None:
    (encoded,) = encode_pdata(5, False, b"pixels", 0)
    body = memoryview(encoded)[HEADER:]
    (pdv,) = parse_pdata(body)
    assert pdv.data.obj is encoded


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="no PDV"),
        pytest.param(b"\x00\x00\x00", id="truncated length"),
        pytest.param(b"\x00\x00\x00\x02\x01", id="truncated item header"),
        pytest.param(b"\x00\x00\x00\x00\x01\x03", id="length 0"),
        pytest.param(b"\x00\x00\x00\x01\x01\x03", id="length 1"),
        pytest.param(b"\x00\x00\x00\x05\x01\x03ab", id="overrun"),
        pytest.param(b"\x00\x00\x00\x03\x01\x03a\x00", id="trailing byte"),
        pytest.param(b"\x00\x00\x00\x03\x01\x03a\xff\xff\xff\xff\x01\x03", id="huge second"),
    ],
)
def test_malformed_pdv_items_are_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_pdata(memoryview(body))


@bounded
@given(st.binary(max_size=200))
def test_random_pdata_bodies_raise_only_protocol_error(body: bytes) -> None:
    try:
        pdvs = parse_pdata(body)
    except ProtocolError:
        return
    assert sum(pdu.PDV_ITEM_HEADER + len(p.data) for p in pdvs) == len(body)


def test_a_peer_maximum_too_small_for_data_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        encode_pdata(1, True, b"x", pdu.PDV_ITEM_HEADER)
    pdus = encode_pdata(1, True, b"abc", pdu.PDV_ITEM_HEADER + 1)
    assert [bytes(parse_pdata(memoryview(p)[HEADER:])[0].data) for p in pdus] == [b"a", b"b", b"c"]


def test_empty_data_is_one_last_fragment() -> None:
    (encoded,) = encode_pdata(7, False, b"", 16384)
    (pdv,) = parse_pdata(memoryview(encoded)[HEADER:])
    assert (pdv.context_id, pdv.is_command, pdv.is_last, bytes(pdv.data)) == (7, False, True, b"")


# -- the fixed PDUs ----------------------------------------------------------------------


def test_release_pdus_match_pynetdicom() -> None:
    assert A_RELEASE_RQ().encode() == pdu.RELEASE_RQ_PDU
    assert A_RELEASE_RP().encode() == pdu.RELEASE_RP_PDU


@pytest.mark.parametrize("source", list(AbortSource))
@pytest.mark.parametrize("reason", list(AbortReason))
def test_abort_matches_pynetdicom(source: AbortSource, reason: AbortReason) -> None:
    ours = pdu.encode_abort(source, reason)
    theirs = A_ABORT_RQ()
    theirs.decode(ours)
    assert (theirs.source, theirs.reason_diagnostic) == (source, reason)
    assert theirs.encode() == ours
    ((pdu_type, body),) = Framer(MAX_BODY).feed(ours)
    assert pdu_type == PDUType.ABORT
    assert pdu.parse_abort(body) == (source, reason)


def test_short_abort_body_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        pdu.parse_abort(b"\x00\x00\x02")


@pytest.mark.parametrize("max_pdu_length", [4096, 16384, 131072])
@pytest.mark.parametrize("extra", [-1, 0, 1])
@pytest.mark.parametrize("fragments", [1, 3])
def test_fragment_boundaries(max_pdu_length: int, extra: int, fragments: int) -> None:
    size = fragments * (max_pdu_length - pdu.PDV_ITEM_HEADER) + extra
    data = payload(size, size)
    pdus = encode_pdata(3, False, data, max_pdu_length)
    assert len(pdus) == fragments + (extra > 0)
    check_pdata(pdus, 3, False, data, max_pdu_length)
