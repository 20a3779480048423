"""The benchmark's synthetic CT generator: valid files, unique but reproducible UIDs,
lossless compressed copies, and a cache that is reused only when complete.

The benchmark compares engines on these files, so a generator bug (duplicate UIDs,
lossy copies, a stale cache) would silently skew every number it reports.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from bench.generate import MARKER, DcmtkMissingError, StudySpec, Syntax, cached, generate

SPEC = StudySpec(studies=2, series=2, slices=3, rows=64, columns=64, seed=5)

HEADER_KEYWORDS = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "FrameOfReferenceUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SliceLocation",
    "KVP",
    "WindowCenter",
    "WindowWidth",
]


def needs(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} (dcmtk) not installed")


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("plain")
    return out, generate(SPEC, out)


def test_layout_counts_and_progress(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    files = generate(SPEC, tmp_path, progress=lambda done, total: calls.append((done, total)))
    assert files == sorted(tmp_path.rglob("*.dcm"))
    assert len(files) == SPEC.total == 12
    assert files[0] == tmp_path / "study_000" / "series_00" / "slice_0000.dcm"
    assert files[-1] == tmp_path / "study_001" / "series_01" / "slice_0002.dcm"
    assert calls == [(n, 12) for n in range(1, 13)]


def test_files_are_complete_ct_images(plain: tuple[Path, list[Path]]) -> None:
    _, files = plain
    previous = None
    for path in files:
        ds = dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "CT"
        missing = [k for k in HEADER_KEYWORDS if k not in ds or ds[k].value in (None, "")]
        assert not missing, path
        assert (ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType) == (-1024, 1, "HU")
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 16, 15)
        assert (ds.PixelRepresentation, ds.SamplesPerPixel) == (1, 1)
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        pixels = ds.pixel_array
        assert pixels.shape == (64, 64)
        assert pixels.dtype == np.int16
        assert pixels.std() > 10
        if previous is not None:
            assert not np.array_equal(pixels, previous)
        previous = pixels


def test_uids_unique_and_hierarchy_consistent(plain: tuple[Path, list[Path]]) -> None:
    _, files = plain
    sop: list[str] = []
    studies: dict[str, set[str]] = defaultdict(set)
    series: dict[str, set[str]] = defaultdict(set)
    positions: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
            assert UID(uid).is_valid
        sop.append(ds.SOPInstanceUID)
        studies[path.parts[-3]].add(ds.StudyInstanceUID)
        series[str(path.parent)].add(ds.SeriesInstanceUID)
        positions[ds.SeriesInstanceUID].append(
            (ds.InstanceNumber, float(ds.ImagePositionPatient[2]), float(ds.SliceThickness))
        )
    assert len(set(sop)) == len(sop) == 12
    assert len(studies) == 2 and all(len(uids) == 1 for uids in studies.values())
    assert len(set().union(*studies.values())) == 2
    assert len(series) == 4 and all(len(uids) == 1 for uids in series.values())
    assert len(set().union(*series.values())) == 4
    for slices in positions.values():
        assert [n for n, _, _ in slices] == [1, 2, 3]
        steps = {round(abs(b[1] - a[1]), 3) for a, b in pairwise(slices)}
        assert steps == {slices[0][2]}


def test_same_seed_same_bytes_other_seed_other_uids(
    plain: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    root, files = plain
    again = generate(SPEC, tmp_path / "again")
    assert [p.relative_to(tmp_path / "again") for p in again] == [
        p.relative_to(root) for p in files
    ]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(files, again, strict=True))

    other = generate(replace(SPEC, seed=6), tmp_path / "other")

    def uids(paths: list[Path]) -> set[str]:
        found = set()
        for path in paths:
            ds = dcmread(path, stop_before_pixels=True)
            found |= {ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID}
        return found

    assert not uids(files) & uids(other)


@pytest.mark.parametrize(
    ("syntax", "uid", "tool"),
    [
        pytest.param(
            Syntax.JPEG_LOSSLESS, "1.2.840.10008.1.2.4.70", "dcmcjpeg", marks=needs("dcmcjpeg")
        ),
        pytest.param(Syntax.JPEG_LS, "1.2.840.10008.1.2.4.80", "dcmcjpls", marks=needs("dcmcjpls")),
    ],
)
def test_compressed_copies_are_lossless(
    plain: tuple[Path, list[Path]], tmp_path: Path, syntax: Syntax, uid: str, tool: str
) -> None:
    root, files = plain
    calls: list[tuple[int, int]] = []
    out = tmp_path / syntax.value
    copies = generate(SPEC, out, syntax, progress=lambda d, t: calls.append((d, t)))
    assert [p.relative_to(out) for p in copies] == [p.relative_to(root) for p in files]
    assert sorted(out.iterdir()) == [out / "study_000", out / "study_001"]  # no scratch left
    assert calls == [(n, 12) for n in range(1, 13)]
    for source, copy in zip(files, copies, strict=True):
        original, compressed = dcmread(source), dcmread(copy)
        assert compressed.file_meta.TransferSyntaxUID == uid
        assert compressed.SOPInstanceUID == original.SOPInstanceUID
        assert copy.stat().st_size < source.stat().st_size
        decoded = compressed.pixel_array
        assert decoded.dtype == np.int16
        assert np.array_equal(decoded, original.pixel_array)


def test_missing_dcmtk_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DcmtkMissingError, match=r"dcmcjpls.*dcmtk"):
        generate(SPEC, tmp_path / "out", Syntax.JPEG_LS)
    assert not (tmp_path / "out").exists()


def test_cached_generates_once(tmp_path: Path) -> None:
    first = cached(SPEC, Syntax.EXPLICIT, tmp_path)
    folder = first[0].parents[2]
    assert folder.parent == tmp_path and (folder / MARKER).is_file()
    stamps = {p: p.stat().st_mtime_ns for p in first}

    calls: list[tuple[int, int]] = []
    second = cached(SPEC, Syntax.EXPLICIT, tmp_path, progress=lambda d, t: calls.append((d, t)))
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in second} == stamps
    assert calls == [(12, 12)]

    # Another spec or syntax gets its own folder.
    other = cached(
        StudySpec(studies=1, series=1, slices=2, rows=32, columns=32), Syntax.EXPLICIT, tmp_path
    )
    assert other[0].parents[2] != folder


def test_cached_redoes_an_interrupted_generation(tmp_path: Path) -> None:
    class Interrupted(Exception):
        pass

    def stop_after_five(done: int, total: int) -> None:
        if done == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        cached(SPEC, Syntax.EXPLICIT, tmp_path, progress=stop_after_five)
    (folder,) = tmp_path.iterdir()
    assert not (folder / MARKER).exists()
    assert len(list(folder.rglob("*.dcm"))) == 5

    files = cached(SPEC, Syntax.EXPLICIT, tmp_path)
    assert len(files) == 12 and (folder / MARKER).is_file()

    # A complete-looking cache that lost a file is redone too.
    files[3].unlink()
    assert len(cached(SPEC, Syntax.EXPLICIT, tmp_path)) == 12
    assert files[3].is_file()
