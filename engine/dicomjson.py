"""The DICOM JSON model (PS3.18 annex F) of an encoded dataset, read without pydicom (hot path).

WADO-RS /metadata answers for thousands of instances at once from the headers kept in
the index, so each header must become JSON in a few tens of microseconds; building a
pydicom ``Dataset`` and calling ``to_json_dict`` costs over ten times that. ``dataset_json``
walks the raw little-endian elements itself (explicit or implicit VR, nested sequences
of defined or undefined length) and converts each value the way pydicom 3 does.

pydicom is the reference: for the same bytes the result equals
``read_dataset(...).to_json_dict()`` (bulk data aside, see ``dataset_json``). Rule 1 of
this file: the fast path only answers when it is sure of giving pydicom's answer. For
anything it does not copy exactly (big endian, deflate, a value running past its end,
an unknown VR, a number pydicom would coerce, text in a character set other than
Latin-1 or UTF-8, an ambiguous VR it cannot resolve the same way, deep nesting, pydicom
settings changed from their defaults, ...) it raises ``_Fallback`` and pydicom reads the
dataset, so the result is always pydicom's, slow or fast.
"""

from __future__ import annotations

import binascii
import logging
import struct
import zlib
from bisect import bisect_right
from collections.abc import Callable
from functools import lru_cache
from io import BytesIO
from typing import Any, Final

from pydicom import config
from pydicom._dicom_dict import DicomDictionary
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, private_dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.filewriter import (  # private, but the exact sets the oracle uses
    _AMBIGUOUS_OB_OW_TAGS,
    _AMBIGUOUS_US_SS_TAGS,
    _OVERLAY_DATA_TAGS,
)
from pydicom.hooks import hooks, raw_element_value, raw_element_vr
from pydicom.tag import _LUT_DESCRIPTOR_TAGS as _PYDICOM_LUT_DESCRIPTOR_TAGS
from pydicom.uid import UID
from pydicom.valuerep import AMBIGUOUS_VR, BYTES_VR, VR

log = logging.getLogger(__name__)

# Binary values longer than this (in bytes) become a BulkDataURI when a base URI is given.
BULK_DATA_THRESHOLD: Final = 1024
# Nesting deeper than this is not a real header: leave it to pydicom.
MAX_DEPTH: Final = 16

UNDEFINED_LENGTH: Final = 0xFFFFFFFF
ITEM: Final = 0xFFFEE000
ITEM_DELIMITATION: Final = 0xFFFEE00D
SEQUENCE_DELIMITATION: Final = 0xFFFEE0DD
DELIMITER_GROUP: Final = 0xFFFE
SPECIFIC_CHARACTER_SET: Final = 0x00080005
PIXEL_REPRESENTATION_KEY: Final = "00280103"
PIXEL_DATA: Final = 0x7FE00010
PIXEL_DATA_KEY: Final = "7FE00010"
# PS3.5 7.8.1: (gggg,0010-00FF) of an odd group reserve blocks; (gggg,xx00-xxFF) use them.
PRIVATE_CREATOR_FIRST: Final = 0x0010
PRIVATE_CREATOR_LAST: Final = 0x00FF
PRIVATE_BLOCK_SHIFT: Final = 8
# pydicom keeps a known tag's explicit UN only when its length does not fit 16 bits.
UN_REPLACED_BELOW: Final = 0xFFFF
# Integers beyond this lose precision as floats; pydicom's IS then goes through a float.
EXACT_FLOAT_INTEGER: Final = 2**53
# A VR byte is a capital letter (pydicom's test for an explicit VR, PS3.5 6.2).
VR_BYTE_MIN: Final = 0x41
VR_BYTE_MAX: Final = 0x5A
VR_OFFSET: Final = 4  # the VR follows the 4-byte tag
VR_END: Final = 6

_IMPLICIT_HEADER = struct.Struct("<HHL")  # also item and delimiter headers
_EXPLICIT_HEADER = struct.Struct("<HH2sH")
_U32 = struct.Struct("<L")
_LONG_HEADER: Final = 12  # explicit VR with a 4-byte length (PS3.5 table 7.1-1)
_SHORT_HEADER: Final = 8
_TO_DELIMITER: Final = -1  # the end of an undefined-length item: its delimitation

# Explicit VRs with a 2-byte reserved field and a 4-byte length.
_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
# What pydicom's to_json_dict treats as binary (resolved or not).
_PYDICOM_BINARY_VRS = frozenset(str(vr) for vr in (BYTES_VR | AMBIGUOUS_VR) - {VR.US_SS})
_AMBIGUOUS_VRS = frozenset(str(vr) for vr in AMBIGUOUS_VR)

# The tags pydicom's ambiguous-VR correction knows, its own sets so as to follow it:
# 'OB or OW' that is OW in implicit VR (waveform and overlay data), and 'US or SS'
# settled by the Pixel Representation. The LUT descriptors are left to pydicom: it keeps
# the first value of an SS one unsigned on one path and not on another.
_IMPLICIT_OW_TAGS = frozenset(_AMBIGUOUS_OB_OW_TAGS | _OVERLAY_DATA_TAGS)
_LUT_DESCRIPTOR_TAGS = frozenset(_PYDICOM_LUT_DESCRIPTOR_TAGS)
_US_OR_SS_TAGS = frozenset(_AMBIGUOUS_US_SS_TAGS) - _LUT_DESCRIPTOR_TAGS
# Marks an implicit 'US or SS' value decided once the whole dataset is read.
_US_OR_SS: Final = "US or SS"

_LATIN_1: Final = "latin-1"
_UTF_8: Final = "utf-8"
# (0008,0005) values whose text the fast path decodes; pydicom reads '' and ISO_IR 6 as
# its default, ISO 8859-1 too. Any other character set: ASCII text only.
_CODECS: Final = {
    b"": _LATIN_1,
    b"ISO_IR 6": _LATIN_1,
    b"ISO_IR 100": _LATIN_1,
    b"ISO_IR 192": _UTF_8,
}
_ESC: Final = b"\x1b"  # ISO 2022 code extensions: pydicom's own decoder
# PS3.18 F.2.2: the JSON names of a person name's component groups, in their order.
_PN_GROUPS: Final = ("Alphabetic", "Ideographic", "Phonetic")
_AT_SIZE: Final = 4  # group and element, 2 bytes each

# JSON keys by tag: the dictionary's made once, others (private tags) as they come, up
# to a bound (a cache: races between threads only make a key twice).
_KEYS = {tag: f"{tag:08X}" for tag in DicomDictionary}
_KEYS_MAX: Final = 2 * len(_KEYS)


class _Fallback(Exception):
    """Not for the fast path: pydicom reads the dataset."""


def dataset_json(
    data: bytes, transfer_syntax: str, bulk_data_uri: str | None = None
) -> dict[str, Any]:
    """DICOM JSON object of the dataset in ``data`` (no file meta; may end before the pixel
    data, i.e. be cut at an element boundary).

    Equal to pydicom's ``read_dataset(...).to_json_dict()``, except for bulk data: when
    ``bulk_data_uri`` is given, a top-level binary value (OB, OD, OF, OL, OV, OW, UN, the
    pixel data included) longer than ``BULK_DATA_THRESHOLD`` bytes is
    ``{"vr": ..., "BulkDataURI": f"{bulk_data_uri}/{tag:08X}"}``; nested binary values are
    always inline, since a tag alone does not name them. (pydicom compares a threshold
    to three quarters of the base64 length and calls its handler at every depth.)

    Raises ValueError for a transfer syntax pydicom does not know, and whatever pydicom
    raises for a dataset it cannot read.
    """
    syntax = _syntax(transfer_syntax)
    if syntax.is_little_endian and not syntax.is_deflated and _pydicom_as_copied():
        try:
            return _Reader(data, syntax.is_implicit_VR, bulk_data_uri).top()
        except (_Fallback, struct.error, ValueError) as exc:
            log.debug("dataset left to pydicom for its JSON (%s: %s)", type(exc).__name__, exc)
    return _pydicom_json(data, syntax, bulk_data_uri)


@lru_cache(maxsize=64)
def _syntax(transfer_syntax: str) -> UID:
    syntax = UID(transfer_syntax)
    if not syntax.is_transfer_syntax:
        raise ValueError(f"unknown transfer syntax {transfer_syntax!r}")
    return syntax


def _pydicom_as_copied() -> bool:
    """pydicom's settings are the defaults the fast path copies (any validation mode but
    RAISE, which turns into errors what the defaults only warn about)."""
    return bool(
        config.settings.reading_validation_mode != config.RAISE
        and not config.datetime_conversion
        and not config.use_DS_numpy
        and not config.use_IS_numpy
        and not config.use_DS_decimal
        and config.replace_un_with_known_vr
        and config.data_element_callback is None
        and hooks.raw_element_vr is raw_element_vr
        and hooks.raw_element_value is raw_element_value
        and not hooks.raw_element_kwargs
    )


# ---------------------------------------------------------------- pydicom's way


def _pydicom_json(data: bytes, syntax: UID, bulk_data_uri: str | None) -> dict[str, Any]:
    if syntax.is_deflated:
        data = _inflated(data)
    ds = read_dataset(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)
    return _json_of(ds, bulk_data_uri)


def _inflated(data: bytes) -> bytes:
    """The dataset of a deflated syntax: a stored file holds it deflated, but a dataset
    re-encoded by pydicom's ``write_dataset`` (WADO does so for a file without a kept
    header) is not; a plain dataset is not a complete deflate stream."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data) + inflater.flush()
    except zlib.error:
        return data
    return inflated if inflater.eof and not inflater.unused_data else data


def _json_of(ds: Dataset, bulk_data_uri: str | None) -> dict[str, Any]:
    """``ds.to_json_dict()`` with this module's bulk data rule (top level only)."""
    result: dict[str, Any] = {}
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset gives elements, not tags
        key = f"{tag:08X}"
        element = ds[tag]
        if (
            bulk_data_uri is not None
            and element.VR in _PYDICOM_BINARY_VRS
            and not element.is_empty
            and len(element.value) > BULK_DATA_THRESHOLD
        ):
            result[key] = {"vr": element.VR, "BulkDataURI": f"{bulk_data_uri}/{key}"}
        else:
            result[key] = element.to_json_dict(None, BULK_DATA_THRESHOLD)
    return result


# ---------------------------------------------------------------- value converters
#
# Each takes a value's bytes (never empty) and the text codec, and returns the JSON
# "Value" list, or None when pydicom finds no value (VM 0). Each copies the pydicom 3
# converter named in its docstring, then DataElement.to_json_dict on the result. A
# ValueError (a number that does not parse, invalid UTF-8) means: pydicom's way.

_Converter = Callable[[bytes, "str | None"], "list[Any] | None"]


def _decode(raw: bytes, codec: str | None) -> str:
    """Text of a VR that uses (0008,0005) (``pydicom.charset.decode_bytes``)."""
    if _ESC in raw:
        raise _Fallback("ISO 2022 escape sequence")
    if raw.isascii():
        return raw.decode("ascii")
    if codec is None:
        raise _Fallback("non-ASCII text in a character set the fast path does not decode")
    return raw.decode(codec)  # invalid UTF-8: pydicom replaces with a warning


def _strings(raw: bytes, codec: str | None) -> list[Any] | None:
    """AS, CS, DA, DT, TM: ``convert_string`` (pydicom converts no dates by default)."""
    text = raw.decode(_LATIN_1).rstrip(" \x00")
    return text.split("\\") if text else None


def _uids(raw: bytes, codec: str | None) -> list[Any] | None:
    """UI: ``convert_UI``, then ``UID`` strips each value of white space."""
    text = raw.decode(_LATIN_1).rstrip(" \x00")
    if not text:
        return None
    if "\\" not in text:
        text = text.strip()
        return [text] if text else None
    return [value.strip() for value in text.split("\\")]


def _application_entities(raw: bytes, codec: str | None) -> list[Any] | None:
    """AE: ``convert_AE_string``, leading and trailing spaces are not significant."""
    values = [value.strip() for value in raw.decode(_LATIN_1).split("\\")]
    return None if len(values) == 1 and not values[0] else values


def _uri(raw: bytes, codec: str | None) -> list[Any] | None:
    """UR: ``convert_UR_string``, one value."""
    text = raw.decode(_LATIN_1).rstrip()
    return [text] if text else None


def _decimals(raw: bytes, codec: str | None) -> list[Any] | None:
    """DS: ``convert_DS_string`` then ``DSfloat``, which is ``float`` of each string; a
    blank value among others makes pydicom fail: ValueError here too."""
    text = raw.decode(_LATIN_1).strip().rstrip(" \x00")
    return list(map(float, text.split("\\"))) if text else None


def _integers(raw: bytes, codec: str | None) -> list[Any] | None:
    """IS: ``convert_IS_string`` then ``IS``; a string ``int`` refuses ("1.0", "1.5") or
    an integer a float cannot hold is one pydicom coerces through a float."""
    text = raw.decode(_LATIN_1).rstrip(" \x00")
    if not text:
        return None
    values = list(map(int, text.split("\\")))
    for value in values:
        if not -EXACT_FLOAT_INTEGER <= value <= EXACT_FLOAT_INTEGER:
            raise _Fallback("IS beyond a float's precision")
    return values


def _texts(raw: bytes, codec: str | None) -> list[Any] | None:
    """SH, LO, UC: ``convert_text``, trailing spaces and NULs removed from each value."""
    text = _decode(raw, codec)
    if "\\" not in text:
        text = text.rstrip("\x00 ")
        return [text] if text else None
    return [value.rstrip("\x00 ") for value in text.split("\\")]


def _text(raw: bytes, codec: str | None) -> list[Any] | None:
    """ST, LT, UT: ``convert_single_string``, one value, backslashes kept."""
    text = _decode(raw, codec).rstrip("\x00 ")
    return [text] if text else None


def _person_names(raw: bytes, codec: str | None) -> list[Any] | None:
    """PN: ``convert_PN`` and ``PersonName``: component groups split on '=', empty
    trailing groups dropped; a name with no group among others breaks pydicom."""
    raw = raw.rstrip(b"\x00 ")
    if not raw:
        return None
    names = _decode(raw, codec).split("\\")
    values: list[Any] = []
    for name in names:
        groups = name.split("=")
        while groups and not groups[-1]:
            groups.pop()
        if not groups:
            if len(names) == 1:
                return None
            raise _Fallback("empty person name among others")
        values.append(dict(zip(_PN_GROUPS, groups, strict=False)))
    return values


def _tags(raw: bytes, codec: str | None) -> list[Any] | None:
    """AT: ``convert_ATvalue``; a length not a multiple of 4 is pydicom's to judge."""
    count, rest = divmod(len(raw), _AT_SIZE)
    if rest:
        raise _Fallback("AT length")
    words = struct.unpack(f"<{2 * count}H", raw)
    return [f"{words[i] << 16 | words[i + 1]:08X}" for i in range(0, 2 * count, 2)]


def _numbers(code: str) -> _Converter:
    """US, SS, UL, SL, FL, FD, SV, UV: ``convert_numbers``; a length that is not a
    multiple of the size is an error pydicom reports."""
    one = struct.Struct("<" + code)
    size = one.size

    def convert(raw: bytes, codec: str | None) -> list[Any] | None:
        length = len(raw)
        if length == size:
            return [one.unpack(raw)[0]]
        if length % size:
            raise _Fallback("number length")
        return list(struct.unpack(f"<{length // size}{code}", raw))

    return convert


# struct codes of the number VRs (PS3.5 table 6.2-1)
_NUMBER_CODES: Final = dict(FD="d", FL="f", SL="l", SS="h", SV="q", UL="L", US="H", UV="Q")
_CONVERTERS: dict[str, _Converter] = {
    **{vr: _numbers(code) for vr, code in _NUMBER_CODES.items()},
    "AE": _application_entities,
    "AS": _strings,
    "AT": _tags,
    "CS": _strings,
    "DA": _strings,
    "DS": _decimals,
    "DT": _strings,
    "IS": _integers,
    "LO": _texts,
    "LT": _text,
    "PN": _person_names,
    "SH": _texts,
    "ST": _text,
    "TM": _strings,
    "UC": _texts,
    "UI": _uids,
    "UR": _uri,
    "UT": _text,
}

# What the walk needs of a VR: its name, its converter (None: sequence, binary, UN or
# an implicit 'US or SS', see ``_Reader.element``), whether an explicit VR element has
# a 4-byte length, and for a number VR the struct of one value (read in place, as most
# number elements have one).
_Entry = tuple[str, _Converter | None, bool, struct.Struct | None]
_ENTRIES: dict[str, _Entry] = {
    vr: (
        vr,
        _CONVERTERS.get(vr),
        vr in _LONG_VRS,
        struct.Struct("<" + _NUMBER_CODES[vr]) if vr in _NUMBER_CODES else None,
    )
    for vr in (*_CONVERTERS, *_BINARY_VRS, "SQ", _US_OR_SS)
}
_EXPLICIT_ENTRIES = {vr.encode(): entry for vr, entry in _ENTRIES.items() if vr != _US_OR_SS}
# Implicit VR: the public dictionary's plain VRs; the rest takes ``_Reader.implicit_entry``.
_PUBLIC_ENTRIES = {
    tag: _ENTRIES[entry[0]]
    for tag, entry in DicomDictionary.items()
    if entry[0] in _ENTRIES and entry[0] != _US_OR_SS
}
# Tags the walk looks at on its way (``_Reader.watched``), in order; the last one no
# tag reaches.
_WATCHED = (
    SPECIFIC_CHARACTER_SET,
    *sorted(_LUT_DESCRIPTOR_TAGS),
    DELIMITER_GROUP << 16,
    1 << 32,
)


def _key(tag: int) -> str:
    key = _KEYS.get(tag)
    if key is None:
        key = f"{tag:08X}"
        if len(_KEYS) < _KEYS_MAX:
            _KEYS[tag] = key
    return key


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    """pydicom's dictionary VR of a tag (repeating groups included), None if unknown."""
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


@lru_cache(maxsize=4096)
def _private_dictionary_vr(tag: int, creator: str) -> str | None:
    try:
        return str(private_dictionary_VR(tag, creator))
    except KeyError:
        return None


def _private_vr(group: int, element: int, out: dict[str, Any]) -> str:
    """VR of a private element without one, as ``pydicom.hooks._private_vr_for_tag``:
    its creator is an element of the same dataset, already in ``out``."""
    if PRIVATE_CREATOR_FIRST <= element <= PRIVATE_CREATOR_LAST:
        return "LO"
    if element >> PRIVATE_BLOCK_SHIFT:
        found = out.get(_key(group << 16 | element >> PRIVATE_BLOCK_SHIFT))
        if found is not None:
            values = found.get("Value")
            if values is None:
                creator = ""  # in no private dictionary
            elif len(values) == 1 and isinstance(values[0], str):
                creator = values[0]
            else:
                raise _Fallback("private creator not one text value")
            vr = _private_dictionary_vr(group << 16 | element, creator)
            if vr is not None:
                return vr
    return "UN"


def _codec(value: bytes) -> str | None:
    """The codec of a (0008,0005) value, None if not one of ``_CODECS``; a character set
    pydicom does not know is its to judge (it may fail on it)."""
    value = value.rstrip(b" \x00")
    codec = _CODECS.get(value)
    if codec is None and not all(
        name in python_encoding for name in value.decode(_LATIN_1).split("\\")
    ):
        raise _Fallback("a character set pydicom does not know")
    return codec


# ---------------------------------------------------------------- the walk


class _Reader:
    """One dataset's walk. ``codec`` decodes text VRs: None until (0008,0005) is passed
    (only ASCII is certain then), and for a character set other than in ``_CODECS``."""

    __slots__ = ("bulk_data_uri", "codec", "data", "implicit", "pending")

    def __init__(self, data: bytes, implicit: bool, bulk_data_uri: str | None) -> None:
        self.data = data
        self.implicit = implicit
        self.bulk_data_uri = bulk_data_uri
        self.codec: str | None = None
        self.pending: list[tuple[str, bytes]] = []  # implicit 'US or SS', top level

    def top(self) -> dict[str, Any]:
        data = self.data
        if (
            self.implicit
            and len(data) >= VR_END
            and VR_BYTE_MIN <= data[VR_OFFSET] <= VR_BYTE_MAX
            and VR_BYTE_MIN <= data[VR_OFFSET + 1] <= VR_BYTE_MAX
        ):
            raise _Fallback("implicit VR declared, explicit VR found")  # pydicom switches
        result, _ = self.dataset(0, len(data), 0)
        if self.pending:
            _resolve_us_or_ss(result, self.pending)
        return result

    def dataset(self, pos: int, end: int, depth: int) -> tuple[dict[str, Any], int]:
        """The elements from ``pos`` to ``end`` (``_TO_DELIMITER``: to an item
        delimitation), and the position after them. The hot loop: common elements
        take the first path, the rest ``watched`` and ``element``."""
        data = self.data
        implicit = self.implicit
        codec = self.codec
        limit = len(data) if end == _TO_DELIMITER else end
        out: dict[str, Any] = {}
        previous = -1
        watch = SPECIFIC_CHARACTER_SET
        while pos < limit:
            if implicit:
                group, element, length = _IMPLICIT_HEADER.unpack_from(data, pos)
                raw_vr = b""
            else:
                group, element, raw_vr, length = _EXPLICIT_HEADER.unpack_from(data, pos)
            value_at = pos + _SHORT_HEADER
            tag = group << 16 | element
            if tag <= previous:
                raise _Fallback("tags out of order")
            previous = tag
            if tag >= watch:
                if group == DELIMITER_GROUP:
                    if tag == ITEM_DELIMITATION and end == _TO_DELIMITER:
                        return out, value_at
                    raise _Fallback(f"delimiter {tag:08X} among elements")
                codec = self.watched(tag, watch, raw_vr, data[value_at : value_at + length], depth)
                watch = _WATCHED[bisect_right(_WATCHED, tag)]
            entry: _Entry | None
            if implicit:
                entry = _PUBLIC_ENTRIES.get(tag) or self.implicit_entry(
                    tag, group, element, length, depth, out
                )
            else:
                entry = _EXPLICIT_ENTRIES.get(raw_vr)
                if entry is None:
                    raise _Fallback(f"VR {raw_vr!r}")
                if entry[2]:
                    (length,) = _U32.unpack_from(data, value_at)
                    value_at += _LONG_HEADER - _SHORT_HEADER
            vr, convert, _, number = entry
            value_end = value_at + length
            if convert is None or value_end > limit:
                pos = self.element(out, tag, vr, length, value_at, limit, depth)
                continue
            values: list[Any] | None
            if number is not None and length == number.size:
                values = [number.unpack_from(data, value_at)[0]]
            elif length:
                values = convert(data[value_at:value_end], codec)
            else:
                values = None
            out[_KEYS.get(tag) or _key(tag)] = {"vr": vr, "Value": values} if values else {"vr": vr}
            pos = value_end
        if end == _TO_DELIMITER:
            raise _Fallback("item without delimitation")
        if pos != end:
            raise _Fallback("elements do not fill the item")
        return out, pos

    def watched(self, tag: int, watch: int, raw_vr: bytes, value: bytes, depth: int) -> str | None:
        """The character set when the walk reaches or passes (0008,0005) (none: pydicom's
        default); an SS LUT descriptor is pydicom's. Returns the text codec."""
        if watch == SPECIFIC_CHARACTER_SET:
            if tag == SPECIFIC_CHARACTER_SET:
                if depth or raw_vr not in {b"", b"CS"}:
                    raise _Fallback("character set in an item, or not CS")
                self.codec = _codec(value)
            elif not depth:
                self.codec = _LATIN_1
        elif raw_vr == b"SS" and tag in _LUT_DESCRIPTOR_TAGS:
            raise _Fallback("SS LUT descriptor")
        return self.codec

    def element(
        self,
        out: dict[str, Any],
        tag: int,
        vr: str,
        length: int,
        value_at: int,
        limit: int,
        depth: int,
    ) -> int:
        """Put in ``out`` an element the hot loop does not convert: a sequence, a binary
        value, an explicit UN, an implicit 'US or SS', or one of undefined length or
        running past its end. Returns the position after it."""
        data = self.data
        key = _key(tag)
        if length == UNDEFINED_LENGTH:
            if vr == "SQ" or (self.implicit and self.is_sequence(tag, value_at)):
                items, after = self.sequence(value_at, UNDEFINED_LENGTH, depth + 1)
                out[key] = {"vr": "SQ", "Value": items}
                return after
            if tag != PIXEL_DATA or vr not in {"OB", "OW"}:
                raise _Fallback(f"undefined length {vr} {tag:08X}")
            value_end = self.encapsulated_end(value_at)
            after = value_end + _SHORT_HEADER
        else:
            value_end = after = value_at + length
            if value_end > limit:
                raise _Fallback(f"element {tag:08X} runs past its end")
        if vr == "UN" and not self.implicit:
            vr = self.un_vr(tag, length, out)
            convert = _CONVERTERS.get(vr)
            if convert is not None:
                values = convert(data[value_at:value_end], self.codec) if length else None
                out[key] = {"vr": vr, "Value": values} if values else {"vr": vr}
                return after
        if vr in _BINARY_VRS:
            size = value_end - value_at
            if not size:
                out[key] = {"vr": vr}
            elif not depth and self.bulk_data_uri is not None and size > BULK_DATA_THRESHOLD:
                out[key] = {"vr": vr, "BulkDataURI": f"{self.bulk_data_uri}/{key}"}
            else:
                inline = binascii.b2a_base64(data[value_at:value_end], newline=False)
                out[key] = {"vr": vr, "InlineBinary": inline.decode("ascii")}
        elif vr == "SQ":
            items, pos = self.sequence(value_at, length, depth + 1)
            if pos != value_end:
                raise _Fallback("sequence items do not fill its length")
            out[key] = {"vr": "SQ", "Value": items}
        elif vr == _US_OR_SS:
            out[key] = {"vr": vr}  # settled once the dataset is read, in place for the order
            self.pending.append((key, data[value_at:value_end]))
        else:
            raise _Fallback(f"VR {vr}")
        return after

    def implicit_entry(
        self, tag: int, group: int, element: int, length: int, depth: int, out: dict[str, Any]
    ) -> _Entry:
        """An implicit VR element's VR beyond the plain public dictionary, as pydicom's
        ``raw_element_vr`` hook finds it and its ambiguous-VR correction settles it."""
        vr = _private_vr(group, element, out) if group & 1 else _dictionary_vr(tag)
        if vr is None:
            if element == 0:
                vr = "UL"  # group length
            else:
                raise _Fallback(f"tag {tag:08X} not in the dictionary")
        elif vr == "OB or OW":
            if tag == PIXEL_DATA:
                vr = "OB" if length == UNDEFINED_LENGTH else "OW"
            elif tag in _IMPLICIT_OW_TAGS:
                vr = "OW"
        elif vr == _US_OR_SS and (depth or tag not in _US_OR_SS_TAGS):
            raise _Fallback(f"ambiguous VR of {tag:08X}")
        entry = _ENTRIES.get(vr)
        if entry is None:
            raise _Fallback(f"VR {vr} of {tag:08X}")
        return entry

    def un_vr(self, tag: int, length: int, out: dict[str, Any]) -> str:
        """The VR pydicom gives an explicit UN element (``config.replace_un_with_known_vr``)."""
        group = tag >> 16
        if group & 1:
            vr = _private_vr(group, tag & 0xFFFF, out)
        elif length < UN_REPLACED_BELOW:
            vr = _dictionary_vr(tag) or "UN"
        else:
            vr = "UN"
        if vr == "SQ" or vr in _AMBIGUOUS_VRS:
            raise _Fallback(f"UN {tag:08X} read as {vr}")
        return vr

    def is_sequence(self, tag: int, value_at: int) -> bool:
        """An implicit element of undefined length is a sequence if its dictionary says so,
        or, unknown to it, if an item follows (pydicom's ``data_element_generator``)."""
        vr = _dictionary_vr(tag)
        if vr is not None:
            return vr == "SQ"
        group, element, _ = _IMPLICIT_HEADER.unpack_from(self.data, value_at)
        return bool(group << 16 | element == ITEM)

    def sequence(self, pos: int, length: int, depth: int) -> tuple[list[Any], int]:
        """The items of a sequence whose value starts at ``pos``, and the position after."""
        if depth > MAX_DEPTH:
            raise _Fallback("nested too deep")
        data = self.data
        end = len(data) if length == UNDEFINED_LENGTH else pos + length
        items: list[Any] = []
        while pos < end:
            group, element, item_length = _IMPLICIT_HEADER.unpack_from(data, pos)
            tag = group << 16 | element
            pos += _SHORT_HEADER
            if tag == SEQUENCE_DELIMITATION and length == UNDEFINED_LENGTH:
                return items, pos
            if tag != ITEM:
                raise _Fallback(f"{tag:08X} where an item should be")
            if item_length == UNDEFINED_LENGTH:
                item_end = _TO_DELIMITER
            else:
                item_end = pos + item_length
                if item_end > end:
                    raise _Fallback("item runs past its sequence")
            item, pos = self.dataset(pos, item_end, depth)
            items.append(item)
        if length == UNDEFINED_LENGTH:
            raise _Fallback("sequence without delimitation")
        return items, pos

    def encapsulated_end(self, pos: int) -> int:
        """Where the sequence delimitation of encapsulated pixel data starting at ``pos``
        is: after its items, as ``pydicom.fileutil._try_read_encapsulated_pixel_data``."""
        data = self.data
        size = len(data)
        while pos + _SHORT_HEADER <= size:
            group, element, length = _IMPLICIT_HEADER.unpack_from(data, pos)
            tag = group << 16 | element
            if tag == SEQUENCE_DELIMITATION:
                return pos
            if tag != ITEM:
                break
            pos += _SHORT_HEADER + length
        raise _Fallback("encapsulated pixel data without its delimitation")


def _resolve_us_or_ss(out: dict[str, Any], pending: list[tuple[str, bytes]]) -> None:
    """Implicit 'US or SS' values: US when the Pixel Representation is 0 (or there is
    neither one nor pixel data), SS otherwise, as pydicom's ambiguous-VR correction."""
    representation = out.get(PIXEL_REPRESENTATION_KEY)
    if representation is None:
        if PIXEL_DATA_KEY in out:
            raise _Fallback("pixel data without a Pixel Representation")  # pydicom fails
        unsigned = True
    else:
        values = representation.get("Value")
        if values is not None and len(values) != 1:
            raise _Fallback("Pixel Representation of several values")
        unsigned = values is not None and values[0] == 0
    vr = "US" if unsigned else "SS"
    convert = _CONVERTERS[vr]
    for key, raw in pending:
        values = convert(raw, None) if raw else None
        out[key] = {"vr": vr, "Value": values} if values else {"vr": vr}
