"""``python -m bench index``: C-FIND at a large index, and ingest with it.

1. Fills an index with synthetic instances (default 1,000,000: 10,000 studies of 100,
   realistic names, dates, modalities, accession numbers) through the engine's own
   index writer (``SQLiteIndex.commit_batch``, the batches the pipeline commits).
2. Measures C-FIND in process (``QueryEngine.search``: the SQL and the response
   identifiers, no network, no process start-up) for the queries a viewer sends,
   each with several different values: p50 and p95 in milliseconds.
3. Measures the ingest rate of a burst (storescu, as ``bench run``) into an engine
   whose index already holds those instances, against one with an empty index,
   interleaved, ``--repeat`` times each.

Results: ``index.json`` and ``index.md`` in ``--out``.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pydicom.dataset import Dataset

from bench import generate
from bench.peers import EnginePeer
from bench.replay import Scenario, run_once
from engine.config import QueryConfig
from engine.dicom.qr import QueryEngine
from engine.duplicates import Decision
from engine.index.base import InstanceRow
from engine.index.sqlite import SQLiteIndex
from engine.query.find import Model

FAMILY = ["SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS",
          "RODRIGUEZ", "MARTINEZ", "HERNANDEZ", "LOPEZ", "GONZALEZ", "WILSON", "ANDERSON",
          "THOMAS", "TAYLOR", "MOORE", "JACKSON", "MARTIN", "LEE", "PEREZ", "THOMPSON",
          "WHITE", "HARRIS", "SANCHEZ", "CLARK", "RAMIREZ", "LEWIS", "ROBINSON", "SATO",
          "SUZUKI", "TAKAHASHI", "TANAKA", "WATANABE", "ITO", "YAMAMOTO", "NAKAMURA"]  # fmt: skip
GIVEN = ["JAMES", "MARY", "ROBERT", "PATRICIA", "JOHN", "JENNIFER", "MICHAEL", "LINDA",
         "DAVID", "ELIZABETH", "WILLIAM", "BARBARA", "HIROSHI", "YUKI", "KENJI",
         "AKIKO"]  # fmt: skip
MODALITIES = ["CT", "CT", "CT", "MR", "MR", "CR", "DX", "US", "PT", "NM"]
SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
OTHER_CLASS = "1.2.840.10008.5.1.4.1.1.1"  # CR
ROOT = "1.2.826.0.1.3680043.8.498.99"
BATCH = 2000


def _progress(label: str, done: int, total: int) -> None:
    print(f"\r{label}: {done}/{total} ({100 * done // max(total, 1)}%)", end="", file=sys.stderr)


def synthetic_rows(
    studies: int, per_study: int, seed: int, first_patient: int = 0
) -> list[InstanceRow]:
    """``studies`` x ``per_study`` instance rows: 1-4 series per study, about three
    studies per patient, patients numbered from ``first_patient``."""
    rng = random.Random(seed)
    rows = []
    patients = max(1, studies // 3)
    for s in range(studies):
        p = first_patient + rng.randrange(patients)
        prng = random.Random(p)
        name = f"{prng.choice(FAMILY)}^{prng.choice(GIVEN)}"
        study_uid = f"{ROOT}.1.{s}"
        date = f"{2021 + s % 5}{1 + rng.randrange(12):02d}{1 + rng.randrange(28):02d}"
        modality = rng.choice(MODALITIES)
        series_count = 1 + rng.randrange(4)
        for i in range(per_study):
            series = i % series_count
            attributes: dict[str, Any] = {
                "patient_id": f"PID{p:07d}",
                "issuer_of_patient_id": "",
                "patient_name": name,
                "patient_birth_date": f"19{40 + p % 60:02d}0101",
                "patient_sex": "MF"[p % 2],
                "study_uid": study_uid,
                "study_date": date,
                "study_time": f"{8 + s % 10:02d}{s % 60:02d}00",
                "accession_number": f"ACC{s:08d}",
                "study_id": str(s % 1000),
                "study_description": f"{modality} EXAM",
                "referring_physician_name": "REFERRER^A",
                "series_uid": f"{study_uid}.{series}",
                "modality": modality,
                "series_number": series + 1,
                "series_description": f"SERIES {series + 1}",
                "series_date": date,
                "series_time": None,
                "body_part_examined": "CHEST",
                "station_name": "BENCH",
                "sop_instance_uid": f"{study_uid}.{series}.{i}",
                "sop_class_uid": SOP_CLASS.get(modality, OTHER_CLASS),
                "instance_number": i + 1,
                "content_date": date,
                "content_time": None,
                "rows": 512,
                "columns": 512,
                "number_of_frames": None,
                "specific_character_set": None,
            }
            rows.append(
                InstanceRow(
                    attributes=attributes,
                    transfer_syntax="1.2.840.10008.1.2.1",
                    path=f"synthetic/{study_uid}/{i}.dcm",
                    size=526000,
                    digest=f"{s:032x}{i:032x}",
                    received_at=time.time(),
                    calling_ae="BENCH",
                    called_ae="ENGINE",
                    peer_ip="127.0.0.1",
                )
            )
    return rows


async def fill(path: Path, studies: int, per_study: int, seed: int) -> float:
    """Index the synthetic rows in batches; returns the rows per second."""
    index = SQLiteIndex(path, durable=False)
    await index.open()
    total = studies * per_study
    done = 0
    started = time.monotonic()
    try:
        chunk = max(1, 20_000 // per_study)  # studies generated at a time
        for first in range(0, studies, chunk):
            count = min(chunk, studies - first)
            rows = synthetic_rows(count, per_study, seed + first, first_patient=first // 3)
            # Offset the study numbers of this chunk so that every UID stays unique.
            for row in rows:
                for key in ("study_uid", "series_uid", "sop_instance_uid"):
                    row.attributes[key] = row.attributes[key].replace(
                        f"{ROOT}.1.", f"{ROOT}.{seed + first}.", 1
                    )
                row.attributes["accession_number"] += f"-{first}"
            for start in range(0, len(rows), BATCH):
                await index.commit_batch(
                    rows[start : start + BATCH], [], lambda found, digest: Decision.NEW
                )
                done += len(rows[start : start + BATCH])
                _progress("filling the index", done, total)
    finally:
        await index.close()
    print(file=sys.stderr)
    return done / (time.monotonic() - started)


def _ident(level: str, **values: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


STUDY_KEYS = {
    "StudyInstanceUID": "",
    "PatientName": "",
    "PatientID": "",
    "StudyDate": "",
    "AccessionNumber": "",
    "ModalitiesInStudy": "",
    "NumberOfStudyRelatedInstances": "",
    "StudyDescription": "",
}


def queries(path: Path, rng: random.Random, n: int) -> dict[str, list[Dataset]]:
    """``n`` identifiers per typical viewer query, with values taken from the index."""
    import sqlite3

    db = sqlite3.connect(path)
    try:
        studies = db.execute(
            "SELECT study_uid, patient_id, accession_number, study_date FROM studies"
            " ORDER BY random() LIMIT ?",
            (n,),
        ).fetchall()
    finally:
        db.close()
    out: dict[str, list[Dataset]] = {
        "patient name with wildcard (STUDY)": [],
        "patient ID (STUDY)": [],
        "date range, one week (STUDY)": [],
        "accession number (STUDY)": [],
        "modality in study + date (STUDY)": [],
        "study UID (STUDY)": [],
        "series of one study (SERIES)": [],
    }
    for study_uid, patient_id, accession, date in studies:
        family = rng.choice(FAMILY)
        week = f"{date[:6]}01-{date[:6]}07"
        out["patient name with wildcard (STUDY)"].append(
            _ident("STUDY", **{**STUDY_KEYS, "PatientName": f"{family}^{rng.choice(GIVEN)[:2]}*"})
        )
        out["patient ID (STUDY)"].append(_ident("STUDY", **{**STUDY_KEYS, "PatientID": patient_id}))
        out["date range, one week (STUDY)"].append(
            _ident("STUDY", **{**STUDY_KEYS, "StudyDate": week})
        )
        out["accession number (STUDY)"].append(
            _ident("STUDY", **{**STUDY_KEYS, "AccessionNumber": accession})
        )
        out["modality in study + date (STUDY)"].append(
            _ident("STUDY", **{**STUDY_KEYS, "ModalitiesInStudy": "MR", "StudyDate": date})
        )
        out["study UID (STUDY)"].append(
            _ident("STUDY", **{**STUDY_KEYS, "StudyInstanceUID": study_uid})
        )
        out["series of one study (SERIES)"].append(
            _ident(
                "SERIES",
                StudyInstanceUID=study_uid,
                SeriesInstanceUID="",
                Modality="",
                SeriesNumber="",
                NumberOfSeriesRelatedInstances="",
            )
        )
    return out


def measure_find(path: Path, n: int, seed: int) -> dict[str, dict[str, float]]:
    engine = QueryEngine(path, QueryConfig(), Path("/nonexistent"))
    results: dict[str, dict[str, float]] = {}
    for label, identifiers in queries(path, random.Random(seed), n).items():
        times, counts = [], []
        for identifier in identifiers:
            started = time.perf_counter()
            found = engine.search(Model.STUDY_ROOT, identifier)
            times.append((time.perf_counter() - started) * 1000)
            counts.append(len(found.matches))
        times.sort()
        results[label] = {
            "p50_ms": round(statistics.median(times), 2),
            "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 2),
            "median_matches": statistics.median(counts),
        }
        print(f"  {label}: p50 {results[label]['p50_ms']} ms", file=sys.stderr)
    return results


@dataclass
class PrefilledEnginePeer(EnginePeer):
    """The engine on a copy of the large index: it counts only what this run added."""

    already: int = 0

    def count_instances(self) -> int:
        return super().count_instances() - self.already

    def verify_count(self) -> int:
        return super().verify_count() - self.already


def measure_ingest(
    index: Path, work: Path, files: list[Path], studies: int, repeat: int, already: int
) -> dict[str, list[float]]:
    """Instances/s of a burst at C=1 into an engine with the big index and an empty one."""
    rates: dict[str, list[float]] = {"empty index": [], "large index": []}
    for r in range(1, repeat + 1):
        for label in rates:
            folder = work / f"ingest-{r}-{label.split()[0]}"
            folder.mkdir(parents=True)
            if label == "large index":
                shutil.copy(index, folder / "index.sqlite")
                # The rows point at no files: mark the last stop clean so that the
                # engine's start-up does not check (and refuse) a million missing files.
                (folder / "storage").mkdir()
                (folder / "storage" / ".clean-shutdown").write_bytes(b"")
            peer: EnginePeer = (
                PrefilledEnginePeer(folder, already=already)
                if label == "large index"
                else EnginePeer(folder)
            )
            result = run_once(peer, files, studies, Scenario.BURST, 1, "explicit", r)
            if not result.verified:
                raise RuntimeError(f"ingest run not verified: {result.error}")
            rates[label].append(result.instances_per_s)
            print(f"  {label}, repeat {r}: {result.instances_per_s:g}/s", file=sys.stderr)
    return rates


def main(
    out: Path, instances: int, per_study: int, queries_per_type: int, repeat: int, cache: Path
) -> int:
    out.mkdir(parents=True, exist_ok=True)
    studies = max(1, instances // per_study)
    work = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        index = work / "large.sqlite"
        print(f"filling an index with {studies * per_study} instances ...", file=sys.stderr)
        fill_rate = asyncio.run(fill(index, studies, per_study, seed=1))
        print("C-FIND, in process:", file=sys.stderr)
        find = measure_find(index, queries_per_type, seed=2)
        ingest: dict[str, list[float]] = {"empty index": [], "large index": []}
        if repeat > 0:
            spec = generate.StudySpec(studies=2)
            files = generate.cached(spec, generate.Syntax.EXPLICIT, cache)
            print("ingest of 600 instances at C=1, large index against empty:", file=sys.stderr)
            ingest = measure_ingest(index, work, files, spec.studies, repeat, studies * per_study)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Each repeat runs both back to back: the median of the pairs' ratios is what the
    # machine's drift from minute to minute disturbs least.
    pairs = zip(ingest["large index"], ingest["empty index"], strict=True)
    ratios = [large / empty for large, empty in pairs]
    ratio = round(statistics.median(ratios), 2) if ratios else None
    result = {
        "instances": studies * per_study,
        "studies": studies,
        "fill_rows_per_s": round(fill_rate),
        "find": find,
        "ingest_instances_per_s": ingest,
        "ingest_ratio_large_over_empty": ratio,
        "command": "python -m bench " + " ".join(sys.argv[1:]),
    }
    (out / "index.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    lines = [
        "# C-FIND and ingest at a large index",
        "",
        f"Command: `{result['command']}`",
        "",
        f"{result['instances']} instances in {studies} studies, indexed at "
        f"{result['fill_rows_per_s']} rows/s through the engine's index writer.",
        "",
        "| query | p50 ms | p95 ms | median matches |",
        "| --- | --- | --- | --- |",
        *[
            f"| {label} | {v['p50_ms']} | {v['p95_ms']} | {v['median_matches']:g} |"
            for label, v in find.items()
        ],
        "",
        "Ingest not measured (`--repeat 0`)."
        if ratio is None
        else "Ingest, 600 CT instances at C=1, instances/s per repeat: "
        + "; ".join(f"{label}: {', '.join(f'{x:g}' for x in v)}" for label, v in ingest.items())
        + f". Large / empty, median of the repeats' ratios: {ratio}x.",
        "",
    ]
    (out / "index.md").write_text("\n".join(lines))
    print(f"wrote {out / 'index.md'}", file=sys.stderr)
    return 0
