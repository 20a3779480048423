from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Engine


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if shutil.which("storescu") is None:
        skip = pytest.mark.skip(reason="dcmtk is not installed (apt-get install dcmtk)")
        for item in items:
            if "peers" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A running engine with the default settings."""
    eng = Engine(tmp_path / "engine").start()
    yield eng
    if eng.process is not None:
        assert eng.stop() == 0, eng.log()
