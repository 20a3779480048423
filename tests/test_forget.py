"""Removing rows whose files are gone (``Index.forget``), on both backends.

The series, studies and patients left without instances go too, and only those: a
patient keeps its row while another of its studies has instances.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydicom.uid import generate_uid

from engine.index.base import Index
from engine.index.postgresql import PostgresIndex
from engine.index.sqlite import SQLiteIndex
from tests.helpers import ct_dataset
from tests.test_forward import instance_row, keep


def test_forget_removes_what_is_left_empty(tmp_path: Path, index_url: str) -> None:
    async def scenario() -> None:
        index: Index = (
            PostgresIndex(index_url, durable=False)
            if index_url
            else SQLiteIndex(tmp_path / "index.sqlite", durable=False)
        )
        await index.open()
        try:
            first, second, other = generate_uid(), generate_uid(), generate_uid()
            a = [ct_dataset(first, generate_uid(), n, patient_id="P1") for n in (1, 2)]
            b = [ct_dataset(second, generate_uid(), n, patient_id="P1") for n in (1, 2)]
            c = [ct_dataset(other, generate_uid(), 1, patient_id="P2")]
            rows = [instance_row(ds, "CT", 1000.0) for ds in a + b + c]
            await index.commit_batch(rows, [], keep)
            assert (await index.stats())["patients"] == 2

            # One instance of a two-instance study: the study stays, counted right.
            await index.forget([str(a[0].SOPInstanceUID)])
            counts = await index.stats()
            assert (counts["patients"], counts["studies"], counts["instances"]) == (2, 3, 4)
            (row,) = await index.read(
                "SELECT num_instances, num_series FROM studies WHERE study_uid = ?", (first,)
            )
            assert tuple(row) == (1, 1)

            # The rest of that study: it goes, its patient stays (another study of P1).
            await index.forget([str(a[1].SOPInstanceUID)])
            counts = await index.stats()
            assert (counts["patients"], counts["studies"], counts["series"]) == (2, 2, 3)

            # P2's only study: P2 goes too; unknown UIDs are ignored.
            await index.forget([str(c[0].SOPInstanceUID), "1.2.3.4.5"])
            counts = await index.stats()
            assert (counts["patients"], counts["studies"], counts["instances"]) == (1, 1, 2)
            patients = await index.read("SELECT patient_id FROM patients")
            assert [tuple(p) for p in patients] == [("P1",)]
        finally:
            await index.close()

    asyncio.run(scenario())
