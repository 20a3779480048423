"""Compressed pixel data: ``check_pixels`` and ``transcode`` with real peers, and the codec unit.

Inputs cover every codec family the engine decodes: JPEG baseline (YBR and RGB),
JPEG extended (12 bit), JPEG lossless, JPEG-LS (lossless and near-lossless),
JPEG 2000 (lossless and lossy) and RLE (multi-frame too). They are pydicom's own
test files (used from the installed package, with a fresh SOP Instance UID each,
as several share one) and signed 16-bit CT slices compressed by dcmtk's
dcmcjpeg, dcmcjpls and dcmcrle. Corrupt inputs keep a valid DICOM structure: a
frame's codestream is cut in half or has its first bytes overwritten, and
re-encapsulated; pydicom also ships two files its decoders reject.
"""

from __future__ import annotations

import re
import subprocess
import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset

from engine import codecs, status
from tests.helpers import Engine, ct_dataset, storescu

# Every test needs dcmtk: the peers, and the encoders that make the CT inputs.
pytestmark = pytest.mark.peers

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

# pydicom test files, by what they exercise.
PYDICOM_INPUTS = {
    "jpeg-baseline-ybr": "SC_rgb_jpeg_dcmtk.dcm",
    "jpeg-baseline-ybr422": "SC_rgb_dcmtk_+eb+cy+s2.dcm",
    "jpeg-baseline-rgb": "SC_jpeg_no_color_transform.dcm",
    "jpeg-extended-12bit": "JPGExtended.dcm",
    "jpeg-lossless-rgb": "SC_rgb_jpeg_gdcm.dcm",
    "jpeg-ls-lossless": "MR_small_jpeg_ls_lossless.dcm",
    "jpeg-ls-near-lossless": "JPEGLSNearLossless_16.dcm",
    "j2k-lossless": "MR_small_jp2klossless.dcm",
    "j2k-lossless-ybr-rct": "GDCMJ2K_TextGBR.dcm",
    "j2k-lossy": "JPEG2000.dcm",
    "rle": "MR_small_RLE.dcm",
    "rle-2-frames": "SC_rgb_rle_16bit_2frame.dcm",
}
# CT slices compressed by dcmtk: command and options.
DCMTK_INPUTS = {
    "ct-jpeg-lossless": ("dcmcjpeg", "+e1"),
    "ct-jpeg-ls-lossless": ("dcmcjpls", "+el"),
    "ct-jpeg-ls-near-lossless": ("dcmcjpls", "+en"),
    "ct-rle": ("dcmcrle",),
}
# Files pydicom ships that no decoder accepts (their DICOM structure is fine).
SHIPPED_CORRUPT = {
    "shipped-jpeg-lossy": "JPEG-lossy.dcm",
    "shipped-j2k-sequence-delimiter": "JPEG2000-embedded-sequence-delimiter.dcm",
}
# One input per codec family is also corrupted, both ways.
CORRUPTED = (
    "jpeg-baseline-ybr",
    "ct-jpeg-lossless",
    "ct-jpeg-ls-lossless",
    "j2k-lossless",
    "ct-rle",
)

STORESCU_OPTION = {
    ExplicitVRLittleEndian: "-x=",
    ImplicitVRLittleEndian: "-xi",
    JPEGLosslessSV1: "-xs",
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    RLELossless: "-xr",
}
# storescu -v names the network syntax of every file it sends: "from -> to".
CONVERSION = re.compile(r"Converting transfer syntax: (.+) -> (.+)$", re.MULTILINE)
REJECTED_PIXELS = "pixel data cannot be decoded"
END_MARKER_MESSAGE = "no end-of-image marker (FFD9)"
ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass
class Input:
    name: str
    path: Path
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    truth: np.ndarray[Any, Any] | None = None  # the pixels before a lossless dcmtk encoder

    def dataset(self) -> Dataset:
        return read(self.path)

    def payload(self) -> bytes:
        """The encoded dataset after the file meta: what a C-STORE carries."""
        _, offset = split_dataset(self.path)
        return self.path.read_bytes()[offset:]


def read(path: Path, **kwargs: Any) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's test files break rules on purpose
        return dcmread(path, **kwargs)


def pixels(ds: Dataset) -> np.ndarray[Any, Any]:
    """pydicom's own decode (YBR converted to RGB, as ``pixel_array`` does by default)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.pixel_array


def _save(ds: Dataset, name: str, folder: Path) -> Input:
    path = folder / f"{name}.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    return Input(
        name,
        path,
        str(ds.file_meta.TransferSyntaxUID),
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
    )


def _renewed(source: Path) -> Dataset:
    """A pydicom test file with its own SOP Instance UID (and study, series if absent)."""
    ds = read(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not ds.get(keyword):
            setattr(ds, keyword, generate_uid())
    return ds


def _dcmtk(name: str, command: tuple[str, ...], folder: Path, number: int) -> Input:
    source = ct_dataset(generate_uid(), generate_uid(), number, size=64, seed=7)
    lossy = "near" in name
    if lossy:  # dcmtk's near-lossless JPEG-LS encoder takes unsigned pixels only
        source.PixelData = (pixels(source).astype(np.int32) + 1024).astype(np.uint16).tobytes()
        source.PixelRepresentation = 0
    plain, encoded = folder / f"{name}-plain.dcm", folder / f"{name}.dcm"
    source.save_as(plain, enforce_file_format=True)
    subprocess.run([*command, str(plain), str(encoded)], check=True, timeout=60)
    ds = read(encoded)
    made = Input(
        name,
        encoded,
        str(ds.file_meta.TransferSyntaxUID),
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
    )
    if not lossy:
        made.truth = pixels(source)
    return made


def _corrupt(source: Input, how: str, folder: Path) -> Input:
    """The source with its first frame cut in half or its first 8 bytes zeroed."""
    ds = source.dataset()
    count = int(ds.get("NumberOfFrames") or 1)
    frames = list(generate_frames(ds.PixelData, number_of_frames=count))
    first = frames[0]
    frames[0] = first[: len(first) // 2] if how == "truncated" else bytes(8) + first[8:]
    ds.PixelData = encapsulate(frames)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return _save(ds, f"{source.name}-{how}", folder)


@dataclass
class Inputs:
    good: dict[str, Input]
    corrupt: dict[str, Input]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    folder = tmp_path_factory.mktemp("codec-inputs")
    good = {
        name: _save(_renewed(TEST_FILES / f), name, folder) for name, f in PYDICOM_INPUTS.items()
    }
    for number, (name, command) in enumerate(DCMTK_INPUTS.items(), 1):
        good[name] = _dcmtk(name, command, folder, number)
    corrupt = {
        name: _save(_renewed(TEST_FILES / f), name, folder) for name, f in SHIPPED_CORRUPT.items()
    }
    for name in CORRUPTED:
        for how in ("truncated", "overwritten"):
            bad = _corrupt(good[name], how, folder)
            corrupt[bad.name] = bad
    return Inputs(good, corrupt)


def expected_decoder_message(item: Input) -> str:
    """What decoding this corrupt input must report: pydicom's error, else the end marker."""
    try:
        pixels(item.dataset())
    except Exception as exc:
        return str(exc)
    return END_MARKER_MESSAGE  # libjpeg decodes a cut JPEG / JPEG-LS stream silently


def reports(text: str, message: str) -> bool:
    """Whether ``text`` holds the decoder's ``message``, line by line.

    Lines naming an object's address (Pillow's, when it is installed) differ
    between processes and are left out.
    """
    lines = [line.strip() for line in message.splitlines()]
    lines = [line for line in lines if line and not ADDRESS.search(line)]
    return bool(lines) and all(line in text for line in lines)


def stored_by_uid(engine: Engine) -> dict[str, Path]:
    return {str(read(p, stop_before_pixels=True).SOPInstanceUID): p for p in engine.stored_files()}


def send_raw(engine: Engine, items: list[Input]) -> dict[str, tuple[int, str]]:
    """One pynetdicom association sending each file's dataset bytes exactly as they are.

    Returns (status, error comment) by SOP Instance UID.
    """
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    contexts: dict[str, set[str]] = {}
    for item in items:
        contexts.setdefault(item.sop_class_uid, set()).add(item.transfer_syntax)
    for sop_class, syntaxes in contexts.items():
        for syntax in sorted(syntaxes):  # one context per syntax: no choice for the SCP
            ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", engine.port, ae_title=engine.ae_title)
    assert assoc.is_established, "association refused"
    answers: dict[str, tuple[int, str]] = {}
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes, never re-encoded
    try:
        for item in items:
            rsp = assoc.send_c_store(item.path)
            assert "Status" in rsp, f"no answer for {item.name}"
            answers[item.sop_instance_uid] = (int(rsp.Status), str(rsp.get("ErrorComment", "")))
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()
    return answers


def test_inputs_cover_every_codec_family(inputs: Inputs) -> None:
    syntaxes = {item.transfer_syntax for item in inputs.good.values()}
    assert syntaxes >= {
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEG2000Lossless,
        JPEG2000,
        RLELossless,
    }
    uids = [item.sop_instance_uid for item in [*inputs.good.values(), *inputs.corrupt.values()]]
    assert len(set(uids)) == len(uids)
    for item in inputs.good.values():  # the test's own decoder reads every good input
        assert pixels(item.dataset()).size > 0, item.name


# -- transcode = "explicit-little", sent by storescu ------------------------------------


def test_transcode_stores_explicit_little_with_the_same_pixels(
    inputs: Inputs, tmp_path: Path
) -> None:
    folder = tmp_path / "uncompressed"
    folder.mkdir()
    plain = {
        "ct-explicit": _save(ct_dataset(generate_uid(), generate_uid(), 1), "ct-explicit", folder),
    }
    implicit = ct_dataset(generate_uid(), generate_uid(), 2)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    plain["ct-implicit"] = _save(implicit, "ct-implicit", folder)
    items = [*inputs.good.values(), *plain.values()]

    engine = Engine(tmp_path / "engine", {"ingest": {"transcode": "explicit-little"}}).start()
    try:
        groups: dict[str, list[Input]] = {}
        for item in items:
            groups.setdefault(STORESCU_OPTION[UID(item.transfer_syntax)], []).append(item)
        for option, group in groups.items():
            result = storescu(engine, *(str(i.path) for i in group), options=("-R", "-v", option))
            # The engine got each file in its own syntax: storescu converted nothing.
            conversions = CONVERSION.findall(result.stderr)
            assert len(conversions) == len(group), result.stderr
            assert all(a == b for a, b in conversions), conversions
        stats = engine.stats()
        stored = stored_by_uid(engine)
    finally:
        assert engine.stop() == 0, engine.log()

    assert stats["instances"] == len(items) and stats["quarantined"] == 0
    for item in items:
        original = item.dataset()
        copy = read(stored[item.sop_instance_uid])
        if codecs.is_compressed(item.transfer_syntax):
            assert copy.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, item.name
            assert copy["PixelData"].is_undefined_length is False, item.name
        else:  # uncompressed input is stored in the syntax it came in
            assert copy.file_meta.TransferSyntaxUID == item.transfer_syntax, item.name
        decoded = pixels(copy)
        assert np.array_equal(decoded, pixels(original)), item.name
        if item.truth is not None:  # lossless: the pixels before dcmtk compressed them
            assert np.array_equal(decoded, item.truth), item.name
        # YBR comes out as RGB (pydicom's decode converts it); the rest as it was.
        colour = original.PhotometricInterpretation
        assert copy.PhotometricInterpretation == (
            colour if colour.startswith("MONOCHROME") or colour == "RGB" else "RGB"
        ), item.name
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "Rows", "Columns", "BitsStored"):
            assert copy.get(keyword) == original.get(keyword), (item.name, keyword)
        assert int(copy.get("NumberOfFrames") or 1) == int(original.get("NumberOfFrames") or 1)


# -- check_pixels = true, sent by pynetdicom byte for byte ------------------------------


def test_check_pixels_rejects_corrupt_streams_and_stores_good_ones_unchanged(
    inputs: Inputs, tmp_path: Path
) -> None:
    good, corrupt = list(inputs.good.values()), list(inputs.corrupt.values())
    expected = {item.sop_instance_uid: expected_decoder_message(item) for item in corrupt}
    # Truncated JPEG-family streams are caught by the end marker, the others by a decoder.
    assert END_MARKER_MESSAGE in expected.values()
    assert len(set(expected.values())) > 1

    engine = Engine(tmp_path / "engine", {"ingest": {"check_pixels": True}}).start()
    try:
        answers = send_raw(engine, [*good, *corrupt])
        # The association carried on after every rejection, and the engine still serves.
        assert send_raw(engine, [good[0]]) == {good[0].sop_instance_uid: (status.SUCCESS, "")}
        stats = engine.stats()
        stored = stored_by_uid(engine)
        notes = {note["sop_instance_uid"]: note for note in engine.quarantine_notes()}
    finally:
        assert engine.stop() == 0, engine.log()

    assert stats["instances"] == len(good) == len(stored)
    assert stats["quarantined"] == len(corrupt) == len(notes)
    for item in good:
        assert answers[item.sop_instance_uid] == (status.SUCCESS, ""), item.name
        path = stored[item.sop_instance_uid]
        _, offset = split_dataset(path)
        assert path.read_bytes()[offset:] == item.payload(), item.name  # byte for byte
        assert read(path).file_meta.TransferSyntaxUID == item.transfer_syntax, item.name
    for item in corrupt:
        code, comment = answers[item.sop_instance_uid]
        assert code == status.CANNOT_UNDERSTAND_PIXEL_DATA, (item.name, hex(code), comment)
        assert comment.startswith(REJECTED_PIXELS), (item.name, comment)
        note = notes[item.sop_instance_uid]
        assert note["status"] == f"0x{status.CANNOT_UNDERSTAND_PIXEL_DATA:04X}", note
        assert note["reason"].startswith(REJECTED_PIXELS), note
        assert reports(note["reason"], expected[item.sop_instance_uid]), (item.name, note)
        assert note["transfer_syntax"] == item.transfer_syntax, note
        assert note["calling_ae"] == "PYSCU" and note["peer_ip"] == "127.0.0.1", note
        kept = note["_data"]
        _, offset = split_dataset(kept)
        assert kept.read_bytes()[offset:] == item.payload(), item.name  # nothing lost


# -- engine.codecs without sockets --------------------------------------------------------


@pytest.mark.parametrize(
    ("syntax", "compressed"),
    [
        (JPEGBaseline8Bit, True),
        (JPEGExtended12Bit, True),
        (JPEGLosslessSV1, True),
        (JPEGLSLossless, True),
        (JPEGLSNearLossless, True),
        (JPEG2000Lossless, True),
        (JPEG2000, True),
        (RLELossless, True),
        (ExplicitVRLittleEndian, False),
        (ImplicitVRLittleEndian, False),
        (ExplicitVRBigEndian, False),
        (DeflatedExplicitVRLittleEndian, False),  # whole-dataset deflate, not pixel data
        ("1.2.3.4", False),  # not a transfer syntax
    ],
)
def test_is_compressed(syntax: str, compressed: bool) -> None:
    assert codecs.is_compressed(syntax) is compressed


def test_decode_payload_check_returns_the_input_unchanged(inputs: Inputs) -> None:
    for item in inputs.good.values():
        data = item.payload()
        assert codecs.decode_payload(data, item.transfer_syntax, False) == (
            data,
            item.transfer_syntax,
        ), item.name


def test_decode_payload_transcodes_to_explicit_little(inputs: Inputs) -> None:
    for item in inputs.good.values():
        data, syntax = codecs.decode_payload(item.payload(), item.transfer_syntax, True)
        assert syntax == ExplicitVRLittleEndian, item.name
        copy = read_dataset(BytesIO(data), is_implicit_VR=False, is_little_endian=True)
        copy.file_meta = FileMetaDataset()
        copy.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        original = item.dataset()
        assert copy.SOPInstanceUID == original.SOPInstanceUID, item.name  # no new UID
        assert not copy["PixelData"].is_undefined_length, item.name
        assert np.array_equal(pixels(copy), pixels(original)), item.name


def test_decode_payload_raises_on_corrupt_streams(inputs: Inputs) -> None:
    for item in inputs.corrupt.values():
        with pytest.raises(codecs.DecodeError) as info:
            codecs.decode_payload(item.payload(), item.transfer_syntax, False)
        assert reports(str(info.value), expected_decoder_message(item)), item.name
        with pytest.raises(codecs.DecodeError):
            codecs.decode_payload(item.payload(), item.transfer_syntax, True)


def _encoded(ds: Dataset) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


def test_decode_payload_allows_padding_after_the_end_marker(inputs: Inputs) -> None:
    item = inputs.good["jpeg-baseline-ybr"]
    ds = item.dataset()
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    assert frame.rstrip(b"\0").endswith(b"\xff\xd9")
    ds.PixelData = encapsulate([frame + b"\xff\xff\x00\x00"])  # fill bytes, even padding
    data = _encoded(ds)
    assert codecs.decode_payload(data, item.transfer_syntax, False) == (
        data,
        item.transfer_syntax,
    )
    ds.PixelData = encapsulate([frame.rstrip(b"\0")[:-2]])  # only the marker missing
    with pytest.raises(codecs.DecodeError, match=re.escape(END_MARKER_MESSAGE)):
        codecs.decode_payload(_encoded(ds), item.transfer_syntax, False)


def test_decode_payload_without_pixel_data_is_unchanged(inputs: Inputs) -> None:
    item = inputs.good["jpeg-ls-lossless"]
    ds = item.dataset()
    del ds.PixelData
    data = _encoded(ds)
    assert codecs.decode_payload(data, item.transfer_syntax, True) == (
        data,
        item.transfer_syntax,
    )
