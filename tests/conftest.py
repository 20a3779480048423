from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Engine
from tests.postgres import POSTGRES, backends_of, new_index, postgres

__all__ = ["postgres"]  # the session's PostgreSQL cluster (tests/postgres.py), a fixture


def pytest_configure(config: pytest.Config) -> None:
    """A run started in the background (``cmd &`` from a script) inherits SIGINT ignored,
    and so would every engine command it starts: the tests that stop one with SIGINT
    (Ctrl-C) need Python's own handler, which a child gets back at exec."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if shutil.which("storescu") is None:
        skip = pytest.mark.skip(reason="dcmtk is not installed (apt-get install dcmtk)")
        for item in items:
            if "peers" in item.keywords:
                item.add_marker(skip)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes ``backend`` runs once per backend of its module (tests/postgres.py
    ``backends_of``), unless it parametrizes ``backend`` itself."""
    if "backend" not in metafunc.fixturenames:
        return
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        if "backend" in (names.replace(" ", "").split(",") if isinstance(names, str) else names):
            return
    metafunc.parametrize("backend", backends_of(metafunc.module), indirect=True, scope="module")


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    """The index backend a module's tests run on: each test once per backend.

    Module-scoped, so that a module's fixtures filled once (an engine with studies) are
    filled once per backend, and the tests of one backend run together.
    """
    name: str = request.param
    if name == POSTGRES:
        request.getfixturevalue("postgres")  # skips here when PostgreSQL cannot start
    return name


@pytest.fixture
def index_url(backend: str, request: pytest.FixtureRequest) -> str:
    """A fresh index for one test: "" (SQLite, in the engine's folder) or the URL of a
    new PostgreSQL database."""
    return new_index(backend, request, request.node.name)


@pytest.fixture
def engine(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A running engine with the default settings: on the ``backend`` of a module that
    takes it (``pytestmark = pytest.mark.usefixtures("backend")``), else on SQLite."""
    url = request.getfixturevalue("index_url") if "backend" in request.fixturenames else ""
    eng = Engine(tmp_path / "engine", index_url=url).start()
    yield eng
    if eng.process is not None:
        assert eng.stop() == 0, eng.log()
