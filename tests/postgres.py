"""PostgreSQL for the tests: one throwaway cluster per session, a fresh database per test.

The cluster (``bench.postgres.Cluster``) is started on 127.0.0.1 the first time a test
asks for it, in the session's temporary folder, and stopped when the session ends. Where
it cannot be started (no PostgreSQL installed, no ``postgres`` user to run it as, ...)
every PostgreSQL test is skipped with the reason, once: pytest keeps a session fixture's
skip and gives it to each test that asks for it.

The test modules that exercise the index (pipeline, queries, retrieval, recovery) take
the ``backend`` fixture (tests/conftest.py): each of their tests runs once on SQLite and
once on PostgreSQL, each time with an index of its own (``index_url``, or ``new_index``
for a module's fixture).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from bench.postgres import Cluster, PostgresUnavailable
from engine.index.dialect import POSTGRESQL

SQLITE = "sqlite"
POSTGRES = "postgresql"
# ENGINE_TEST_BACKENDS=sqlite runs the parametrized modules on SQLite only (a quick run).
BACKENDS = [
    name
    for name in os.environ.get("ENGINE_TEST_BACKENDS", f"{SQLITE},{POSTGRES}").split(",")
    if name
]
# The suite runs once per DICOM transport (ENGINE_TRANSPORT: native, the default, or
# pynetdicom; .ci/run). The index code is the same under both; what differs is who reads
# it: the pynetdicom transport answers C-FIND, C-MOVE and C-GET on its own threads. So a
# module takes PostgreSQL in both runs only when it says so (``POSTGRES_ON_EVERY_TRANSPORT
# = True``: the C-FIND and C-MOVE/C-GET modules, and the quick query unit tests), and in
# the native run only otherwise (``NATIVE_RUN_BACKENDS``): the crash, forwarding, store
# and two-node tests are the slow ones, and CI's two runs stay well under 15 minutes.
NATIVE_RUN = os.environ.get("ENGINE_TRANSPORT", "") in ("", "native")
# The marks of the two-node tests (tests/test_nodes*.py): real peers, native run only.
TWO_NODE_MARKS = [
    pytest.mark.peers,
    pytest.mark.skipif(
        not NATIVE_RUN, reason="the two-node tests run in the native-transport run (time)"
    ),
]
NATIVE_RUN_BACKENDS = BACKENDS if NATIVE_RUN else [name for name in BACKENDS if name != POSTGRES]


def backends_of(module: object) -> list[str]:
    """The backends the tests of ``module`` run on in this run (see above)."""
    every = getattr(module, "POSTGRES_ON_EVERY_TRANSPORT", False)
    return BACKENDS if every else NATIVE_RUN_BACKENDS


class Databases:
    """Fresh databases in the session's cluster, one per test (or module fixture)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._numbers = itertools.count(1)
        self._pid = os.getpid()

    def create(self, purpose: str = "test") -> str:
        """A new empty database; returns its URL (no password: the cluster trusts 127.0.0.1)."""
        purpose = re.sub(r"[^a-z0-9]+", "_", purpose.lower()).strip("_")[:30] or "test"
        name = f"{purpose}_{self._pid}_{next(self._numbers)}"
        return self.cluster.create_database(name)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Databases]:
    """The session's PostgreSQL cluster, started on first use; skips when it cannot start."""
    folder = tmp_path_factory.mktemp("postgres")
    try:
        # fsync off: the cluster is thrown away, and the tests kill engines, never it.
        cluster = Cluster(folder, fsync=False).start()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL cannot be started here: {exc}")
    try:
        yield Databases(cluster)
    finally:
        cluster.stop()


def new_index(backend: str, request: pytest.FixtureRequest, purpose: str) -> str:
    """A fresh index on ``backend`` for a test or a module's fixture: "" for SQLite (the
    engine's own file) or the URL of a new PostgreSQL database."""
    if backend != POSTGRES:
        return ""
    databases: Databases = request.getfixturevalue("postgres")
    return databases.create(purpose)


def fetch(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of one statement written in SQLite's form (``?`` parameters), on PostgreSQL."""

    async def run() -> list[tuple[Any, ...]]:
        connection = await asyncpg.connect(url, timeout=30)
        try:
            records = await connection.fetch(POSTGRESQL.sql(sql), *args)
        finally:
            await connection.close()
        return [tuple(record.values()) for record in records]

    return asyncio.run(run())


def execute(url: str, sql: str, *args: Any) -> None:
    """One statement written in SQLite's form, committed, on PostgreSQL."""

    async def run() -> None:
        connection = await asyncpg.connect(url, timeout=30)
        try:
            await connection.execute(POSTGRESQL.sql(sql), *args)
        finally:
            await connection.close()

    asyncio.run(run())
