"""The fast path of attribute extraction gives exactly what pydicom's way gives.

``validate.fast_attributes`` reads the index's values from the raw elements, skipping
pydicom's per-element conversion. For every dataset pydicom ships as test data, for the
engine's own CT datasets and for hand-made edge cases, whenever the fast path answers,
its answer equals ``validate.extract`` on the same bytes.
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

from engine.stages import validate
from tests.helpers import ct_dataset

TEST_FILES = sorted(Path(get_testdata_file("CT_small.dcm") or ".").parent.rglob("*.dcm"))


def raw_dataset(data: bytes, syntax: UID) -> Dataset:
    return read_dataset(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)


def both(data: bytes, syntax: UID) -> tuple[dict[str, object] | None, dict[str, object]]:
    fast = validate.fast_attributes(raw_dataset(data, syntax), syntax)
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
