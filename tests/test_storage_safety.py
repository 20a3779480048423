"""The archive is never forgotten: an unmounted disk, a second engine, a wrong folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine import status
from tests.helpers import Engine, ct_dataset, send_datasets, serve_until_exit, write_config

pytestmark = pytest.mark.peers


def _fill(engine: Engine, n: int = 12) -> dict[str, int]:
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    datasets = [ct_dataset(study, series, i) for i in range(n)]
    assert {code for _, code in send_datasets(engine, datasets)} == {status.SUCCESS}
    return engine.stats()


def test_a_second_engine_on_the_same_storage_is_refused(tmp_path: Path) -> None:
    first = Engine(tmp_path / "first").start()
    try:
        before = _fill(first)
        second = tmp_path / "second"
        second.mkdir()
        config = write_config(
            second,
            {
                "dicom": {"host": "127.0.0.1", "port": 1},  # never reached: refused before
                "storage": {"path": str(first.storage)},
                "index": {"path": "index.sqlite"},
            },
        )
        done = serve_until_exit(config)
        assert done.returncode != 0
        assert "another engine is using the storage folder" in done.stderr
        # The first engine's temp files and journals were not touched: it goes on.
        assert (
            send_datasets(first, [ct_dataset("1.2.3.4", "1.2.3.4.5", 99)])[0][1] == status.SUCCESS
        )
        assert first.stats()["instances"] == before["instances"] + 1
    finally:
        assert first.stop() == 0


def test_an_unmounted_storage_folder_stops_the_start_and_forgets_nothing(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "e").start()
    before = _fill(engine)
    assert engine.stop() == 0
    (engine.storage / ".clean-shutdown").unlink()  # and the last stop was not even clean
    away = tmp_path / "unmounted"
    engine.storage.rename(away)

    done = serve_until_exit(engine.config_path)
    assert done.returncode != 0
    assert "is the disk or NAS mounted" in done.stderr
    assert not engine.storage.exists()  # no empty folder made in its place

    away.rename(engine.storage)
    engine.start()
    try:
        assert engine.stats() == before
    finally:
        assert engine.stop() == 0


def test_most_files_missing_refuses_to_start_instead_of_dropping_rows(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "e").start()
    before = _fill(engine, 12)
    engine.kill()  # unclean: the start checks that every indexed file exists
    moved = tmp_path / "moved"
    shutil.copytree(engine.storage, moved)
    for path in engine.stored_files():
        path.unlink()

    done = serve_until_exit(engine.config_path)
    assert done.returncode != 0
    assert "12 of 12 indexed files are missing" in done.stderr

    shutil.rmtree(engine.storage)
    moved.rename(engine.storage)
    engine.start()
    try:
        assert engine.stats() == before
    finally:
        assert engine.stop() == 0
