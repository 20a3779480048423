"""What the index stores and answers, independent of the database behind it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from engine.duplicates import Decision, Existing
from engine.index.dialect import Dialect
from engine.index.reads import Connection, Reads

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class InstanceRow:
    """One written file, ready to be indexed."""

    attributes: dict[str, Any]  # columns from validate.extract
    transfer_syntax: str
    path: str
    size: int
    digest: str
    received_at: float
    calling_ae: str
    called_ae: str
    peer_ip: str
    # The dataset up to its pixel data, for metadata (None: not kept, read the file).
    header: bytes | None = None

    @property
    def sop_instance_uid(self) -> str:
        uid: str = self.attributes["sop_instance_uid"]
        return uid


@dataclass(frozen=True, slots=True)
class QuarantineRow:
    path: str | None
    outcome: str
    status: int
    reason: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    calling_ae: str
    called_ae: str
    peer_ip: str
    received_at: float


@dataclass(slots=True)
class CommitReport:
    """What a batch commit decided: one decision per row, and files no row references."""

    decisions: list[Decision] = field(default_factory=list)
    existing: list[Existing | None] = field(default_factory=list)
    unreferenced: list[str] = field(default_factory=list)


Decide = Callable[[Existing | None, str], Decision]


class Index(Protocol):
    """The index of one engine: SQLite (``sqlite.py``) or PostgreSQL (``postgresql.py``)."""

    @property
    def dialect(self) -> Dialect: ...
    @property
    def location(self) -> str: ...
    @property
    def reads(self) -> Reads: ...
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def lookup(self, sop_instance_uids: list[str]) -> dict[str, Existing]: ...
    def lookup_now(self, sop_instance_uids: list[str]) -> dict[str, Existing] | None: ...
    async def read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[Any]: ...
    async def has_instances(self) -> bool: ...
    async def paths(self, suffix: str = "") -> list[tuple[str, str]]: ...
    async def commit_batch(
        self, rows: list[InstanceRow], quarantined: list[QuarantineRow], decide: Decide
    ) -> CommitReport: ...
    async def write(self, body: Callable[[Connection], T]) -> T: ...
    async def forget(self, sop_instance_uids: list[str]) -> None: ...
    async def stats(self) -> dict[str, int]: ...
