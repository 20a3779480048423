"""Re-sent instances: identical copies are success and stored once; others follow the
policy. On each index backend (the ``backend`` fixture): the index is the final judge."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from engine import status
from tests.helpers import Engine, ct_dataset, send_datasets, storescu, write_study

pytestmark = pytest.mark.usefixtures("backend")


@pytest.mark.peers
def test_resending_a_study_changes_nothing(engine: Engine, tmp_path: Path) -> None:
    write_study(tmp_path / "study", n_series=2, n_instances=6)
    storescu(engine, str(tmp_path / "study"))
    before = engine.stats()
    files_before = {p: p.stat().st_mtime_ns for p in engine.stored_files()}

    result = storescu(engine, str(tmp_path / "study"))  # check=True: every status success

    assert "Store Failed" not in result.stderr
    assert engine.stats() == before
    assert before["instances"] == 12
    assert {p: p.stat().st_mtime_ns for p in engine.stored_files()} == files_before


def _original_and_variant() -> tuple[Dataset, Dataset]:
    original = ct_dataset(generate_uid(), generate_uid(), 1, size=16)
    variant = copy.deepcopy(original)
    variant.PixelData = bytes(len(original.PixelData))  # other content, same UID
    variant.SeriesDescription = "re-sent with other pixels"
    return original, variant


def _policy_engine(tmp_path: Path, policy: str, index_url: str) -> Engine:
    overrides = {"ingest": {"duplicate_policy": policy}}
    return Engine(tmp_path / policy, overrides, index_url=index_url).start()


def test_policy_keep_answers_success_and_keeps_the_first(tmp_path: Path, index_url: str) -> None:
    engine = _policy_engine(tmp_path, "keep", index_url)
    try:
        original, variant = _original_and_variant()
        assert send_datasets(engine, [original]) == [(original.SOPInstanceUID, status.SUCCESS)]
        before = engine.stats()
        assert send_datasets(engine, [variant]) == [(variant.SOPInstanceUID, status.SUCCESS)]
        assert engine.stats() == before
        (path,) = engine.stored_files()
        assert dcmread(path).PixelData == original.PixelData
    finally:
        assert engine.stop() == 0


def test_policy_overwrite_replaces_the_stored_copy(tmp_path: Path, index_url: str) -> None:
    engine = _policy_engine(tmp_path, "overwrite", index_url)
    try:
        original, variant = _original_and_variant()
        send_datasets(engine, [original])
        before = engine.stats()
        assert send_datasets(engine, [variant]) == [(variant.SOPInstanceUID, status.SUCCESS)]
        (path,) = engine.stored_files()  # the old file is gone, not left beside it
        stored = dcmread(path)
        assert stored.PixelData == variant.PixelData
        assert stored.SeriesDescription == "re-sent with other pixels"
        after = engine.stats()
        assert {k: v for k, v in after.items() if k != "bytes"} == {
            k: v for k, v in before.items() if k != "bytes"
        }
        assert after["bytes"] == path.stat().st_size
    finally:
        assert engine.stop() == 0


def test_policy_reject_answers_duplicate_and_quarantines(tmp_path: Path, index_url: str) -> None:
    engine = _policy_engine(tmp_path, "reject", index_url)
    try:
        original, variant = _original_and_variant()
        send_datasets(engine, [original])
        assert send_datasets(engine, [variant]) == [
            (variant.SOPInstanceUID, status.DUPLICATE_SOP_INSTANCE)
        ]
        # An identical re-send is still a success under "reject".
        assert send_datasets(engine, [original]) == [(original.SOPInstanceUID, status.SUCCESS)]
        counts = engine.stats()
        assert counts["instances"] == 1
        assert counts["quarantined"] == 1
        (path,) = engine.stored_files()
        assert dcmread(path).PixelData == original.PixelData
        (note,) = engine.quarantine_notes()
        assert note["sop_instance_uid"] == variant.SOPInstanceUID
        assert note["status"] == "0x0111"
        assert "already stored" in note["reason"]
        kept = dcmread(note["_data"])
        assert kept.PixelData == variant.PixelData
    finally:
        assert engine.stop() == 0
