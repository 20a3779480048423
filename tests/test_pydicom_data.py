"""The DICOM files that ship inside pydicom, sent to the engine by real peers.

Every file of ``pydicom/data/test_files`` that is DICOM (named ``*.dcm`` or with
the ``DICM`` prefix; the folder is used as installed, nothing is downloaded) is
sent: with dcmtk's storescu when it can send the file, one storescu call per
transfer syntax family with the matching ``-x`` option, and with pynetdicom,
sending the encoded bytes unchanged, when storescu cannot (no file meta, no SOP
UIDs in the dataset, a file dcmtk refuses to read). The test decides up front,
with pydicom, which files are valid storage instances; every valid one must be
stored and indexed (once per SOP Instance UID: the pydicom files share UIDs, and
the default duplicate policy keeps the first copy), every other one must get a
named failure status and a quarantine entry, and the engine must keep serving.
"""

from __future__ import annotations

import re
import subprocess
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
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
    MediaStorageDirectoryStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, Association, _config
from pynetdicom.dsutils import split_dataset

from engine import status
from tests.helpers import Engine, dcmtk_env, storescu

pytestmark = pytest.mark.peers

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

# storescu proposes one compressed family per option (plus the uncompressed ones).
STORESCU_OPTION = {
    ExplicitVRLittleEndian: "-x=",
    ExplicitVRBigEndian: "-xb",
    ImplicitVRLittleEndian: "-xi",
    JPEGLosslessSV1: "-xs",
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    RLELossless: "-xr",
    DeflatedExplicitVRLittleEndian: "-xd",
}
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# PS3.5 9.1 (leading zeros tolerated, as scanners write them).
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UNDEFINED_LENGTH = 0xFFFFFFFF
STORESCU_AE = "TESTSCU"
PYNETDICOM_AE = "PYSCU"
# dcmtk's words for a file it cannot read (it then sends nothing for it).
IGNORED_BY_STORESCU = re.compile(r"in file: (.+), ignoring file$", re.MULTILINE)


@dataclass
class Sample:
    """One pydicom test file, and what the test expects of it."""

    path: Path
    transfer_syntax: str  # of the dataset: from the file meta, else as pydicom reads it
    has_file_meta: bool
    sop_class_uid: str | None  # from the dataset
    sop_instance_uid: str | None
    valid: bool
    why_invalid: str = ""

    @property
    def name(self) -> str:
        return str(self.path.relative_to(TEST_FILES))

    @property
    def expected_status(self) -> int:
        """The failure an invalid file must get."""
        if self.why_invalid.endswith("missing"):
            return status.MISSING_ATTRIBUTE
        if self.why_invalid.endswith("malformed"):
            return status.INVALID_OBJECT_INSTANCE
        return status.CANNOT_UNDERSTAND  # truncated, or a header that does not parse

    @property
    def storescu_can_try(self) -> bool:
        return (
            self.has_file_meta
            and self.transfer_syntax in STORESCU_OPTION
            and self.sop_class_uid is not None
            and self.sop_instance_uid is not None
        )


def dicom_files() -> list[Path]:
    files = []
    for path in sorted(TEST_FILES.rglob("*")):
        if not path.is_file():
            continue
        with path.open("rb") as f:
            head = f.read(132)
        if path.suffix == ".dcm" or head[128:132] == b"DICM":
            files.append(path)
    return files


def _uid(value: object) -> str | None:
    text = str(value).strip("\0 ") if value is not None else ""
    return text or None


def examine(path: Path) -> Sample:
    """Read a file with pydicom and decide whether it is a valid storage instance."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test files break the standard on purpose
        ds = dcmread(path, force=True, stop_before_pixels=True)
        meta = ds.get("file_meta") or FileMetaDataset()
        syntax = _uid(meta.get("TransferSyntaxUID"))
        if syntax is None:
            implicit, little = ds.original_encoding
            syntax = (
                ImplicitVRLittleEndian
                if implicit
                else ExplicitVRLittleEndian
                if little
                else ExplicitVRBigEndian
            )
        sample = Sample(
            path=path,
            transfer_syntax=str(syntax),
            has_file_meta=len(meta) > 0 and "TransferSyntaxUID" in meta,
            sop_class_uid=_uid(ds.get("SOPClassUID")),
            sop_instance_uid=_uid(ds.get("SOPInstanceUID")),
            valid=False,
        )
        try:
            for element in ds.iterall():
                _ = element.value
        except Exception as exc:
            sample.why_invalid = f"header does not parse: {exc}"
            return sample
        # pydicom reads a value cut short by the end of the file silently.
        whole = dcmread(path, force=True)
        for tag in sorted(whole.keys()):
            raw = whole.get_item(tag)
            if (
                isinstance(raw, RawDataElement)
                and raw.length != UNDEFINED_LENGTH
                and len(raw.value or b"") < raw.length
            ):
                sample.why_invalid = f"truncated in {tag}"
                return sample
    for keyword in REQUIRED_UIDS:
        value = _uid(ds.get(keyword))
        if value is None:
            sample.why_invalid = f"{keyword} missing"
            return sample
        if len(value) > 64 or not UID_PATTERN.match(value):
            sample.why_invalid = f"{keyword} malformed"
            return sample
    sample.valid = True
    return sample


def storescu_groups(samples: list[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        if sample.storescu_can_try:
            groups.setdefault(STORESCU_OPTION[UID(sample.transfer_syntax)], []).append(sample)
    return groups


def part10_for_sending(sample: Sample, folder: Path) -> tuple[Path, str, str]:
    """A Part 10 copy of the file whose dataset bytes are the original's, unchanged.

    Returns the copy and the Affected SOP Class and Instance UIDs it is sent with:
    the dataset's when present, else the file meta's, else stand-ins (the engine
    must then find the dataset's own UIDs missing).
    """
    data = sample.path.read_bytes()
    meta = FileMetaDataset()
    if data[128:132] == b"DICM":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta, offset = split_dataset(sample.path)
        data = data[offset:]
    sop_class = sample.sop_class_uid or _uid(meta.get("MediaStorageSOPClassUID"))
    if sop_class in (None, MediaStorageDirectoryStorage):  # a DICOMDIR is refused at once
        sop_class = SecondaryCaptureImageStorage
    sop_instance = sample.sop_instance_uid or generate_uid()
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = sop_class
    file_meta.MediaStorageSOPInstanceUID = sop_instance
    file_meta.TransferSyntaxUID = sample.transfer_syntax
    copy = folder / f"{len(list(folder.iterdir())):03d}.dcm"
    with copy.open("wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, file_meta, enforce_standard=True)
        f.write(data)
    return copy, sop_class, sop_instance


def associate(engine: Engine, sop_class: str, syntax: str) -> Association:
    ae = AE(ae_title=PYNETDICOM_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(sop_class, [syntax])
    return ae.associate("127.0.0.1", engine.port, ae_title=engine.ae_title)


def send_raw(engine: Engine, path: Path, sop_class: str, syntax: str) -> tuple[int, str]:
    """One pynetdicom association sending the file's dataset bytes as they are."""
    assoc = associate(engine, sop_class, syntax)
    assert assoc.is_established, f"association for {path} refused"
    try:
        rsp = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert "Status" in rsp, f"no C-STORE-RSP for {path}"
    return int(rsp.Status), str(rsp.get("ErrorComment", ""))


@dataclass
class Sent:
    sample: Sample
    sop_instance_uid: str  # the request's Affected SOP Instance UID
    by: str  # calling AE
    status: int | None = None  # known for pynetdicom sends
    comment: str = ""
    payload: bytes | None = None  # the dataset bytes sent, when sent by pynetdicom


def test_pydicom_test_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = [examine(path) for path in dicom_files()]
    valid = [s for s in samples if s.valid]
    invalid = [s for s in samples if not s.valid]
    # The folder must hold what this test is about: both kinds, shared UIDs, many syntaxes.
    assert len(valid) >= 50 and len(invalid) >= 5, [s.name for s in invalid]
    assert len({s.sop_instance_uid for s in valid}) < len(valid)
    assert len({s.transfer_syntax for s in samples}) >= 10
    assert {s.expected_status for s in invalid} >= {
        status.MISSING_ATTRIBUTE,
        status.CANNOT_UNDERSTAND,
    }

    engine = Engine(tmp_path / "engine").start()
    try:
        sent: list[Sent] = []
        by_pynetdicom: list[Sample] = [s for s in samples if not s.storescu_can_try]
        for option, group in storescu_groups(samples).items():
            result = storescu(
                engine,
                *(str(s.path) for s in group),
                options=("-R", "-nh", option),
                check=False,
            )
            assert result.returncode == 0, result.stderr
            ignored = {Path(p) for p in IGNORED_BY_STORESCU.findall(result.stderr)}
            for sample in group:
                if sample.path in ignored:
                    by_pynetdicom.append(sample)
                else:
                    assert sample.sop_instance_uid is not None
                    sent.append(Sent(sample, sample.sop_instance_uid, STORESCU_AE))
        # storescu must have done most of the work, and left some for pynetdicom.
        assert 0 < len(by_pynetdicom) < len(sent)

        # A DICOMDIR is not a storage SOP class: refused at negotiation, nothing received.
        assoc = associate(engine, MediaStorageDirectoryStorage, ExplicitVRLittleEndian)
        assert not assoc.is_established

        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        folder = tmp_path / "raw"
        folder.mkdir()
        for sample in by_pynetdicom:
            path, sop_class, sop_instance = part10_for_sending(sample, folder)
            code, comment = send_raw(engine, path, sop_class, sample.transfer_syntax)
            payload = path.read_bytes()[split_dataset(path)[1] :]
            sent.append(Sent(sample, sop_instance, PYNETDICOM_AE, code, comment, payload))
        assert len(sent) == len(samples)

        # Answers known to the test (pynetdicom): success for valid, a named failure else.
        for item in sent:
            if item.status is None:
                continue
            if item.sample.valid:
                assert item.status == status.SUCCESS, (item.sample.name, item.comment)
            else:
                assert item.status == item.sample.expected_status, (item.sample.name, item.status)
                assert item.comment, item.sample.name

        # Stored and indexed: one instance per valid SOP Instance UID, the first sent.
        first: dict[str, Sample] = {}
        for item in sent:
            if item.sample.valid:
                first.setdefault(item.sop_instance_uid, item.sample)
        stats = engine.stats()
        stored = engine.stored_files()
        assert stats["instances"] == len(first) == len(stored)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            copies = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in stored}
            assert set(copies) == set(first)
            for uid, sample in first.items():
                copy = dcmread(copies[uid], force=True)
                assert copy.file_meta.TransferSyntaxUID == sample.transfer_syntax, sample.name
                original = dcmread(sample.path, force=True)
                assert copy.get("PixelData") == original.get("PixelData"), sample.name

        # Quarantined: every invalid file, once, with a named status and where it came from.
        rejected = [item for item in sent if not item.sample.valid]
        notes = engine.quarantine_notes()
        assert stats["quarantined"] == len(rejected) == len(notes)
        assert Counter(n["sop_instance_uid"] for n in notes) == Counter(
            item.sop_instance_uid for item in rejected
        )
        answers = {item.sop_instance_uid: item for item in rejected}
        for note in notes:
            item = answers[note["sop_instance_uid"]]
            assert note["status"] == f"0x{item.sample.expected_status:04X}", (
                item.sample.name,
                note,
            )
            if item.status is not None:
                assert int(note["status"], 16) == item.status, note
            assert note["reason"] and note["outcome"], note
            assert note["calling_ae"] == item.by, note
            assert note["peer_ip"] == "127.0.0.1", note
            kept = note["_data"].read_bytes()
            if item.payload is not None:  # sent byte for byte: kept byte for byte
                assert kept.endswith(item.payload), item.sample.name
            else:
                assert len(kept) > 0, item.sample.name

        # Sending valid files again changes nothing (same bytes, or the first copy kept).
        again = [item.sample for item in sent if item.sample.valid and item.by == STORESCU_AE]
        again = [s for s in again if s.transfer_syntax == ExplicitVRLittleEndian][:20]
        result = storescu(engine, *(str(s.path) for s in again), options=("-R", "-x="))
        assert "Store Failed" not in result.stderr
        assert engine.stats() == stats

        # Still serving: C-ECHO answers, and the process is alive.
        echo = subprocess.run(
            ["echoscu", "-aet", "ECHOSCU", "-aec", engine.ae_title, "127.0.0.1", str(engine.port)],
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert echo.returncode == 0, echo.stderr
        assert engine.process is not None and engine.process.poll() is None
    finally:
        assert engine.stop() == 0, engine.log()
