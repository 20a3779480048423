"""A full pipeline slows the senders instead of growing; faults and timeouts get a status.

The engine runs in this process (its own loop in a thread) so the test can watch
the pipeline's fill level. The index is held by a real SQLite lock from another
connection, which is what a slow disk or a long checkpoint looks like to the writer.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from engine import status
from tests.helpers import Engine, ct_dataset, engine_in_thread, send_datasets

WAIT = 30.0  # upper bound of every wait loop below


@contextmanager
def index_locked(path: Path) -> Iterator[None]:
    """Hold the index's write lock from another connection."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


def wait_until(predicate: Any, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


SENDERS = 16
PER_SENDER = 3


def test_full_pipeline_makes_senders_wait_and_stays_bounded(tmp_path: Path) -> None:
    pipeline_settings = {"queue_size": 1, "batch_max": 1}
    with engine_in_thread(tmp_path, pipeline=pipeline_settings) as eng:
        receiver = eng.pipeline.receiver
        target = Engine.__new__(Engine)
        target.port, target.ae_title = eng.port, eng.ae_title
        study = generate_uid()
        batches = [
            [ct_dataset(study, generate_uid(), i, seed=s) for i in range(PER_SENDER)]
            for s in range(SENDERS)
        ]
        with ThreadPoolExecutor(SENDERS) as pool:
            with index_locked(tmp_path / "index.sqlite"):
                futures = [
                    pool.submit(send_datasets, target, batch, f"S{n}")
                    for n, batch in enumerate(batches)
                ]
                # Every sender has one C-STORE out; none is answered while the index is held.
                assert wait_until(lambda: receiver.in_pipeline + receiver.waiting == SENDERS)
                peak = 0
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline:
                    peak = max(peak, receiver.in_pipeline)
                    time.sleep(0.01)
                assert peak <= eng.pipeline.capacity
                assert receiver.waiting >= SENDERS - eng.pipeline.capacity > 0
                assert not any(f.done() for f in futures)
            # The index is free again: everything goes through.
            results = [f.result(WAIT) for f in futures]
    assert all(code == status.SUCCESS for per in results for _, code in per)
    assert len(list((tmp_path / "storage").glob("??/??/*/*.dcm"))) == SENDERS * PER_SENDER


def test_store_timeout_answers_out_of_resources_then_recovers(tmp_path: Path) -> None:
    with engine_in_thread(tmp_path, ingest={"store_timeout": 1.0}) as eng:
        target = Engine.__new__(Engine)
        target.port, target.ae_title = eng.port, eng.ae_title
        ds = ct_dataset(generate_uid(), generate_uid(), 1)
        with index_locked(tmp_path / "index.sqlite"):
            ((uid, code),) = send_datasets(target, [ds])
        assert code == status.OUT_OF_RESOURCES
        # The index is free again: the scanner's retry succeeds.
        assert send_datasets(target, [ds]) == [(uid, status.SUCCESS)]


def test_write_fault_answers_processing_failure_and_engine_keeps_serving(
    engine: Engine,
) -> None:
    incoming = engine.storage / ".incoming"
    shutil.rmtree(incoming)
    incoming.write_bytes(b"")  # a file where the temp folder should be: every write fails
    ds = ct_dataset(generate_uid(), generate_uid(), 1)
    assert send_datasets(engine, [ds]) == [(ds.SOPInstanceUID, status.PROCESSING_FAILURE)]
    assert "cannot write" in engine.log()
    incoming.unlink()
    incoming.mkdir()
    assert send_datasets(engine, [ds]) == [(ds.SOPInstanceUID, status.SUCCESS)]
    assert engine.stats()["instances"] == 1
