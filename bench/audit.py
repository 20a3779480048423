"""An audit of an engine's storage folder against its index and what senders were told.

The promise under test (DESIGN.md, *Promises*): a success status goes out only after the
file and its index row are committed, so after any crash and restart

- every **acknowledged** instance has a row, and the row's file exists, parses, is that
  instance and holds the very dataset bytes that were sent (same content digest);
- no **dangling** row: a row whose file is missing;
- no **orphan**: an instance file that no row names;
- no **temp** file left by the crashed run in ``.incoming`` (a running engine keeps a few
  empty spares there: those are not leftovers), and no **journal** batch left unsettled;
- the **counters** the index keeps per series and study agree with its rows.

Reading every file is what makes an audit slow on a large archive, so only the rows in
``deep`` are read and parsed; the others are checked by name and size. The index is read
through a read-only connection: the audit works while the engine runs (it is meant for
an idle engine: files in flight are not settled yet).
"""

from __future__ import annotations

import contextlib
import io
import sqlite3
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pydicom import dcmread

from engine import digest
from engine.storage import part10
from engine.storage.area import INCOMING, JOURNAL, JOURNAL_LOG, SUFFIX, StorageArea

QUARANTINE = ".quarantine"


@dataclass(frozen=True)
class Row:
    uid: str
    path: str
    size: int
    digest: str
    series_uid: str
    study_uid: str


def index_rows(index_path: Path) -> dict[str, Row]:
    """The instances table, by SOP Instance UID (read-only; works while the engine runs)."""
    with contextlib.closing(_connect(index_path)) as db:
        rows = db.execute(
            "SELECT sop_instance_uid, path, size, digest, series_uid, study_uid FROM instances"
        ).fetchall()
    return {r[0]: Row(*r) for r in rows}


def _connect(index_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{index_path}?mode=ro", uri=True, timeout=60)


def instance_files(storage: Path) -> list[str]:
    """Instance files under the storage folder, relative, outside its dot folders."""
    return sorted(
        rel
        for p in storage.rglob(f"*{SUFFIX}")
        if not (rel := p.relative_to(storage).as_posix()).startswith(".") and "/." not in rel
    )


@dataclass(frozen=True)
class Scratch:
    """The names in the storage folder's work areas at one moment (say, right after a
    kill): temp files in ``.incoming`` and journal logs in ``.journal``."""

    temps: frozenset[str] = frozenset()
    journals: frozenset[str] = frozenset()

    @classmethod
    def of(cls, storage: Path) -> Scratch:
        def names(folder: Path) -> frozenset[str]:
            return frozenset(p.name for p in folder.iterdir()) if folder.is_dir() else frozenset()

        journals = frozenset(
            n for n in names(storage / JOURNAL) if n.endswith((JOURNAL_LOG, ".json"))
        )
        return cls(temps=names(storage / INCOMING), journals=journals)


@dataclass
class Findings:
    """What the audit found; every list or mapping but the figures must be empty."""

    # Acknowledged instances that are not intact, with the reason each.
    lost: dict[str, str] = field(default_factory=dict)
    # Rows whose file is missing.
    dangling: list[str] = field(default_factory=list)
    # Rows whose file is there but is not what the row says (size, parse, UID, digest).
    unreadable: dict[str, str] = field(default_factory=dict)
    # Instance files no row names.
    orphans: list[str] = field(default_factory=list)
    # Temp files with data, or left by the run before the crash.
    temps: list[str] = field(default_factory=list)
    # Journal batches not settled, and journal logs of the run before the crash.
    journals: list[str] = field(default_factory=list)
    # Series and studies whose counters disagree with the instance rows.
    counters: list[str] = field(default_factory=list)
    # Figures: acknowledged instances read and found intact; rows; instance files.
    verified: int = 0
    rows: int = 0
    files: int = 0

    VIOLATIONS: ClassVar[tuple[str, ...]] = (
        "lost",
        "dangling",
        "unreadable",
        "orphans",
        "temps",
        "journals",
        "counters",
    )

    @property
    def ok(self) -> bool:
        return not any(getattr(self, name) for name in self.VIOLATIONS)

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in self.VIOLATIONS}

    def items(self) -> dict[str, list[str]]:
        """The items of each violation found, with the reason where there is one."""
        found: dict[str, list[str]] = {}
        for name in self.VIOLATIONS:
            value = getattr(self, name)
            items = [f"{k}: {v}" for k, v in value.items()] if isinstance(value, dict) else value
            if items:
                found[name] = sorted(items)
        return found

    def examples(self, limit: int = 5) -> dict[str, list[str]]:
        """Up to ``limit`` items of each violation."""
        return {name: items[:limit] for name, items in self.items().items()}

    def summary(self) -> str:
        return "; ".join(f"{name}: {items}" for name, items in self.examples().items()) or "ok"


def _file_problem(path: Path, row: Row, as_received: bool) -> str | None:
    """Why the file does not hold the row's instance, or None when it does."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return "file missing"
    except OSError as exc:
        return f"cannot read the file: {exc}"
    if len(raw) != row.size:
        return f"file has {len(raw)} bytes, the row says {row.size}"
    try:
        ds = dcmread(io.BytesIO(raw))
        for _ in ds.iterall():  # every value converted: the whole file parses
            pass
        uids = (str(ds.SOPInstanceUID), str(ds.file_meta.MediaStorageSOPInstanceUID))
        offset = part10.dataset_offset(raw)
    except Exception as exc:
        return f"does not parse: {exc!r}"
    if uids != (row.uid, row.uid):
        return f"file holds instance {uids[0]} (file meta: {uids[1]})"
    if as_received and digest.of(memoryview(raw)[offset:]) != row.digest:
        return "the file's dataset bytes do not match the row's digest"
    return None


def audit(
    storage: Path,
    index_path: Path,
    acked: Mapping[str, str | None],
    *,
    deep: Collection[str] | None = None,
    crashed: Scratch | None = None,
    as_received: bool = True,
) -> Findings:
    """Check the storage folder and the index against each other and ``acked``.

    ``acked`` maps each acknowledged SOP Instance UID to the content digest of the
    dataset bytes sent (``engine.digest``), or None when unknown. ``deep``: the UIDs
    whose files are read and parsed (None: every row's). ``crashed``: the work areas
    as the crashed run left them; any of those names still there is a leftover.
    ``as_received``: files hold the dataset bytes as received (no ``ingest.transcode``),
    so their digest must be the row's.
    """
    rows = index_rows(index_path)
    files = instance_files(storage)
    found = Findings(rows=len(rows), files=len(files))
    on_disk = set(files)
    read = set(rows) if deep is None else set(deep) & set(rows)
    for uid, row in sorted(rows.items()):
        if row.path not in on_disk and not (storage / row.path).is_file():
            found.dangling.append(uid)
            continue
        if uid in read:
            problem = _file_problem(storage / row.path, row, as_received)
        else:
            size = (storage / row.path).stat().st_size
            problem = None if size == row.size else f"file has {size} bytes, the row {row.size}"
        if problem is not None:
            found.unreadable[uid] = problem
    dangling = set(found.dangling)
    for uid, sent in acked.items():
        acked_row = rows.get(uid)
        if acked_row is None:
            found.lost[uid] = "no index row"
        elif uid in dangling:
            found.lost[uid] = f"its file {acked_row.path} is missing"
        elif uid in found.unreadable:
            found.lost[uid] = found.unreadable[uid]
        elif sent is not None and acked_row.digest != sent:
            found.lost[uid] = "the index holds other content (digest differs from the one sent)"
        elif uid in read:
            found.verified += 1
    found.orphans = sorted(on_disk - {r.path for r in rows.values()})
    found.temps, found.journals = _leftovers(storage, crashed or Scratch())
    found.counters = _counter_mismatches(index_path)
    return found


def _leftovers(storage: Path, crashed: Scratch) -> tuple[list[str], list[str]]:
    now = Scratch.of(storage)
    incoming = storage / INCOMING

    def has_data(name: str) -> bool:
        try:
            return (incoming / name).stat().st_size > 0
        except FileNotFoundError:  # a spare the running engine just took or removed
            return False

    temps = sorted(name for name in now.temps if name in crashed.temps or has_data(name))
    area = StorageArea(storage, storage / QUARANTINE, fsync=False)
    open_batches = [name for name, _ in area.journals()]
    stale = [f"{name} (log of the crashed run)" for name in now.journals & crashed.journals]
    return temps, sorted({*open_batches, *stale})


# The counters the index keeps, against its rows: each query names what disagrees (SQL
# both index backends run; tests/burst.py runs them on PostgreSQL too).
COUNTER_CHECKS = (
    "SELECT 'series ' || s.series_uid FROM series s WHERE s.num_instances != "
    "(SELECT COUNT(*) FROM instances i WHERE i.series_uid = s.series_uid)",
    "SELECT 'study ' || s.study_uid FROM studies s WHERE s.num_instances != "
    "(SELECT COUNT(*) FROM instances i WHERE i.study_uid = s.study_uid)",
    "SELECT 'study ' || s.study_uid || ' (series count)' FROM studies s WHERE s.num_series"
    " != (SELECT COUNT(*) FROM series r WHERE r.study_uid = s.study_uid)",
)


def _counter_mismatches(index_path: Path) -> list[str]:
    with contextlib.closing(_connect(index_path)) as db:
        return sorted(str(r[0]) for sql in COUNTER_CHECKS for r in db.execute(sql).fetchall())
