"""The top-level data elements of an encoded dataset, read without pydicom (hot path).

``walk`` reads a little-endian dataset (explicit or implicit VR) element by element,
up to the pixel data, and keeps the raw value bytes of the tags it is asked for.
Sequences of undefined length are skipped item by item (PS3.5 section 7.5). It is a
fast path only: for anything unusual (an element running past the end, tags out of
order, a VR that is not two capital letters, UN of undefined length, nothing at all)
it returns None and the caller lets pydicom read the dataset and judge it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITATION = 0xFFFEE00D
SEQUENCE_DELIMITATION = 0xFFFEE0DD
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 table 7.1-1).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_KNOWN_VRS = _LONG_VRS | {
    b"AE",
    b"AS",
    b"AT",
    b"CS",
    b"DA",
    b"DS",
    b"DT",
    b"FD",
    b"FL",
    b"IS",
    b"LO",
    b"LT",
    b"PN",
    b"SH",
    b"SL",
    b"SS",
    b"ST",
    b"TM",
    b"UI",
    b"UL",
    b"US",
}
_TAG_LENGTH = struct.Struct("<HHL")  # implicit element header, and item headers
_EXPLICIT_SHORT = struct.Struct("<HH2sH")
_U32 = struct.Struct("<L")
# Nesting deeper than this is not a real header: leave it to pydicom.
MAX_DEPTH = 16


@dataclass(frozen=True, slots=True)
class Walked:
    """What ``walk`` found: raw (VR or None, value) by tag, and where the pixels start."""

    elements: dict[int, tuple[str | None, bytes]]
    pixel_tag: int | None = None
    pixel_at: int = 0  # offset of the pixel data's value
    pixel_length: int = UNDEFINED_LENGTH


class _Unusual(Exception):
    """Not for the fast path."""


def walk(data: bytes, implicit: bool, wanted: frozenset[int]) -> Walked | None:
    """The ``wanted`` top-level elements of ``data``, up to the pixel data; None if unusual."""
    try:
        return _walk(data, implicit, wanted)
    except (_Unusual, struct.error):
        return None


def _walk(data: bytes, implicit: bool, wanted: frozenset[int]) -> Walked | None:
    found: dict[int, tuple[str | None, bytes]] = {}
    size = len(data)
    pos = 0
    previous = -1
    while pos < size:
        tag, vr, length, value_at = _element(data, pos, implicit)
        if tag <= previous:
            raise _Unusual
        previous = tag
        if tag in PIXEL_TAGS:
            return Walked(found, tag, value_at, length)
        if length == UNDEFINED_LENGTH:
            if vr == "UN" or tag in wanted:
                raise _Unusual
            pos = _skip_sequence(data, value_at, implicit, 1)
            continue
        end = value_at + length
        if end > size:
            raise _Unusual  # cut short: pydicom says how
        if tag in wanted:
            found[tag] = (vr, data[value_at:end])
        pos = end
    if previous < 0:
        raise _Unusual  # nothing at all
    return Walked(found)


def _element(data: bytes, pos: int, implicit: bool) -> tuple[int, str | None, int, int]:
    """(tag, VR or None, length, offset of the value) of the element at ``pos``."""
    if implicit:
        group, element, length = _TAG_LENGTH.unpack_from(data, pos)
        return group << 16 | element, None, length, pos + 8
    group, element, raw_vr, length = _EXPLICIT_SHORT.unpack_from(data, pos)
    if raw_vr not in _KNOWN_VRS:
        raise _Unusual
    if raw_vr in _LONG_VRS:
        (length,) = _U32.unpack_from(data, pos + 8)
        return group << 16 | element, raw_vr.decode(), length, pos + 12
    return group << 16 | element, raw_vr.decode(), length, pos + 8


def _skip_sequence(data: bytes, pos: int, implicit: bool, depth: int) -> int:
    """Past the delimitation of an undefined-length sequence whose items start at ``pos``."""
    if depth > MAX_DEPTH:
        raise _Unusual
    while True:
        group, element, length = _TAG_LENGTH.unpack_from(data, pos)
        tag = group << 16 | element
        pos += 8
        if tag == SEQUENCE_DELIMITATION:
            return pos
        if tag != ITEM:
            raise _Unusual
        if length != UNDEFINED_LENGTH:
            pos += length
            if pos > len(data):
                raise _Unusual
            continue
        pos = _skip_item(data, pos, implicit, depth)


def _skip_item(data: bytes, pos: int, implicit: bool, depth: int) -> int:
    """Past the delimitation of an undefined-length item whose elements start at ``pos``."""
    while True:
        group, element = struct.unpack_from("<HH", data, pos)
        if group << 16 | element == ITEM_DELIMITATION:
            return pos + 8
        _, vr, length, value_at = _element(data, pos, implicit)
        if length == UNDEFINED_LENGTH:
            if vr == "UN":
                raise _Unusual
            pos = _skip_sequence(data, value_at, implicit, depth + 1)
            continue
        pos = value_at + length
        if pos > len(data):
            raise _Unusual
