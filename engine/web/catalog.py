"""What WADO-RS reads from the index: the stored instances of a study, series or instance.

Blocking code over a short-lived read-only index connection (``engine/index/reads.py``),
run in a worker thread (as the C-FIND and C-MOVE queries are). The headers kept at ingest
(``instance_headers``) come with each row, so metadata needs no file reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.index.reads import Reads, reads_of

# Sort order of a retrieval: series by number, instances by number.
_ORDER = "se.series_number, i.series_uid, i.instance_number, i.sop_instance_uid"


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """One indexed instance and where its file is."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path
    number_of_frames: int | None
    header: bytes | None  # the dataset up to its pixel data, when kept at ingest


class Catalog:
    def __init__(self, index: Reads | Path, storage_root: Path) -> None:
        self.reads = reads_of(index)
        self.storage_root = storage_root

    def instances(
        self,
        study: str,
        series: str | None = None,
        instance: str | None = None,
        *,
        with_headers: bool = False,
    ) -> list[StoredInstance]:
        """The instances of a study, of one of its series, or one instance of it."""
        where = ["i.study_uid = ?"]
        params = [study]
        if series is not None:
            where.append("i.series_uid = ?")
            params.append(series)
        if instance is not None:
            where.append("i.sop_instance_uid = ?")
            params.append(instance)
        header = "h.header" if with_headers else "NULL"
        join = (
            "LEFT JOIN instance_headers h ON h.sop_instance_uid = i.sop_instance_uid"
            if with_headers
            else ""
        )
        sql = (
            "SELECT i.study_uid, i.series_uid, i.sop_instance_uid, i.sop_class_uid,"
            f" i.transfer_syntax, i.path, i.number_of_frames, {header}"
            f" FROM instances i JOIN series se ON se.series_uid = i.series_uid {join}"
            f" WHERE {' AND '.join(where)} ORDER BY {_ORDER}"
        )
        with self.reads.connect() as db:
            rows = db.execute(sql, params).fetchall()
        return [
            StoredInstance(
                study_uid,
                series_uid,
                uid,
                sop_class,
                syntax,
                self.storage_root / path,
                frames,
                bytes(blob) if blob is not None else None,
            )
            for study_uid, series_uid, uid, sop_class, syntax, path, frames, blob in rows
        ]
