"""dcmtk's storescu sends a folder; every instance is stored, identical, counted once (on
each index backend: the ``backend`` fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from tests.helpers import Engine, storescu, write_study

pytestmark = [pytest.mark.peers, pytest.mark.usefixtures("backend")]


def test_storescu_folder_is_stored_identically(engine: Engine, tmp_path: Path) -> None:
    sent = write_study(tmp_path / "study", n_series=2, n_instances=10)
    storescu(engine, str(tmp_path / "study"))

    assert engine.stats() == {
        "patients": 1,
        "studies": 1,
        "series": 2,
        "instances": 20,
        "bytes": sum(p.stat().st_size for p in engine.stored_files()),
        "quarantined": 0,
        "stable_studies": 0,
        "forward_pending": 0,
        "forward_failed": 0,
    }
    stored = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, engine.stored_files())}
    assert len(stored) == 20
    for ds in sent:
        copy = stored[str(ds.SOPInstanceUID)]
        # Same dataset, element for element (the file meta is ours, the dataset theirs).
        assert copy == ds
        assert copy.PixelData == ds.PixelData
        assert copy.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
