"""Start-up recovery: settle what an interrupted run left between write and commit.

- Temp files in ``.incoming`` are removed (``StorageArea.prepare``).
- Each journal left behind lists files renamed into place whose rows may not be
  committed. A file that is indexed stays; a file whose UID is indexed with another
  file is removed (a losing duplicate); a file with no row is indexed from its own
  header, or quarantined if it does not parse. Another copy of an indexed file's
  instance beside it (replaced by an overwrite just before the crash) is removed.
- After an unclean stop, every row whose file is missing is removed from the index
  (with an error line each), so the engine never serves a row without a file.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from pydicom import dcmread

from engine.duplicates import Decision
from engine.errors import StorageError
from engine.index.base import Index, InstanceRow
from engine.stages.validate import check_uids, extract
from engine.storage import files
from engine.storage.area import SUFFIX, StorageArea

log = logging.getLogger(__name__)

# Up to this many missing files are always taken as the loss of an unclean stop.
MISSING_LIMIT = 10


def _row_from_file(path: Path, rel_path: str, entry: dict[str, Any]) -> InstanceRow:
    ds = dcmread(path, stop_before_pixels=True)
    check_uids(ds, str(ds.SOPClassUID), str(entry["sop_instance_uid"]))
    return InstanceRow(
        attributes=extract(ds),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        path=rel_path,
        size=path.stat().st_size,
        digest=str(entry["digest"]),
        received_at=float(entry["received_at"]),
        calling_ae=str(entry.get("calling_ae", "")),
        called_ae=str(entry.get("called_ae", "")),
        peer_ip=str(entry.get("peer_ip", "")),
    )


def _replaced_copies(storage: StorageArea, rel_path: str, uid: str) -> list[str]:
    """Other copies of this indexed file's instance in its folder.

    An overwrite commits the new file's row, then removes the copy it replaced; that
    copy is in no journal, so a crash between the two would leave it without a row.
    Names are ``<SOPInstanceUID>.<digest16>[.<node>].dcm``: match the UID exactly, never
    a longer UID that starts with it, and only this node's files.
    """
    folder, name = storage.absolute(rel_path).parent, rel_path.rsplit("/", 1)[-1]
    copies = []
    for path in folder.glob(f"{uid}.*{SUFFIX}"):
        parsed = files.parse_name(path.name)
        if (
            path.name != name
            and parsed is not None
            and parsed.uid == uid
            and parsed.node == storage.node
        ):
            copies.append(f"{rel_path.rsplit('/', 1)[0]}/{path.name}")
    return copies


def _quarantine_file(
    storage: StorageArea, rel_path: str, entry: dict[str, Any], reason: str
) -> None:
    """Keep a journaled file that does not parse in the quarantine, with a note."""
    path = storage.absolute(rel_path)
    note: dict[str, Any] = {
        "reason": f"found at start-up after an interrupted write; does not parse: {reason}",
        "outcome": "recovery",
        "path": rel_path,
    }
    for key in ("sop_instance_uid", "digest", "received_at", "calling_ae", "called_ae", "peer_ip"):
        note[key] = entry.get(key)
    storage.quarantine((path.read_bytes(),), note, path.suffix)


async def replay_journals(storage: StorageArea, index: Index) -> int:
    """Settle every journal left behind; returns how many files were indexed."""
    indexed = 0
    for name, entries in storage.journals():
        existing = await index.lookup([str(e["sop_instance_uid"]) for e in entries])
        rows: list[InstanceRow] = []
        removals: list[str] = []
        settled = True
        lost: list[str] = []
        for entry in entries:
            rel_path = str(entry["path"])
            path = storage.absolute(rel_path)
            found = existing.get(str(entry["sop_instance_uid"]))
            if not path.exists():
                if found is not None and found.path == rel_path:
                    # Committed, but the flush that would have made the file durable
                    # did not finish: never acknowledged; forget the row.
                    log.error("recovery: %s was indexed but its file is missing", rel_path)
                    lost.append(str(entry["sop_instance_uid"]))
                continue
            if found is not None:
                if found.path != rel_path:
                    removals.append(rel_path)
                else:
                    uid = str(entry["sop_instance_uid"])
                    copies = await asyncio.to_thread(_replaced_copies, storage, rel_path, uid)
                    for copy in copies:
                        log.warning("recovery: removing %s, replaced by an overwrite", copy)
                    removals.extend(copies)
                continue
            try:
                rows.append(await asyncio.to_thread(_row_from_file, path, rel_path, entry))
            except Exception as exc:
                log.error("recovery: %s does not parse (%s); quarantining it", rel_path, exc)
                try:
                    await asyncio.to_thread(_quarantine_file, storage, rel_path, entry, str(exc))
                except OSError as error:
                    log.error("recovery: cannot quarantine %s (%s); left in place", rel_path, error)
                    settled = False  # keep the journal: the next start tries again
                    continue
                removals.append(rel_path)
        if rows:
            report = await index.commit_batch(
                rows, [], lambda found, digest: Decision.NEW if found is None else Decision.KEEP
            )
            removals.extend(report.unreferenced)
            indexed += sum(d is Decision.NEW for d in report.decisions)
        if lost:
            await index.forget(lost)
        await asyncio.to_thread(storage.remove, removals)
        if settled:
            storage.end_journal(name)
    storage.clear_settled_journals()
    if indexed:
        log.warning("recovery: indexed %d files written before an interrupted commit", indexed)
    return indexed


async def drop_missing(storage: StorageArea, index: Index) -> int:
    """Remove index rows whose file is gone; returns how many."""
    # A node sharing the index checks its own files only (the others check theirs).
    rows = await index.paths(f".{storage.node}{SUFFIX}" if storage.node else "")
    if not rows:
        return 0  # a new storage folder, or nothing to check
    log.info("checking that the %d indexed files exist (the last stop was not clean)", len(rows))

    def missing() -> list[str]:
        return [uid for uid, rel in rows if not storage.absolute(rel).exists()]

    gone = await asyncio.to_thread(missing)
    if len(gone) > MISSING_LIMIT and len(gone) * 2 > len(rows):
        # A crash loses at most the last moments' files; most of the archive missing
        # means the wrong folder, or a disk that is not there. Never forget the index.
        raise StorageError(
            f"{len(gone)} of {len(rows)} indexed files are missing from {storage.root};"
            " is the right disk or NAS mounted? Refusing to start."
        )
    for uid in gone:
        log.error("recovery: the file of %s is missing; removing its index row", uid)
    if gone:
        await index.forget(gone)
    return len(gone)


async def recover(storage: StorageArea, index: Index, was_clean: bool) -> None:
    await replay_journals(storage, index)
    if not was_clean:
        await drop_missing(storage, index)
