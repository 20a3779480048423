"""The index the configuration names: ``[index] backend`` = "sqlite" or "postgresql"."""

from __future__ import annotations

from collections.abc import Callable

from engine.config import Config, IndexBackend
from engine.index.base import Index
from engine.index.postgresql import PostgresIndex
from engine.index.postgresql import stats_of as pg_stats_of
from engine.index.sqlite import SQLiteIndex
from engine.index.sqlite import stats_of as sqlite_stats_of


def make_index(config: Config, flush: Callable[[], None] | None) -> Index:
    """The engine's index (not open yet). ``flush``: the storage area's per-batch sync."""
    settings = config.index
    if settings.backend is IndexBackend.POSTGRESQL:
        return PostgresIndex(
            settings.url,
            durable=config.storage.fsync,
            flush=flush,
            password_env=settings.password_env,
            pool_size=settings.pool_size,
        )
    return SQLiteIndex(settings.path, durable=config.storage.fsync, flush=flush)


async def stats(config: Config) -> dict[str, int]:
    """The counts of the configured index, read-only, while an engine may be writing."""
    settings = config.index
    if settings.backend is IndexBackend.POSTGRESQL:
        return await pg_stats_of(settings.url, settings.password_env)
    return await sqlite_stats_of(settings.path)

