"""WADO-RS (PS3.18 section 10.4): instances, metadata, frames, bulk data, rendered images.

Blocking helpers over stored files; the server runs them in worker threads, and
decompression in the engine's decoder processes (``codecs.Decoder``):

- an instance goes out as stored, or decompressed / re-encoded to the uncompressed
  syntax the request asks for;
- metadata is built from the headers kept in the index at ingest (``dicomjson``), so a
  study of thousands of instances needs no file reads; an instance without a kept
  header (indexed by recovery, or a header over 64 KB) is read from its file;
- frames are cut from the pixel data: by length when uncompressed, by fragments
  (PS3.5 A.4) when encapsulated.
"""

from __future__ import annotations

import logging
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from engine.dicomjson import dataset_json
from engine.storage import part10
from engine.web.catalog import StoredInstance
from engine.web.media import UNCOMPRESSED_SYNTAXES

log = logging.getLogger(__name__)

PIXEL_DATA = 0x7FE00010
AVAILABLE_TRANSFER_SYNTAX = 0x00083002
ROWS = 0x00280010


class NotFound(Exception):
    """The resource does not exist (HTTP 404)."""


class BadRequest(Exception):
    """The request cannot be served as asked (HTTP 400)."""


def instance_url(base: str, instance: StoredInstance) -> str:
    return (
        f"{base}/studies/{instance.study_uid}/series/{instance.series_uid}"
        f"/instances/{instance.sop_instance_uid}"
    )


def metadata(instance: StoredInstance, base: str) -> dict[str, Any]:
    """The DICOM JSON metadata of one instance (bulk data as BulkDataURIs)."""
    url = instance_url(base, instance)
    if instance.header is not None:
        result = dataset_json(instance.header, instance.transfer_syntax, f"{url}/bulk")
    else:
        ds = dcmread(instance.path, stop_before_pixels=True)
        result = dataset_json(
            _encoded(ds, instance.transfer_syntax), instance.transfer_syntax, f"{url}/bulk"
        )
    if f"{ROWS:08X}" in result:
        vr = "OW" if instance.transfer_syntax in UNCOMPRESSED_SYNTAXES else "OB"
        result[f"{PIXEL_DATA:08X}"] = {"vr": vr, "BulkDataURI": f"{url}/bulk/{PIXEL_DATA:08X}"}
    result[f"{AVAILABLE_TRANSFER_SYNTAX:08X}"] = {"vr": "UI", "Value": [instance.transfer_syntax]}
    return dict(sorted(result.items()))


def _encoded(ds: Dataset, transfer_syntax: str) -> bytes:
    syntax = UID(transfer_syntax)
    out = DicomBytesIO()
    out.is_little_endian = syntax.is_little_endian
    out.is_implicit_VR = syntax.is_implicit_VR
    write_dataset(out, ds)
    return out.getvalue()


def read_stored(instance: StoredInstance) -> tuple[bytes, int]:
    """The stored file's bytes and where its dataset starts."""
    try:
        raw = instance.path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"the file of instance {instance.sop_instance_uid} is missing") from None
    return raw, part10.dataset_offset(raw)


def parse(data: bytes, transfer_syntax: str) -> Dataset:
    """A dataset (no file meta) in the given syntax, with file meta set for pixel access."""
    syntax = UID(transfer_syntax)
    ds = read_dataset(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def reencoded(data: bytes, from_syntax: str, to_syntax: str) -> bytes:
    """An uncompressed dataset written again in another uncompressed syntax."""
    return _encoded(parse(data, from_syntax), to_syntax)


def part10_file(instance: StoredInstance, data: bytes, transfer_syntax: str) -> bytes:
    """A Part 10 file of a dataset sent in another syntax than the stored one."""
    head = part10.header(instance.sop_class_uid, instance.sop_instance_uid, transfer_syntax, "")
    return head + data


def frame_numbers(text: str) -> list[int]:
    """``1,3,5`` -> [1, 3, 5]; BadRequest for anything else."""
    numbers = []
    for part in text.split(","):
        try:
            number = int(part)
        except ValueError:
            raise BadRequest(f"frame numbers are whole numbers from 1, not {part!r}") from None
        if number < 1:
            raise BadRequest(f"frame numbers start at 1, not {number}")
        numbers.append(number)
    return numbers


def frames(ds: Dataset, wanted: list[int]) -> list[bytes]:
    """The frames asked for, as stored in ``ds`` (encapsulated: each frame's fragments
    joined; native: a slice of the pixel data). NotFound for a frame that is not there."""
    if "PixelData" not in ds:
        raise NotFound("this instance has no pixel data")
    count = int(ds.get("NumberOfFrames") or 1)
    for number in wanted:
        if number > count:
            raise NotFound(f"frame {number} does not exist: the instance has {count}")
    pixels: bytes = ds.PixelData
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        every = list(generate_frames(pixels, number_of_frames=count))
        return [every[n - 1] for n in wanted]
    samples = int(ds.get("SamplesPerPixel") or 1)
    length = int(ds.Rows) * int(ds.Columns) * samples * int(ds.BitsAllocated) // 8
    return [pixels[(n - 1) * length : n * length] for n in wanted]


def bulk_value(ds: Dataset, tag: int) -> bytes:
    """The value of a top-level binary element (not the pixel data)."""
    if tag not in ds:
        raise NotFound(f"the instance has no element {tag:08X}")
    value = ds[tag].value
    if not isinstance(value, bytes):
        raise NotFound(f"element {tag:08X} is not bulk data")
    return value
