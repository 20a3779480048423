"""The bench cannot rot: a tiny run end to end, and honest verification of runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench import generate, index, metadata, report
from bench.peers import StorescpPeer
from bench.replay import Scenario, run_once, split
from tests.helpers import REPO

pytestmark = pytest.mark.peers

TINY = ["--studies", "1", "--series", "2", "--slices", "3", "--rows", "64", "--columns", "64"]


def test_bench_smoke_run_writes_verified_reports(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            "--out",
            str(out),
            *TINY,
            "--peers",
            "engine,storescp",
            "--repeat",
            "1",
            "--concurrency",
            "1,2",
            "--cache",
            str(tmp_path / "cache"),
            "--work",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = orjson.loads((out / "results.json").read_bytes())
    runs = results["runs"]
    assert {(r["peer"], r["concurrency"]) for r in runs} == {
        ("engine", 1),
        ("engine", 2),
        ("storescp", 1),
        ("storescp", 2),
    }
    for run in runs:
        assert run["verified"] is True
        assert run["instances"] == run["stored"] == 6
        assert run["instances_per_s"] > 0 and run["peak_rss_mb"] > 0
        # The storescu clients ran and took CPU; the machine was busy, within its cores.
        assert run["client_cpu_s"] > 0
        assert 0 < run["machine_busy_pct"] <= 100
    engine_runs = [r for r in runs if r["peer"] == "engine"]
    assert all(r["latency_p50_ms"] is not None for r in engine_runs)
    table = (out / "results.md").read_text()
    assert "| burst | 1 | explicit | engine |" in table
    assert "| clients CPU s | machine busy % |" in table
    assert "vs storescp" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[4/4]" in done.stderr  # progress display


def test_a_run_that_loses_an_instance_is_not_verified(tmp_path: Path) -> None:
    spec = generate.StudySpec(studies=1, series=1, slices=3, rows=32, columns=32)
    files = generate.generate(spec, tmp_path / "study")
    # storescu cannot send this one: the peer ends up holding fewer than were sent.
    broken = tmp_path / "study" / "zz_broken.dcm"
    broken.write_bytes(b"not a DICOM file")
    peer = StorescpPeer(tmp_path / "peer")
    result = run_once(
        peer, [*files, broken], 1, Scenario.PER_INSTANCE, 1, "explicit", 1, queryable_timeout=2.0
    )
    assert result.stored == 3
    assert result.instances == 4
    assert result.verified is False
    assert result.error


def test_reports_leave_unverified_runs_out_of_the_figures() -> None:
    def run(peer: str, rate: float, verified: bool) -> dict[str, object]:
        return {
            "peer": peer,
            "scenario": "burst",
            "concurrency": 1,
            "syntax": "explicit",
            "repeat": 1,
            "instances_per_s": rate,
            "mb_per_s": 1.0,
            "studies_per_s": 1.0,
            "peak_rss_mb": 1.0,
            "cpu_s": 1.0,
            "verified": verified,
            "error": "" if verified else "lost 1",
            "latency_p50_ms": None,
            "latency_p99_ms": None,
            "queryable_after_s": 0.0,
        }

    runs = [run("engine", 100.0, True), run("engine", 900.0, False), run("orthanc", 50.0, True)]
    summaries = report.summarise(runs)
    engine = next(s for s in summaries if s.group.peer == "engine")
    assert engine.median["instances_per_s"] == 100.0
    assert engine.failed == 1
    assert report.ratios(summaries) == {("burst", 1, "explicit", "engine"): {"orthanc": 2.0}}
    meta = {
        "command": "x",
        "instances": 1,
        "studies": 1,
        "megabytes": 1.0,
        "syntaxes": ["explicit"],
        "repeats": 2,
        "machine": "m",
    }
    text = report.markdown(summaries, meta, [r for r in runs if not r["verified"]])
    assert "Failed runs" in text and "lost 1" in text
    assert "| 100 (100-100) |" not in text and "| 100 |" in text


def test_split_keeps_series_together_and_loses_nothing() -> None:
    files = [Path(f"f{i}") for i in range(10)]
    shares = split(files, 4)
    assert [len(s) for s in shares] == [3, 3, 2, 2]
    assert [f for share in shares for f in share] == files
    assert split(files[:2], 4) == [[files[0]], [files[1]]]


def test_bench_index_fills_and_queries_a_small_index(tmp_path: Path) -> None:
    """The million-instance bench, in miniature (no ingest runs), so that it cannot rot."""
    assert index.main(tmp_path, 3000, 100, 4, 0, tmp_path / "cache") == 0
    result = orjson.loads((tmp_path / "index.json").read_bytes())
    assert result["instances"] == 3000
    assert set(result["find"]) >= {"study UID (STUDY)", "series of one study (SERIES)"}
    assert result["find"]["study UID (STUDY)"]["median_matches"] == 1
    assert "Ingest not measured" in (tmp_path / "index.md").read_text()


def test_bench_metadata_smoke_verifies_the_engine_answer(tmp_path: Path) -> None:
    """``bench metadata`` in miniature: one study of 20, the engine only."""
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "metadata",
            "--out",
            str(out),
            "--instances",
            "20",
            "--repeat",
            "1",
            "--peers",
            "engine",
            "--cache",
            str(tmp_path / "cache"),
            "--work",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = orjson.loads((out / "metadata.json").read_bytes())
    assert (report["instances"], report["series"], report["slices"]) == (20, 4, 5)
    (engine,) = report["peers"]
    assert engine["peer"] == "engine"
    assert engine["verified"] is True, engine["error"]
    assert engine["stored"] == engine["objects"] == 20
    assert engine["content_type"].startswith("application/dicom+json")
    assert len(engine["warm_s"]) == 1 and engine["cold_s"] > 0 and engine["median_s"] > 0
    assert engine["answer_bytes"] > 20 * 1000
    assert report["ratio_engine_over_orthanc"] is None  # Orthanc not measured
    assert "| engine |" in (out / "metadata.md").read_text()
    assert "metadata cold" in done.stderr  # progress display


def test_metadata_check_refuses_wrong_answers() -> None:
    study = metadata.Study([Path("a"), Path("b")], "1.2.3", frozenset({"1.2.3.1", "1.2.3.2"}))

    def item(uid: str, study_uid: str = "1.2.3") -> dict[str, object]:
        return {
            "00080018": {"vr": "UI", "Value": [uid]},
            "0020000D": {"vr": "UI", "Value": [study_uid]},
        }

    def check(answer: object) -> tuple[int, str]:
        return metadata.check(orjson.dumps(answer), study)

    assert check([item("1.2.3.2"), item("1.2.3.1")]) == (2, "")
    assert "1 instances missing" in check([item("1.2.3.1")])[1]
    assert "duplicate" in check([item("1.2.3.1"), item("1.2.3.1")])[1]
    assert "unexpected" in check([item("1.2.3.1"), item("1.2.3.9")])[1]
    assert "not in study" in check([item("1.2.3.1"), item("1.2.3.2", "9.9")])[1]
    assert "no SOPInstanceUID" in check([item("1.2.3.1"), {"0020000D": {}}])[1]
    assert "not a list" in check({"00080018": {}})[1]
    assert "not JSON" in metadata.check(b"<html>", study)[1]
