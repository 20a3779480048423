"""``engine/dicomjson.py`` gives what pydicom gives.

pydicom is the oracle: for the same bytes, ``dataset_json`` must equal
``read_dataset(...).to_json_dict()``, on every dataset pydicom ships as test data
(re-encoded in both little-endian VR styles, and the files' own dataset bytes), on
hand-made edge cases and on garbled bytes; where pydicom raises, ``dataset_json`` raises
the same. Outputs are compared as JSON text, which is what WADO-RS sends: that tells 1
from 1.0, keeps the key order, and compares NaN (pydicom's JSON "vr" is sometimes its
``VR`` str enum, sometimes a str: the same text, so nothing is normalised for it).

Bulk data is the one difference by design (see ``dataset_json``): pydicom compares its
threshold to three quarters of the base64 length and calls its handler at every depth;
here a top-level binary value longer than 1024 bytes gets a URI, a nested one never.
The bulk tests compare with pydicom on values far from both thresholds and at the top
level, and check the boundary and the nested case on their own.

The fast path is meant to answer the common datasets itself: a spy on the pydicom way
(``fallbacks``) shows which ones it left to pydicom.
"""

from __future__ import annotations

import base64
import json
import random
import struct
import warnings
import zlib
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import config, dcmread
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from engine import dicomjson
from engine.dicomjson import BULK_DATA_THRESHOLD, MAX_DEPTH, dataset_json

EXPLICIT = str(ExplicitVRLittleEndian)
IMPLICIT = str(ImplicitVRLittleEndian)
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
UNDEFINED = 0xFFFFFFFF
ITEM = (0xFFFE, 0xE000)
ITEM_DELIMITATION = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
SEQUENCE_DELIMITATION = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
PREAMBLE = 128
URI = "http://example.org/studies/1/series/2/instances/3/bulk"


# ---------------------------------------------------------------- encoding by hand


def element(tag: int, vr: str, value: bytes, implicit: bool = False) -> bytes:
    group, number = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHL", group, number, len(value)) + value
    if vr in LONG_VRS:
        return struct.pack("<HH2sHL", group, number, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr.encode(), len(value)) + value


def item(content: bytes, undefined: bool = False) -> bytes:
    if undefined:
        return struct.pack("<HHL", *ITEM, UNDEFINED) + content + ITEM_DELIMITATION
    return struct.pack("<HHL", *ITEM, len(content)) + content


def sequence(
    tag: int,
    items: list[bytes],
    implicit: bool = False,
    undefined: bool = False,
    undefined_items: bool = False,
) -> bytes:
    body = b"".join(item(content, undefined_items) for content in items)
    if not undefined:
        return element(tag, "SQ", body, implicit)
    group, number = tag >> 16, tag & 0xFFFF
    if implicit:
        header = struct.pack("<HHL", group, number, UNDEFINED)
    else:
        header = struct.pack("<HH2sHL", group, number, b"SQ", 0, UNDEFINED)
    return header + body + SEQUENCE_DELIMITATION


def encode(ds: Dataset, implicit: bool = False, little: bool = True) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = little
    buffer.is_implicit_VR = implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


def dataset_start(raw: bytes) -> int | None:
    """Where the dataset of a Part 10 file starts (after its meta group), None if the
    file has no preamble."""
    if raw[PREAMBLE : PREAMBLE + 4] != b"DICM":
        return None
    pos = PREAMBLE + 4
    while pos + 8 <= len(raw):
        group, _, vr, length = struct.unpack_from("<HH2sH", raw, pos)
        if group != 0x0002:
            break
        if vr.decode("latin-1") in LONG_VRS:
            (length,) = struct.unpack_from("<L", raw, pos + 8)
            pos += 12 + length
        else:
            pos += 8 + length
    return pos


# ---------------------------------------------------------------- the comparison


def as_text(result: dict[str, Any]) -> str:
    return json.dumps(result)


def pydicom_json(
    data: bytes, syntax: str = EXPLICIT, handler: Any = None, threshold: int = 1024
) -> str | type[Exception]:
    """pydicom's JSON of the dataset, or the type of what it raises."""
    uid = UID(syntax)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if uid.is_deflated:
                data = zlib.decompress(data, -zlib.MAX_WBITS)
            ds = read_dataset(BytesIO(data), uid.is_implicit_VR, uid.is_little_endian)
            return as_text(
                ds.to_json_dict(bulk_data_threshold=threshold, bulk_data_element_handler=handler)
            )
        except Exception as exc:
            return type(exc)


def our_json(data: bytes, syntax: str = EXPLICIT, uri: str | None = None) -> str | type[Exception]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pydicom way warns as pydicom does
        try:
            return as_text(dataset_json(data, syntax, uri))
        except Exception as exc:
            return type(exc)


def assert_as_pydicom(data: bytes, syntax: str = EXPLICIT) -> None:
    assert our_json(data, syntax) == pydicom_json(data, syntax)


@pytest.fixture
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The datasets ``dataset_json`` left to pydicom."""
    taken: list[bytes] = []
    pydicom_way = dicomjson._pydicom_json

    def spy(data: bytes, syntax: UID, bulk_data_uri: str | None) -> dict[str, Any]:
        taken.append(data)
        return pydicom_way(data, syntax, bulk_data_uri)

    monkeypatch.setattr(dicomjson, "_pydicom_json", spy)
    return taken


def pydicom_test_data() -> Iterator[tuple[str, bytes, str]]:
    """Every pydicom test file that reads: without its pixel data in explicit and in
    implicit VR little endian, and its own dataset bytes (pixel data included) when its
    syntax is little endian and not deflated."""
    for path in get_testdata_files():
        name = Path(path).name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = dcmread(path, force=True)
            except Exception:
                continue
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            raw = Path(path).read_bytes()
            start = dataset_start(raw)
            if (
                start is not None
                and syntax is not None
                and syntax.is_transfer_syntax
                and syntax.is_little_endian
                and not syntax.is_deflated
            ):
                yield f"{name} as stored", raw[start:], str(syntax)
            if "PixelData" in ds:
                del ds.PixelData
            for implicit, variant in ((False, EXPLICIT), (True, IMPLICIT)):
                try:
                    data = encode(ds, implicit)
                except Exception:
                    continue  # pydicom cannot write it (values of the wrong type)
                yield f"{name} {'implicit' if implicit else 'explicit'}", data, variant


# ---------------------------------------------------------------- pydicom's test files


def test_every_pydicom_test_file(fallbacks: list[bytes]) -> None:
    mismatches = []
    answered = tried = 0
    for name, data, syntax in pydicom_test_data():
        tried += 1
        before = len(fallbacks)
        if our_json(data, syntax) != pydicom_json(data, syntax):
            mismatches.append(name)
        answered += len(fallbacks) == before
    assert not mismatches
    assert tried > 400
    # Most of them are plain datasets the fast path answers itself.
    assert answered > 0.85 * tried, (answered, tried)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm"])
@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT])
def test_common_datasets_take_the_fast_path(name: str, syntax: str, fallbacks: list[bytes]) -> None:
    path = get_testdata_file(name)
    assert path is not None
    ds = dcmread(path, stop_before_pixels=True)
    data = encode(ds, syntax == IMPLICIT)
    assert_as_pydicom(data, syntax)
    assert not fallbacks


def test_encapsulated_pixel_data_as_stored(fallbacks: list[bytes]) -> None:
    """A compressed file's own dataset: the pixel data's fragments inline, or a URI."""
    path = get_testdata_file("MR_small_RLE.dcm")
    assert path is not None
    raw = Path(path).read_bytes()
    start = dataset_start(raw)
    assert start is not None
    syntax = str(dcmread(path).file_meta.TransferSyntaxUID)
    data = raw[start:]
    assert_as_pydicom(data, syntax)
    result = dataset_json(data, syntax, URI)
    assert result["7FE00010"] == {"vr": "OB", "BulkDataURI": f"{URI}/7FE00010"}
    assert not fallbacks


# ---------------------------------------------------------------- hand-made datasets


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("undefined", [False, True])
def test_nested_sequences(implicit: bool, undefined: bool, fallbacks: list[bytes]) -> None:
    def e(tag: int, vr: str, value: bytes) -> bytes:
        return element(tag, vr, value, implicit)

    innermost = e(0x00080100, "SH", b"T-D1100 ") + e(0x00080102, "SH", b"SRT ")
    middle = e(0x00081150, "UI", b"1.2.840.10008.5.1.4.1.1.2\x00") + sequence(
        0x00082218, [innermost, b""], implicit, undefined, undefined
    )
    outer = [middle, e(0x00081155, "UI", b"1.2.3.4\x00")]
    data = (
        e(0x00080060, "CS", b"CT")
        + sequence(0x00081115, outer, implicit, undefined, undefined)
        + sequence(0x00081140, [], implicit, undefined, undefined)
        + e(0x00100010, "PN", b"Doe^John")
    )
    syntax = IMPLICIT if implicit else EXPLICIT
    assert_as_pydicom(data, syntax)
    assert not fallbacks
    result = dataset_json(data, syntax)
    assert result["00081140"] == {"vr": "SQ", "Value": []}
    assert result["00081115"]["Value"][0]["00082218"]["Value"][1] == {}


@pytest.mark.parametrize("implicit", [False, True])
def test_nested_sequences_written_by_pydicom(implicit: bool, fallbacks: list[bytes]) -> None:
    code = Dataset()
    code.CodeValue = "113691"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "IEC Body Dosimetry Phantom"
    step = Dataset()
    step.PerformedProcedureCodeSequence = Sequence([code, code])
    step.ReferencedPatientPhotoSequence = Sequence([])
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.ScheduledStepAttributesSequence = Sequence([step, Dataset()])
    syntax = IMPLICIT if implicit else EXPLICIT
    assert_as_pydicom(encode(ds, implicit), syntax)
    assert not fallbacks


@pytest.mark.parametrize("implicit", [False, True])
def test_values(implicit: bool, fallbacks: list[bytes]) -> None:
    """PN with its three groups, multi-valued DS and IS, padding, empty values."""
    elements = [
        (0x00080005, "CS", b"ISO_IR 192"),
        (0x00080020, "DA", b""),
        (0x00080054, "AE", b" STORE1 \\ STORE2 "),
        (0x00080060, "CS", b" CT\\MR "),
        (0x00080090, "PN", b""),
        (0x00081030, "LO", b" Chest \\ CT\\"),
        (0x00081190, "UR", b"http://example.org/a  "),
        (0x00100010, "PN", "山田^太郎=やまだ^たろう=Yamada^Tarou".encode()),
        (0x00100020, "LO", b"  "),
        (0x00101002, "SQ", b""),
        (0x00104000, "LT", b" line one\\line two \x00"),
        (0x00181050, "DS", b" 0.5\\-1.25e2\\+3 "),
        (0x00186028, "FD", struct.pack("<2d", 0.5, -2.25)),
        (0x00200013, "IS", b"12 "),
        (0x00200032, "DS", b"-125.0\\-125.0\\10.5"),
        (0x00201041, "DS", b"  "),
        (0x00209165, "AT", struct.pack("<4H", 0x0008, 0x0016, 0x0010, 0x0020)),
        (0x00209241, "FL", struct.pack("<f", 0.1)),
        (0x00280030, "DS", b"0.7\\0.7 "),
        (0x00280010, "US", struct.pack("<H", 512)),
        (0x00281050, "DS", b"40\\400"),
        (0x00281052, "DS", b"-1024"),
        (0x00282000, "OB", b""),
        (0x00400245, "TM", b"101010.123456 "),
        (0x00081160, "IS", b"1\\-2\\3"),
        (0x0040A162, "SL", struct.pack("<3l", 1, -2, 3)),
        (0x0008030B, "UL", b""),
        (0x00660041, "OL", struct.pack("<2L", 1, 2)),
        (0x00720082, "SV", struct.pack("<2q", -(2**40), 7)),
        (0x00720083, "UV", struct.pack("<Q", 2**63)),
        (0x0072005F, "AS", b"045Y"),
        (0x0040A13A, "DT", b"20260101101010.5+0100 "),
        (0x00160008, "UC", b"one\\two  "),
        (0x00189442, "SS", struct.pack("<4h", -1, 2, -3, 4)),
        (0x00720028, "US", struct.pack("<3H", 1, 2, 65535)),
    ]
    data = b"".join(element(tag, vr, value, implicit) for tag, vr, value in sorted(elements))
    syntax = IMPLICIT if implicit else EXPLICIT
    assert_as_pydicom(data, syntax)
    assert not fallbacks
    result = dataset_json(data, syntax)
    assert result["00100010"]["Value"] == [
        {"Alphabetic": "山田^太郎", "Ideographic": "やまだ^たろう", "Phonetic": "Yamada^Tarou"}
    ]
    assert result["00200032"]["Value"] == [-125.0, -125.0, 10.5]
    assert result["00081160"]["Value"] == [1, -2, 3]
    assert result["0040A162"]["Value"] == [1, -2, 3]
    assert result["00080020"] == {"vr": "DA"}
    assert result["00101002"] == {"vr": "SQ", "Value": []}


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        (b"ISO_IR 100", "Müller^Jürgen"),
        (b"ISO_IR 100 ", "Ångström^Éloïse"),
        (b"ISO_IR 192", "Müller^Jürgen=ミュラー^ユルゲン"),
        (b"", "Müller^Jürgen"),  # none: pydicom's default, ISO 8859-1 too
        (b"ISO_IR 6", "Müller^Jürgen"),
    ],
)
@pytest.mark.parametrize("implicit", [False, True])
def test_latin_1_and_utf_8_names(
    charset: bytes, name: str, implicit: bool, fallbacks: list[bytes]
) -> None:
    codec = "utf-8" if charset == b"ISO_IR 192" else "latin-1"
    description = "Thorax ✓" if codec == "utf-8" else "Thorax °"
    data = (
        (element(0x00080005, "CS", charset, implicit) if charset else b"")
        + element(0x00081030, "LO", description.encode(codec), implicit)
        + element(0x00100010, "PN", name.encode(codec), implicit)
        + element(0x00321060, "LO", b"no accents", implicit)
    )
    syntax = IMPLICIT if implicit else EXPLICIT
    assert_as_pydicom(data, syntax)
    assert not fallbacks
    groups = name.split("=")
    expected = dict(zip(("Alphabetic", "Ideographic"), groups, strict=False))
    assert dataset_json(data, syntax)["00100010"]["Value"] == [expected]


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        (b"ISO_IR 144", "Иванов^Иван".encode("iso8859_5")),
        (b"ISO 2022 IR 87", b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"),
        (b"ISO_IR 192", b"M\xfcller"),  # not UTF-8: pydicom replaces, with a warning
        (b"ISO_IR 999", b"Doe^John"),  # pydicom warns of a character set it does not know
    ],
)
def test_other_character_sets_are_pydicoms(
    charset: bytes, name: bytes, fallbacks: list[bytes]
) -> None:
    data = element(0x00080005, "CS", charset) + element(0x00100010, "PN", name)
    assert_as_pydicom(data)
    assert fallbacks


def test_ascii_in_another_character_set_takes_the_fast_path(fallbacks: list[bytes]) -> None:
    data = element(0x00080005, "CS", b"ISO_IR 144") + element(0x00100010, "PN", b"Ivanov")
    assert_as_pydicom(data)
    assert not fallbacks


@pytest.mark.parametrize("implicit", [False, True])
def test_private_elements(implicit: bool, fallbacks: list[bytes]) -> None:
    """Implicit VR: a private creator is LO, an element of a creator pydicom's private
    dictionary knows has its VR, any other UN; explicit UN of a known tag or private
    creator is read as pydicom reads it."""
    data = b"".join(
        element(tag, vr, value, implicit)
        for tag, vr, value in [
            (0x00090000, "UL", struct.pack("<L", 20)),
            (0x00090010, "LO", b"ACME 1.1"),
            (0x00091001, "UN" if implicit else "LO", b"a value"),
            (0x00290010, "LO", b"SIEMENS CSA HEADER"),
            (0x00291008, "CS", b"IMAGE NUM 4 "),
            (0x00291010, "OB", b"\x01\x02\x03\x04"),
            (0x00291101, "UN", b"\x05\x06"),
            (0x00430010, "UN", b"GEMS_PARM_01"),
            (0x00431001, "UN", b"\x01\x00"),
        ]
    )
    syntax = IMPLICIT if implicit else EXPLICIT
    assert_as_pydicom(data, syntax)
    assert not fallbacks


def test_explicit_un_of_known_tags(fallbacks: list[bytes]) -> None:
    data = (
        element(0x00080060, "UN", b"CT")
        + element(0x00100010, "UN", b"Doe^John")
        + element(0x00280010, "UN", struct.pack("<H", 512))
        + element(0x00720028, "UN", b"")
    )
    assert_as_pydicom(data)
    assert not fallbacks
    assert dataset_json(data, EXPLICIT)["00280010"] == {"vr": "US", "Value": [512]}


@pytest.mark.parametrize("representation", [struct.pack("<H", 0), struct.pack("<H", 1), b"", None])
def test_implicit_us_or_ss(representation: bytes | None, fallbacks: list[bytes]) -> None:
    """Implicit VR: Smallest/Largest Image Pixel Value are US or SS by the Pixel
    Representation, as pydicom's ambiguous-VR correction decides."""
    data = (
        element(0x00280010, "US", struct.pack("<H", 4), True)
        + (element(0x00280103, "US", representation, True) if representation is not None else b"")
        + element(0x00280106, "US", struct.pack("<H", 0xFFF0), True)
        + element(0x00280107, "US", struct.pack("<2H", 0x0010, 0xFFFF), True)
        + element(0x00280120, "US", b"", True)
    )
    assert_as_pydicom(data, IMPLICIT)
    assert not fallbacks


def test_implicit_pixel_data_is_ow(fallbacks: list[bytes]) -> None:
    data = element(0x00280103, "US", struct.pack("<H", 0), True) + element(
        0x7FE00010, "OW", bytes(range(64)), True
    )
    assert_as_pydicom(data, IMPLICIT)
    assert not fallbacks


@pytest.mark.parametrize("implicit", [False, True])
def test_cut_datasets(implicit: bool) -> None:
    """A header cut at an element boundary (before the pixel data) is an ordinary
    dataset; one cut inside an element is pydicom's (it reads the short value)."""
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    data = encode(dcmread(path, stop_before_pixels=True), implicit)
    syntax = IMPLICIT if implicit else EXPLICIT
    rng = random.Random(7)
    for cut in [0, 1, 7, 8, len(data) - 1, *rng.sample(range(len(data)), 20)]:
        assert our_json(data[:cut], syntax) == pydicom_json(data[:cut], syntax), cut


def test_deep_nesting_is_pydicoms(fallbacks: list[bytes]) -> None:
    content = element(0x00080100, "SH", b"deep")
    for _ in range(MAX_DEPTH + 1):
        content = sequence(0x0040A730, [content])
    assert_as_pydicom(content)
    assert fallbacks


def test_garbled_bytes_give_pydicoms_answer() -> None:
    """Bytes changed at random (values, lengths, VRs), cut or grown: the fast path
    answers only where it agrees with pydicom, or hands the dataset to it."""
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ds = dcmread(path, stop_before_pixels=True)
    ds.ReferencedImageSequence = Sequence([Dataset(), Dataset()])
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3"
    rng = random.Random(2026)
    awkward = b" \\=\x00\x1b^.-+eE0123456789\xe9\xc3\xff\t\xa0_"
    for implicit in (False, True):
        data = encode(ds, implicit)
        syntax = IMPLICIT if implicit else EXPLICIT
        for _ in range(300):
            garbled = bytearray(data)
            where = rng.randrange(len(garbled))
            kind = rng.randrange(3)
            if kind == 0:
                garbled[where] = rng.randrange(256)
            elif kind == 1:
                garbled[where] = rng.choice(awkward)
            else:
                garbled[where:where] = rng.randbytes(rng.randrange(1, 5))
            mutated = bytes(garbled)
            assert our_json(mutated, syntax) == pydicom_json(mutated, syntax), where


# ---------------------------------------------------------------- other syntaxes


def test_big_endian_is_pydicoms(fallbacks: list[bytes]) -> None:
    path = get_testdata_file("MR_small_bigendian.dcm")
    assert path is not None
    ds = dcmread(path, stop_before_pixels=True)
    data = encode(ds, implicit=False, little=False)
    syntax = str(ExplicitVRBigEndian)
    assert our_json(data, syntax) == pydicom_json(data, syntax)
    assert fallbacks == [data]
    little = dataset_json(encode(ds), EXPLICIT)
    assert dataset_json(data, syntax) == little


@pytest.mark.parametrize("deflated", [True, False])
def test_deflated_is_pydicoms(deflated: bool, fallbacks: list[bytes]) -> None:
    """The deflated syntax: as stored (a deflate stream) or as pydicom re-encodes it."""
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    plain = encode(dcmread(path, stop_before_pixels=True))
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    data = compressor.compress(plain) + compressor.flush() if deflated else plain
    syntax = str(DeflatedExplicitVRLittleEndian)
    expected = pydicom_json(zlib.decompress(data, -zlib.MAX_WBITS) if deflated else data)
    assert our_json(data, syntax) == expected
    assert len(fallbacks) == 1


def test_unknown_syntax() -> None:
    with pytest.raises(ValueError, match="transfer syntax"):
        dataset_json(b"", "1.2.3.4")


def test_changed_pydicom_settings_are_pydicoms(
    monkeypatch: pytest.MonkeyPatch, fallbacks: list[bytes]
) -> None:
    monkeypatch.setattr(config, "datetime_conversion", True)
    data = element(0x00080020, "DA", b"20260101") + element(0x00080030, "TM", b"101010")
    assert our_json(data) == pydicom_json(data)
    assert fallbacks


# ---------------------------------------------------------------- bulk data


def bulk_handler(elem: Any) -> str:
    return f"{URI}/{elem.tag:08X}"


@pytest.mark.parametrize("implicit", [False, True])
def test_large_binary_gets_a_uri_small_one_inline(implicit: bool, fallbacks: list[bytes]) -> None:
    large = bytes(range(256)) * 16  # 4096 bytes: beyond both thresholds
    small = b"\x01\x02" * 50
    data = (
        element(0x00091010, "OB", small, implicit)
        + element(0x00420011, "OB", large, implicit)
        + element(0x7FE00010, "OW", large, implicit)
    )
    syntax = IMPLICIT if implicit else EXPLICIT
    result = dataset_json(data, syntax, URI)
    assert result["00420011"] == {"vr": "OB", "BulkDataURI": f"{URI}/00420011"}
    assert result["7FE00010"] == {"vr": "OW", "BulkDataURI": f"{URI}/7FE00010"}
    assert result["00091010"]["InlineBinary"] == base64.b64encode(small).decode()
    assert our_json(data, syntax, URI) == pydicom_json(data, syntax, bulk_handler, 1024)
    assert not fallbacks


def test_bulk_data_threshold() -> None:
    at = element(0x00420011, "OB", b"\x00" * BULK_DATA_THRESHOLD)
    over = element(0x00420011, "OB", b"\x00" * (BULK_DATA_THRESHOLD + 2))
    assert "InlineBinary" in dataset_json(at, EXPLICIT, URI)["00420011"]
    assert "BulkDataURI" in dataset_json(over, EXPLICIT, URI)["00420011"]
    assert "InlineBinary" in dataset_json(over, EXPLICIT)["00420011"]


def test_nested_binary_stays_inline(fallbacks: list[bytes]) -> None:
    large = b"\xab" * 4096
    data = sequence(0x00089124, [element(0x00420011, "OB", large)])
    result = dataset_json(data, EXPLICIT, URI)
    nested = result["00089124"]["Value"][0]["00420011"]
    assert "InlineBinary" in nested
    # Without a handler pydicom puts every value inline: the same as ours here.
    assert as_text(result) == pydicom_json(data)
    assert not fallbacks


@pytest.mark.parametrize(
    "syntax", [str(ExplicitVRBigEndian), str(DeflatedExplicitVRLittleEndian), EXPLICIT]
)
def test_bulk_data_on_pydicoms_way_too(syntax: str) -> None:
    ds = Dataset()
    ds.PatientName = "Doe^John"
    ds.EncapsulatedDocument = b"%PDF" * 1024
    ds.IconImageSequence = Sequence([Dataset()])
    ds.IconImageSequence[0].add_new(0x7FE00010, "OW", b"\x00\x01" * 2048)
    uid = UID(syntax)
    data = encode(ds, little=uid.is_little_endian)
    if uid.is_deflated:
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    result = dataset_json(data, syntax, URI)
    assert result["00420011"] == {"vr": "OB", "BulkDataURI": f"{URI}/00420011"}
    assert "InlineBinary" in result["00880200"]["Value"][0]["7FE00010"]
