"""Prometheus metrics at /metrics, scraped from a real engine process and parsed with
prometheus_client's own parser: exact counts after a known set of stores."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math
import os
import sqlite3
import time
import tomllib
import uuid
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode

from engine import config as config_module
from engine import status
from engine.config import MetricsConfig
from engine.errors import ConfigError
from engine.metrics import IndexReadings, Metrics, read_index, status_label
from engine.model import Outcome
from tests.helpers import REPO, Engine, ct_dataset, free_port, send_datasets

QUEUES = ("validate", "index")
WAIT = 30.0
POLL = 0.05
EVERY_STATUS = {status_label(status.for_outcome(o)) for o in Outcome}


# -- helpers -------------------------------------------------------------------------


def scrape(url: str, **kwargs: Any) -> list[Metric]:
    response = requests.get(url, timeout=WAIT, **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return list(text_string_to_metric_families(response.text))


def samples(families: list[Metric], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called ``name``, by its labels."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in families
        for s in family.samples
        if s.name == name
    }


def value(families: list[Metric], name: str, **labels: str) -> float:
    found = samples(families, name)
    key = tuple(sorted(labels.items()))
    assert key in found, f"no sample {name}{labels}; have {sorted(found)}"
    return found[key]


def statuses(families: list[Metric]) -> dict[str, float]:
    return {
        dict(labels)["status"]: v
        for labels, v in samples(families, "dicom_store_responses_total").items()
    }


def wait_for(url: str, name: str, expected: float, **kwargs: Any) -> list[Metric]:
    """Scrape until ``name`` is ``expected`` (associations end a moment after release)."""
    deadline = time.monotonic() + WAIT
    while True:
        families = scrape(url, **kwargs)
        if value(families, name) == expected or time.monotonic() > deadline:
            assert value(families, name) == expected, name
            return families
        time.sleep(POLL)


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (from /proc: its sockets' inodes)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def index_tables(engine: Engine) -> set[str]:
    sql = (
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        if engine.postgresql
        else "SELECT name FROM sqlite_master WHERE type='table'"
    )
    return {str(row[0]) for row in engine.query_rows(sql)}


def stow(url: str, datasets: list[Dataset]) -> requests.Response:
    boundary = uuid.uuid4().hex
    body = b""
    for ds in datasets:
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True)
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += out.getvalue() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=WAIT)


@contextlib.contextmanager
def running(engine: Engine) -> Iterator[Engine]:
    engine.start()
    try:
        yield engine
    finally:
        if engine.process is not None:
            assert engine.stop() == 0, engine.log()


# -- against a running engine ----------------------------------------------------------


def test_metrics_on_the_dicomweb_server_count_every_store(tmp_path: Path, index_url: str) -> None:
    """On each index backend (``index_url``): the index's figures are read from it."""
    web_port = free_port()
    engine = Engine(
        tmp_path / "engine",
        overrides={
            "dicomweb": {"host": "127.0.0.1", "port": web_port},
            "ingest": {"duplicate_policy": "reject"},
        },
        index_url=index_url,
    )
    url = f"http://127.0.0.1:{web_port}/metrics"
    with running(engine):
        at_rest = scrape(url)
        assert value(at_rest, "dicom_instances_received_total") == 0
        assert statuses(at_rest) == dict.fromkeys(EVERY_STATUS, 0)
        for queue in QUEUES:
            assert value(at_rest, "engine_queue_depth", queue=queue) == 0
            assert value(at_rest, "engine_queue_capacity", queue=queue) == 256
        assert value(at_rest, "engine_pipeline_items") == 0
        assert value(at_rest, "dicom_associations_active") == 0
        assert value(at_rest, "process_resident_memory_bytes") > 0
        # Not under the DICOMweb base path: at the server's root only.
        assert (
            requests.get(f"http://127.0.0.1:{web_port}/dicom-web/metrics", timeout=WAIT).status_code
            == 404
        )

        study, series = generate_uid(), generate_uid()
        good = [ct_dataset(study, series, n) for n in range(1, 6)]
        assert send_datasets(engine, good) == [
            (str(ds.SOPInstanceUID), status.SUCCESS) for ds in good
        ]
        variant = copy.deepcopy(good[0])
        variant.PixelData = bytes(len(good[0].PixelData))  # same UID, other content: refused
        missing = ct_dataset(study, series, 6)
        del missing.StudyInstanceUID
        codes = [code for _, code in send_datasets(engine, [variant, missing])]
        assert codes == [status.DUPLICATE_SOP_INSTANCE, status.MISSING_ATTRIBUTE]
        sent = [*good, variant, missing]

        after = wait_for(url, "dicom_associations_active", 0)
        assert value(after, "dicom_instances_received_total") == len(sent)
        # Exactly the dataset bytes the SCU encoded (explicit VR little endian).
        assert value(after, "dicom_received_bytes_total") == sum(
            len(encode(ds, False, True)) for ds in sent
        )
        assert statuses(after) == dict.fromkeys(EVERY_STATUS, 0) | {
            "0x0000": 5,
            "0x0111": 1,
            "0x0120": 1,
        }
        assert value(after, "dicom_store_latency_seconds_count") == len(sent)
        assert 0 < value(after, "dicom_store_latency_seconds_sum") < len(sent) * WAIT
        assert value(after, "dicom_store_latency_seconds_bucket", le="+Inf") == len(sent)
        assert value(after, "engine_quarantined_instances_total") == 2
        assert engine.stats()["quarantined"] == 2
        # Every instance went through one index transaction.
        assert value(after, "engine_index_batch_instances_sum") == len(sent)
        assert 1 <= value(after, "engine_index_batch_instances_count") <= len(sent)
        assert value(after, "dicom_associations_accepted_total") == 2
        assert value(after, "dicom_associations_refused_total") == 0
        for queue in QUEUES:
            assert value(after, "engine_queue_depth", queue=queue) == 0
        # Backup age and forwarding backlog: only once their tables exist (schema 003).
        names = {family.name for family in after}
        tables = index_tables(engine)
        # No backups of a PostgreSQL index (its server's business): no backup age.
        backups = "backups" in tables and not engine.postgresql
        assert ("engine_last_backup_age_seconds" in names) == backups
        assert ("engine_forward_queue_pending" in names) == ("forward_queue" in tables)
        if backups:
            assert value(after, "engine_last_backup_age_seconds") == math.inf  # none yet
        if "forward_queue" in tables:
            assert value(after, "engine_forward_queue_pending") == 0

        # STOW-RS goes through the same door: counted too (no C-STORE latency).
        extra = ct_dataset(study, series, 7)
        assert stow(f"http://127.0.0.1:{web_port}/dicom-web/studies", [extra]).status_code == 200
        stowed = scrape(url)
        assert value(stowed, "dicom_instances_received_total") == len(sent) + 1
        assert statuses(stowed)["0x0000"] == 6
        assert value(stowed, "dicom_store_latency_seconds_count") == len(sent)
        assert "metrics: cannot read the index" not in engine.log()


def test_metrics_on_the_dicomweb_server_need_its_credentials(tmp_path: Path) -> None:
    web_port = free_port()
    engine = Engine(
        tmp_path / "engine",
        overrides={"dicomweb": {"host": "127.0.0.1", "port": web_port, "bearer_token": "s3cret"}},
    )
    url = f"http://127.0.0.1:{web_port}/metrics"
    with running(engine):
        refused = requests.get(url, timeout=WAIT)
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        families = scrape(url, headers={"Authorization": "Bearer s3cret"})
        assert value(families, "dicom_instances_received_total") == 0


def test_metrics_on_their_own_port_count_associations(tmp_path: Path) -> None:
    metrics_port = free_port()
    engine = Engine(
        tmp_path / "engine",
        overrides={
            "metrics": {"host": "127.0.0.1", "port": metrics_port},
            "dicom": {"maximum_associations": 1},
        },
    )
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with running(engine):
        assert engine.process is not None
        assert listening_ports(engine.process.pid) == {engine.port, metrics_port}
        assert f"metrics listening on http://127.0.0.1:{metrics_port}/metrics" in engine.log()
        ae = AE(ae_title="METRICS")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        first = ae.associate("127.0.0.1", engine.port, ae_title=engine.ae_title)
        assert first.is_established
        try:
            held = wait_for(url, "dicom_associations_active", 1)
            assert value(held, "dicom_associations_accepted_total") == 1
            second = ae.associate("127.0.0.1", engine.port, ae_title=engine.ae_title)
            assert second.is_rejected  # one at most
            ds = ct_dataset(generate_uid(), generate_uid(), 1)
            assert first.send_c_store(ds).Status == status.SUCCESS
        finally:
            first.release()
        after = wait_for(url, "dicom_associations_active", 0)
        assert value(after, "dicom_associations_refused_total") == 1
        assert value(after, "dicom_associations_accepted_total") == 1
        assert value(after, "dicom_instances_received_total") == 1
        assert statuses(after)["0x0000"] == 1


def test_a_metrics_section_takes_them_off_the_dicomweb_server(tmp_path: Path) -> None:
    web_port, metrics_port = free_port(), free_port()
    engine = Engine(
        tmp_path / "engine",
        overrides={
            "dicomweb": {"host": "127.0.0.1", "port": web_port},
            "metrics": {"host": "127.0.0.1", "port": metrics_port},
        },
    )
    with running(engine):
        assert engine.process is not None
        assert listening_ports(engine.process.pid) == {engine.port, web_port, metrics_port}
        send_datasets(engine, [ct_dataset(generate_uid(), generate_uid(), 1)])
        families = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert value(families, "dicom_instances_received_total") == 1
        on_web = requests.get(f"http://127.0.0.1:{web_port}/metrics", timeout=WAIT)
        assert on_web.status_code == 404


def test_no_metrics_listener_without_metrics_or_dicomweb(tmp_path: Path) -> None:
    with running(Engine(tmp_path / "engine")) as engine:
        send_datasets(engine, [ct_dataset(generate_uid(), generate_uid(), 1)])
        assert engine.process is not None
        assert listening_ports(engine.process.pid) == {engine.port}
        assert "metrics listening" not in engine.log()


# -- the index's values, without an engine ---------------------------------------------


def _index_with(path: Path, script: str) -> Path:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(script)
    return path


def test_index_values_are_left_out_while_their_tables_are_missing(tmp_path: Path) -> None:
    assert read_index(tmp_path / "absent.sqlite").last_backup is None
    path = _index_with(tmp_path / "index.sqlite", "CREATE TABLE instances (uid TEXT);")
    readings = read_index(path)
    assert readings.last_backup is None and readings.forward_pending is None
    metrics = Metrics()
    metrics.watch_index(path)
    text = asyncio.run(metrics.exposition()).decode()
    assert "engine_last_backup_age_seconds" not in text
    assert "engine_forward_queue_pending" not in text


def test_last_backup_age_and_forward_backlog(tmp_path: Path) -> None:
    path = _index_with(
        tmp_path / "index.sqlite",
        """
        CREATE TABLE backups (finished_at REAL, ok INTEGER);
        CREATE TABLE forward_queue (state TEXT);
        INSERT INTO backups VALUES (0, 1);
        INSERT INTO forward_queue VALUES ('pending'), ('pending'), ('sent'), ('failed');
        """,
    )
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO backups VALUES (?, 1)", (time.time() - 3600,))
        db.execute("INSERT INTO backups VALUES (?, 0)", (time.time(),))  # failed: not counted
    metrics = Metrics()
    metrics.watch_index(path)
    families = list(text_string_to_metric_families(asyncio.run(metrics.exposition()).decode()))
    assert value(families, "engine_last_backup_age_seconds") == pytest.approx(3600, abs=60)
    assert value(families, "engine_forward_queue_pending") == 2


def test_no_successful_backup_is_infinitely_old(tmp_path: Path) -> None:
    path = _index_with(
        tmp_path / "index.sqlite",
        "CREATE TABLE backups (finished_at REAL, ok INTEGER); INSERT INTO backups VALUES (1, 0);",
    )
    readings = read_index(path)
    assert readings.last_backup == -math.inf and readings.forward_pending is None
    metrics = Metrics()
    metrics.watch_index(path)
    families = list(text_string_to_metric_families(asyncio.run(metrics.exposition()).decode()))
    assert value(families, "engine_last_backup_age_seconds") == math.inf
    assert isinstance(readings, IndexReadings)


# -- configuration ---------------------------------------------------------------------


def test_metrics_section_of_the_repository_config_shows_the_defaults() -> None:
    """config.toml shows [metrics] commented out: uncommented, it is the defaults."""
    lines = (REPO / "config.toml").read_text().splitlines()
    start = lines.index("# [metrics]")
    block = []
    for line in lines[start:]:
        if not line.startswith("# "):
            break
        block.append(line.removeprefix("# "))
    shown = tomllib.loads("\n".join(block))["metrics"]
    assert shown == config_module.describe(config_module.Config(metrics=MetricsConfig()))["metrics"]


def test_metrics_config_is_checked(tmp_path: Path) -> None:
    base = {"dicom": {}, "storage": {}, "index": {}}
    config = config_module.from_mapping({**base, "metrics": {"port": 9999}}, tmp_path)
    assert config.metrics == MetricsConfig(port=9999)
    assert config_module.from_mapping(base, tmp_path).metrics is None
    with pytest.raises(ConfigError, match=r"'metrics\.port' must be between 0 and 65535"):
        config_module.from_mapping({**base, "metrics": {"port": 70000}}, tmp_path)
    with pytest.raises(ConfigError, match=r"unknown config key 'metrics\.path'"):
        config_module.from_mapping({**base, "metrics": {"path": "/m"}}, tmp_path)
