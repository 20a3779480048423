"""The OHIF viewer, in headless Chromium, shows what C-STORE ingested.

End to end: dcmtk's storescu sends two CT studies, OHIF's study list (QIDO-RS against the
engine's DICOMweb root) shows both patients, and opening one renders a slice (WADO-RS metadata
and frames), with no failed DICOMweb request. The viewer is served from another port than the
DICOMweb root, so the engine's CORS answers are part of the test.

The screenshots and the list of DICOMweb requests are kept in ``$OHIF_ARTIFACTS``, by default
``.pytest_cache/d/ohif/artifacts/``; the test prints their paths.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import ohif
from tests.helpers import Engine, free_port, storescu

MISSING = ohif.missing_tools()
pytestmark = [pytest.mark.peers, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


@pytest.fixture(scope="session")
def ohif_cache(pytestconfig: pytest.Config) -> Path:
    """Where the viewer's tarball and site are kept between sessions ($OHIF_CACHE to choose)."""
    if "OHIF_CACHE" in os.environ:
        return Path(os.environ["OHIF_CACHE"])
    cache = getattr(pytestconfig, "cache", None)
    return cache.mkdir("ohif") if cache is not None else ohif.DEFAULT_CACHE


@pytest.fixture(scope="session")
def ohif_dist(ohif_cache: Path) -> Path:
    return ohif.ohif_dist(ohif_cache)


@pytest.fixture
def artifacts(ohif_cache: Path) -> Path:
    folder = Path(os.environ.get("OHIF_ARTIFACTS") or ohif_cache / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def web_engine(tmp_path: Path) -> Iterator[tuple[Engine, str]]:
    """An engine with its DICOMweb server, and the DICOMweb root a viewer is given."""
    web_port = free_port()
    dicomweb = {"host": "127.0.0.1", "port": web_port, "cors_origins": ["*"]}
    engine = Engine(tmp_path / "engine", overrides={"dicomweb": dicomweb}).start()
    yield engine, f"http://127.0.0.1:{web_port}/dicom-web"
    if engine.process is not None:
        assert engine.stop() == 0, engine.log()


@pytest.mark.timeout(90, func_only=True)
def test_ohif_lists_and_renders_stored_studies(
    web_engine: tuple[Engine, str],
    ohif_dist: Path,
    artifacts: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    record_property: Callable[[str, object], None],
) -> None:
    engine, root = web_engine
    studies = {
        name: ohif.write_phantom_study(tmp_path / "data" / patient_id, name, patient_id)
        for name, patient_id in ohif.PATIENTS.items()
    }
    storescu(engine, str(tmp_path / "data"))

    log = ohif.DicomwebLog(root)
    console: list[str] = []
    study_list = artifacts / "ohif-study-list.png"
    viewport = artifacts / "ohif-viewport.png"
    requests = artifacts / "ohif-dicomweb-requests.txt"
    try:
        with ohif.OhifSite(ohif_dist, root) as site, ohif.chromium_page(console) as page:
            log.attach(page)
            names = [ohif.ohif_name(name) for name in studies]
            rows = ohif.show_study_list(page, site, names, study_list)
            assert_no_failed_request(log)
            assert sorted(row.split(" | ")[0] for row in rows) == sorted(names), rows

            stats = ohif.show_study(page, site, next(iter(studies.values())), viewport)
            log.wait_quiet(page)
            assert_no_failed_request(log)
            assert ohif.rendered(stats), (
                f"blank viewport: {stats[0]} grey levels, {stats[1]:.0%} lit"
            )
            assert any("/frames/" in call.url for call in log.calls), log.report()
    finally:
        requests.write_text(log.report() + "\n")
        record_property("ohif_viewport_screenshot", str(viewport))
        with capsys.disabled():
            print(f"\nOHIF screenshots: {study_list} {viewport}\nOHIF requests: {requests}")
        # Shown by pytest when the test fails.
        print("DICOMweb requests:", log.report(), sep="\n")
        print("console errors:", *console, sep="\n  ")


def assert_no_failed_request(log: ohif.DicomwebLog) -> None:
    failed = log.failures()
    assert not failed, "failed DICOMweb requests:\n" + "\n".join(
        call.describe(log.root) for call in failed
    )
