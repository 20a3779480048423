"""Several pynetdicom associations at once: every instance stored once, identical; on
each index backend (the ``backend`` fixture: SQLite and PostgreSQL)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from engine import status
from tests.helpers import Engine, ct_dataset, send_datasets

pytestmark = pytest.mark.usefixtures("backend")

ASSOCIATIONS = 6
PER_ASSOCIATION = 15


def test_parallel_associations_store_everything_once(engine: Engine) -> None:
    study_uid = generate_uid()
    batches = []
    for a in range(ASSOCIATIONS):
        series_uid = generate_uid()
        batches.append(
            [ct_dataset(study_uid, series_uid, i, seed=a, size=64) for i in range(PER_ASSOCIATION)]
        )
    with ThreadPoolExecutor(ASSOCIATIONS) as pool:
        results = list(
            pool.map(lambda b: send_datasets(engine, b, f"SCU{batches.index(b)}"), batches)
        )

    statuses = [code for per_assoc in results for _, code in per_assoc]
    assert statuses == [status.SUCCESS] * (ASSOCIATIONS * PER_ASSOCIATION)
    counts = engine.stats()
    assert counts["studies"] == 1
    assert counts["series"] == ASSOCIATIONS
    assert counts["instances"] == ASSOCIATIONS * PER_ASSOCIATION
    files = engine.stored_files()
    assert len(files) == ASSOCIATIONS * PER_ASSOCIATION
    assert counts["bytes"] == sum(p.stat().st_size for p in files)
    sent = {str(ds.SOPInstanceUID): ds for batch in batches for ds in batch}
    for path in files:
        stored = dcmread(path)
        original = sent.pop(str(stored.SOPInstanceUID))
        assert stored == original
    assert sent == {}


def test_same_instance_on_two_associations_at_once_is_stored_once(
    engine: Engine, tmp_path: Path
) -> None:
    """Concurrent arrivals of one UID: both answered success, one file, one row."""
    study_uid, series_uid = generate_uid(), generate_uid()
    shared = [ct_dataset(study_uid, series_uid, i, size=64) for i in range(20)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: send_datasets(engine, shared, f"SCU{n}"), range(4)))
    assert all(code == status.SUCCESS for per in results for _, code in per)
    assert engine.stats()["instances"] == 20
    assert len(engine.stored_files()) == 20
