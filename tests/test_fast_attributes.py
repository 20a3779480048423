"""The fast path of header parsing gives exactly what pydicom's way gives.

``engine/elements.py`` walks the raw elements without pydicom and
``validate.attributes_from`` reads the index's values from them, skipping pydicom's
per-element conversion. For every dataset pydicom ships as test data, for the engine's
own CT datasets and for hand-made edge cases, whenever the fast path answers, its
answer equals ``validate.extract`` on pydicom's reading of the same bytes; and a cut
or garbled dataset is never accepted by the fast path where pydicom refuses it.
"""

from __future__ import annotations

import warnings
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, generate_uid

from engine import elements
from engine.model import Rejection
from engine.stages import validate
from tests.helpers import ct_dataset

TEST_FILES = sorted(Path(get_testdata_file("CT_small.dcm") or ".").parent.rglob("*.dcm"))


def raw_dataset(data: bytes, syntax: UID) -> Dataset:
    return read_dataset(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)


def walked(data: bytes, syntax: UID) -> dict[str, object] | None:
    found = elements.walk(data, syntax.is_implicit_VR, validate._WANTED_TAGS)
    return None if found is None else validate.attributes_from(found.elements)


def both(data: bytes, syntax: UID) -> tuple[dict[str, object] | None, dict[str, object]]:
    fast = validate.fast_attributes(raw_dataset(data, syntax), syntax)
    by_walk = walked(data, syntax)
    assert by_walk is None or fast is None or by_walk == fast
    fast = fast if fast is not None else by_walk
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slow = validate.extract(raw_dataset(data, syntax))
    return fast, slow


def encode(ds: Dataset, implicit: bool = False) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


def dataset_bytes(path: Path) -> tuple[bytes, UID] | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path, force=True)
            syntax = UID(ds.file_meta.TransferSyntaxUID)
        except Exception:
            return None
    if syntax.is_deflated or (not syntax.is_little_endian and not syntax.is_implicit_VR):
        return None
    raw = path.read_bytes()
    start = raw.find(b"DICM")
    if start < 0:
        return None
    stream = BytesIO(raw)
    stream.seek(start + 4)
    from pydicom.filereader import _read_file_meta_info

    _read_file_meta_info(stream)
    return raw[stream.tell() :], syntax


def test_fast_path_equals_pydicom_on_pydicom_test_files() -> None:
    compared = fast_answers = 0
    for path in TEST_FILES:
        found = dataset_bytes(path)
        if found is None:
            continue
        data, syntax = found
        try:
            fast, slow = both(data, syntax)
        except Exception:
            continue  # a file pydicom cannot read this way: nothing to compare
        compared += 1
        if fast is not None:
            fast_answers += 1
            assert fast == slow, path.name
    assert compared > 50 and fast_answers > 30, (compared, fast_answers)


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize(
    ("charset", "name"),
    [
        (None, "Doe^John"),
        ("ISO_IR 100", "Müller^Jürgen"),
        ("ISO_IR 192", "山田^太郎=やまだ^たろう"),
        ("ISO_IR 192", "Ωmega^Ålpha"),
    ],
)
def test_fast_path_equals_pydicom_on_engine_datasets(
    implicit: bool, charset: str | None, name: str
) -> None:
    ds = ct_dataset(generate_uid(), generate_uid(), 7, patient_name=name)
    if charset:
        ds.SpecificCharacterSet = charset
    ds.StationName = "CT1 "
    ds.SeriesDescription = "AX  1.0 "
    ds.NumberOfFrames = "1 "
    ds.ReferringPhysicianName = "A^B\\C^D"  # two values
    syntax = UID("1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1")
    fast, slow = both(encode(ds, implicit), syntax)
    assert fast is not None
    assert fast == slow
    assert fast["patient_name"] == name


def test_unusual_values_take_pydicom_s_way() -> None:
    ds = ct_dataset(generate_uid(), generate_uid(), 1)
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]  # code extensions: pydicom decodes
    assert both(encode(ds), UID("1.2.840.10008.1.2.1"))[0] is None
    ds = ct_dataset(generate_uid(), generate_uid(), 1)
    ds.InstanceNumber = "1.0"  # not an integer string: pydicom's IS rules
    fast, slow = both(encode(ds), UID("1.2.840.10008.1.2.1"))
    assert fast is None or fast == slow


def test_walk_skips_sequences_of_undefined_length() -> None:
    ds = ct_dataset(generate_uid(), generate_uid(), 3)
    item = Dataset()
    item.CodeValue = "T-D0050"
    nested = Dataset()
    nested.CodeMeaning = "deep"
    item.ConceptCodeSequence = [nested]
    ds.AnatomicRegionSequence = [item, item]
    ds["AnatomicRegionSequence"].is_undefined_length = True
    item["ConceptCodeSequence"].is_undefined_length = True
    item.is_undefined_length_sequence_item = True
    nested.is_undefined_length_sequence_item = True
    data = encode(ds)
    # Sequences and items of undefined length, with delimitation items.
    assert b"\xfe\xff\xdd\xe0" in data
    for implicit in (False, True):
        syntax = UID("1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1")
        found = elements.walk(encode(ds, implicit), implicit, validate._WANTED_TAGS)
        assert found is not None and found.pixel_tag == 0x7FE00010
        fast, slow = both(encode(ds, implicit), syntax)
        assert fast == slow


def test_cut_or_garbled_datasets_are_left_to_pydicom() -> None:
    ds = ct_dataset(generate_uid(), generate_uid(), 3)
    data = encode(ds)
    syntax = UID("1.2.840.10008.1.2.1")
    pixels = data.index(b"\xe0\x7f\x10\x00")
    for cut in (10, 100, pixels - 3):
        assert elements.walk(data[:cut], False, validate._WANTED_TAGS) is None
    with pytest.raises(Rejection, match="truncated"):
        validate.parse_header(data[:-7], str(syntax))
    garbled = bytearray(data)
    vr_at = 8 + int.from_bytes(data[6:8], "little") + 4  # the second element's VR
    garbled[vr_at : vr_at + 2] = b"\x00\x00"
    assert elements.walk(bytes(garbled), False, validate._WANTED_TAGS) is None
    assert elements.walk(b"", False, validate._WANTED_TAGS) is None
    assert elements.walk(b"\x00" * 64, True, validate._WANTED_TAGS) is None
