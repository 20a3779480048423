"""Inputs that break a C-STORE dataset (explicit VR little endian, PS3.5 section 7): element
lengths, VRs, sequences of undefined length that never end, huge claimed sizes, missing
or inconsistent UIDs. The command is valid and the dataset arrives whole: the engine
must answer with a status (and quarantine what it refuses), then release.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from pydicom.uid import generate_uid

from bench.fuzz import messages as m
from bench.fuzz.dimse_layer import store_command
from bench.fuzz.seeds import Draft, Seeds, fragments, random_split
from engine.dicom import pdu

RELEASE = pdu.RELEASE_RQ_PDU
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 table 7.1-1).
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
UNDEFINED = 0xFFFFFFFF
_TAG = struct.Struct("<HH")
_SHORT = struct.Struct("<HH2sH")
_LONG = struct.Struct("<HH2s2xL")
_ITEM = struct.Struct("<HHL")
ITEM, ITEM_END, SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
PIXEL_DATA = 0x7FE00010
SOP_INSTANCE_UID = 0x00080018
REQUIRED = (0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00100020)
CONTENT_SEQUENCE = (0x0040, 0xA730)
PIXEL_MUTATIONS = frozenset(
    {
        "huge claimed pixel data size",
        "pixel data of undefined length without items",
        "pixel data shorter than the image",
    }
)


@dataclass(frozen=True)
class Element:
    start: int
    tag: int
    vr: bytes
    length_at: int  # offset of the length field
    length_size: int  # 2 or 4
    end: int  # offset after the value


def explicit_elements(data: bytes) -> list[Element]:
    """The top-level elements of a dataset without sequences (``messages.small_ct``)."""
    out, pos = [], 0
    while pos + _SHORT.size <= len(data):
        group, number, vr, short = _SHORT.unpack_from(data, pos)
        if vr in LONG_VRS:
            length_at, size, length = pos + 8, 4, _LONG.unpack_from(data, pos)[3]
        else:
            length_at, size, length = pos + 6, 2, short
        end = length_at + size + length
        out.append(Element(pos, group << 16 | number, vr, length_at, size, end))
        pos = end
    return out


def _set_length(data: bytes, element: Element, length: int) -> bytes:
    fmt = "<L" if element.length_size == 4 else "<H"
    limit = 0xFFFFFFFF if element.length_size == 4 else 0xFFFF
    packed = struct.pack(fmt, min(max(length, 0), limit))
    return data[: element.length_at] + packed + data[element.length_at + element.length_size :]


def _item(tag: tuple[int, int], length: int) -> bytes:
    return _ITEM.pack(*tag, length)


def _sequence_header(length: int = UNDEFINED) -> bytes:
    return _LONG.pack(*CONTENT_SEQUENCE, b"SQ", length)


def _short_element(group: int, number: int, vr: bytes, value: bytes) -> bytes:
    return _SHORT.pack(group, number, vr, len(value)) + value


def _nested(depth: int, closed: bool) -> bytes:
    """``depth`` sequences of undefined length inside each other; closed or never ended."""
    inner = _short_element(0x0040, 0xA040, b"CS", b"TEXT")
    opening = (_sequence_header() + _item(ITEM, UNDEFINED)) * depth
    closing = (_item(ITEM_END, 0) + _item(SEQUENCE_END, 0)) * depth if closed else b""
    return opening + inner + closing


DATASET_MUTATIONS = (
    "element length +k", "element length -k", "odd length", "length past the end",
    "undefined length on a plain element", "huge claimed pixel data size",
    "pixel data of undefined length without items", "pixel data shorter than the image",
    "dataset cut", "VR garbage", "elements out of order", "duplicate element",
    "required attribute removed", "instance UID differs from the command", "non-ASCII UID",
    "UID of 200 characters", "sequence of undefined length never ends",
    "item of undefined length never ends", "item length past its sequence",
    "sequences nested deep", "sequences nested deep, never closed",
    "implicit VR on an explicit context", "empty dataset", "random bytes",
    "file meta elements in the dataset", "wrong group length", "bogus character set",
    "Rows and Columns 0", "bits allocated absurd",
)  # fmt: skip


def dataset(rng: random.Random, seeds: Seeds, number: int) -> Draft:
    """A valid C-STORE-RQ whose dataset has one thing broken, then a release."""
    ds = seeds.dataset(number)
    uid = str(ds.SOPInstanceUID)
    kind = rng.choice(DATASET_MUTATIONS)
    if kind == "Rows and Columns 0":
        ds.Rows = ds.Columns = 0
    elif kind == "bits allocated absurd":
        ds.BitsAllocated = rng.choice([0, 1, 7, 64, 0xFFFF])
    elif kind == "non-ASCII UID":
        ds.StudyInstanceUID = "1.2.\u00e9"
    elif kind == "UID of 200 characters":
        ds.SeriesInstanceUID = "1." * 100
    data = m.dataset_bytes(ds, implicit=kind == "implicit VR on an explicit context")
    elements = explicit_elements(data) if kind != "implicit VR on an explicit context" else []
    pixel = next((e for e in elements if e.tag == PIXEL_DATA), None)
    plain = [e for e in elements if e.tag != PIXEL_DATA]
    element = rng.choice(plain) if plain else None
    note = ""
    if element is not None:
        note = f"({element.tag >> 16:04X},{element.tag & 0xFFFF:04X})"
        length = element.end - element.length_at - element.length_size
        if kind == "element length +k":
            data = _set_length(data, element, length + rng.randint(1, 9))
        elif kind == "element length -k":
            data = _set_length(data, element, length - rng.randint(1, 9))
        elif kind == "odd length":
            data = _set_length(data, element, length + 1)
        elif kind == "length past the end":
            data = _set_length(data, element, len(data) - element.start + rng.randint(1, 1000))
        elif kind == "undefined length on a plain element":
            data = _set_length(data, element, UNDEFINED)
        elif kind == "VR garbage":
            at = element.start + _TAG.size
            data = (
                data[:at] + rng.choice([b"??", b"\x00\x00", b"ob", b"SQ", b"UN"]) + data[at + 2 :]
            )
        elif kind == "elements out of order":
            other = rng.choice(plain)
            a, b = sorted((element, other), key=lambda e: e.start)
            if a is not b:
                data = (data[: a.start] + data[b.start : b.end] + data[a.end : b.start]
                        + data[a.start : a.end] + data[b.end :])  # fmt: skip
        elif kind == "duplicate element":
            data = data[: element.end] + data[element.start : element.end] + data[element.end :]
    required = [e for e in elements if e.tag in REQUIRED]
    if kind == "required attribute removed" and required:
        gone = rng.choice(required)
        data = data[: gone.start] + data[gone.end :]
        note = f"({gone.tag >> 16:04X},{gone.tag & 0xFFFF:04X})"
    elif kind == "instance UID differs from the command":
        uid = generate_uid(entropy_srcs=[seeds.tag, "other", str(number)])
    elif kind in PIXEL_MUTATIONS and pixel is not None:
        if kind == "huge claimed pixel data size":
            data = _set_length(data, pixel, rng.choice([0xFFFFFFF0, 0x7FFFFFFE, 0x10000000]))
        elif kind == "pixel data of undefined length without items":
            data = _set_length(data, pixel, UNDEFINED)
        else:
            short = rng.randrange(0, pixel.end - pixel.length_at - 4, 2)
            data = _set_length(data[: pixel.length_at + 4 + short], pixel, short)
    elif kind == "dataset cut":
        cut = rng.randrange(1, len(data))
        data, note = data[:cut], f"at {cut} of {len(data)}"
    elif kind in ("sequence of undefined length never ends", "item of undefined length never ends",
                  "item length past its sequence", "sequences nested deep",
                  "sequences nested deep, never closed"):  # fmt: skip
        at = pixel.start if pixel is not None else len(data)
        data = data[:at] + _sequence(rng, kind) + data[at:]
    elif kind == "empty dataset":
        data = b""
    elif kind == "random bytes":
        data = rng.randbytes(rng.randint(1, 2048))
    elif kind == "wrong group length":
        value = struct.pack("<L", rng.choice([0, 7, 0xFFFFFFFF]))
        data = _short_element(0x0008, 0x0000, b"UL", value) + data
    elif kind == "file meta elements in the dataset":
        data = _short_element(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1\x00") + data
    elif kind == "bogus character set":
        charset = rng.choice([b"ISO_IR 999", b"ISO 2022 IR 87\\", b"\x1b$B  "])
        replaced = (0x00080005, 0x00100010)
        kept = b"".join(data[e.start : e.end] for e in elements if e.tag not in replaced)
        data = _sorted_raw(
            kept
            + _short_element(0x0008, 0x0005, b"CS", charset.ljust(len(charset) + len(charset) % 2))
            + _short_element(0x0010, 0x0010, b"PN", b"Fuzz^\x1b$B;3ED\x1b(B\xff\xfe")
        )
    command = store_command(uid, 1 + number % 0xFFFF)
    payload = fragments(m.CT_CONTEXT, True, command, [])
    if data:
        payload += fragments(m.CT_CONTEXT, False, data, random_split(rng, len(data)))
    else:
        payload += m.pdu_bytes(
            pdu.PDUType.P_DATA_TF, struct.pack(">LBB", 2, m.CT_CONTEXT, pdu.MCH_LAST)
        )
    return Draft(kind, seeds.associated, payload + RELEASE, note=note)


def _sorted_raw(data: bytes) -> bytes:
    """Top-level elements of ``data`` in ascending tag order."""
    elements = sorted(explicit_elements(data), key=lambda e: e.tag)
    return b"".join(data[e.start : e.end] for e in elements)


def _sequence(rng: random.Random, kind: str) -> bytes:
    inner = _short_element(0x0040, 0xA040, b"CS", b"TEXT")
    if kind == "sequence of undefined length never ends":
        return _sequence_header() + _item(ITEM, len(inner)) + inner
    if kind == "item of undefined length never ends":
        return _sequence_header(_ITEM.size + len(inner)) + _item(ITEM, UNDEFINED) + inner
    if kind == "item length past its sequence":
        return (
            _sequence_header(_ITEM.size + len(inner))
            + _item(ITEM, rng.randint(100, 0xFFFFFF))
            + inner
        )
    depth = rng.choice([10, 100, 500, 2000])
    return _nested(depth, closed=kind == "sequences nested deep")
