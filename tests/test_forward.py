"""Stable studies and forwarding: rules, the queue in the index, and real destinations.

The destination is a dcmtk ``storescp`` started and stopped here (it names each file
after its SOP Instance UID and logs every C-STORE it receives with ``-v``), or a
pynetdicom SCP that refuses an instance once. Settings are small (half a second to
settle, retries every fraction of a second) so the whole file runs in seconds. The queue
and the engines run on each index backend (the ``index_url`` fixture: SQLite, PostgreSQL).
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt

from engine import config as config_module
from engine import status
from engine.config import ForwardingConfig, ForwardRule
from engine.dicom.store_scu import Instance, Progress
from engine.duplicates import Decision, Existing
from engine.errors import ConfigError
from engine.forwarding import acknowledged, destinations, matches, retry_delay
from engine.index import forward_queue
from engine.index.base import InstanceRow
from engine.index.forward_queue import StudyFacts
from engine.index.postgresql import PostgresIndex
from engine.index.reads import Connection
from engine.index.sqlite import SQLiteIndex
from engine.stages.validate import validate
from tests.helpers import REPO, Engine, ct_dataset, dcmtk_env, free_port, send_datasets
from tests.test_stages import received as received_record

WAIT = 30.0
POLL = 0.05
# Settings that make a test run in seconds.
STABLE_AGE = 0.5
FAST_RETRIES = {"retry_initial": 0.2, "retry_max": 0.5, "max_attempts": 1000, "timeout": 5.0}

CT_STUDY = StudyFacts("1.2.3", ("CT", "SR"), ("CTSCANNER",), "CT Head w/o contrast")


# -- rules, delays, configuration (no network) ----------------------------------------


def test_a_rule_matches_when_every_filter_does() -> None:
    assert matches(ForwardRule("DEST"), CT_STUDY)
    assert matches(ForwardRule("DEST", modality="CT"), CT_STUDY)
    assert matches(ForwardRule("DEST", modality="sr"), CT_STUDY)  # any modality of the study
    assert not matches(ForwardRule("DEST", modality="MR"), CT_STUDY)
    assert matches(ForwardRule("DEST", calling_ae="CT*"), CT_STUDY)
    assert not matches(ForwardRule("DEST", calling_ae="CT"), CT_STUDY)
    assert matches(ForwardRule("DEST", study_description="*head*"), CT_STUDY)
    assert matches(ForwardRule("DEST", study_description="CT Hea? w/o*"), CT_STUDY)
    assert not matches(ForwardRule("DEST", study_description="*chest*"), CT_STUDY)
    assert not matches(ForwardRule("DEST", study_description="[CT]*"), CT_STUDY)  # no classes
    assert not matches(ForwardRule("DEST", modality="CT", calling_ae="MRSCANNER"), CT_STUDY)
    # A study without any modality or known sender matches only rules without that filter.
    bare = StudyFacts("1.2.4", (), (), "")
    assert matches(ForwardRule("DEST"), bare)
    assert not matches(ForwardRule("DEST", modality="*"), bare)


def test_destinations_are_each_given_once_in_rule_order() -> None:
    rules = [
        ForwardRule("B", modality="CT"),
        ForwardRule("A"),
        ForwardRule("B", calling_ae="CTSCANNER"),
        ForwardRule("C", modality="MR"),
    ]
    assert destinations(rules, CT_STUDY) == ["B", "A"]
    assert destinations([], CT_STUDY) == []


def test_retries_wait_twice_as_long_each_time_up_to_the_maximum() -> None:
    settings = ForwardingConfig(retry_initial=10.0, retry_max=60.0)
    assert [retry_delay(n, settings) for n in range(1, 6)] == [10.0, 20.0, 40.0, 60.0, 60.0]
    assert retry_delay(100_000, settings) == 60.0


def test_acknowledged_instances_are_those_reached_and_not_failed() -> None:
    sent = [Instance(f"1.{n}", "1.2", ExplicitVRLittleEndian, Path(f"/{n}")) for n in range(5)]
    # Cut short after three, the second one refused.
    progress = Progress(remaining=2, completed=2, failed=1, failed_uids=["1.1"])
    assert acknowledged(sent, progress) == ["1.0", "1.2"]


def raw_config(**extra: Any) -> dict[str, Any]:
    peers = [{"ae_title": "DEST", "host": "127.0.0.1", "port": 11119}]
    return {"dicom": {"peers": peers}, "storage": {}, "index": {}, **extra}


def test_forward_rules_must_name_a_known_peer() -> None:
    config = config_module.from_mapping(
        raw_config(forward=[{"destination": "DEST", "modality": "CT"}]), Path(".")
    )
    assert config.forward == (ForwardRule("DEST", modality="CT"),)
    assert config.ingest.stable_age == 60.0
    with pytest.raises(ConfigError, match=r"'forward\[1\]\.destination' 'ELSEWHERE'"):
        config_module.from_mapping(
            raw_config(forward=[{"destination": "DEST"}, {"destination": "ELSEWHERE"}]),
            Path("."),
        )
    with pytest.raises(ConfigError, match=r"'forward\[0\]\.destination' is required"):
        config_module.from_mapping(raw_config(forward=[{"modality": "CT"}]), Path("."))
    with pytest.raises(ConfigError, match=r"'forward\[0\]\.ae_title'"):
        config_module.from_mapping(raw_config(forward=[{"ae_title": "DEST"}]), Path("."))
    with pytest.raises(ConfigError, match=r"'forwarding\.retry_max'"):
        config_module.from_mapping(
            raw_config(forwarding={"retry_initial": 10.0, "retry_max": 5.0}), Path(".")
        )
    with pytest.raises(ConfigError, match=r"'ingest\.stable_age' must be greater than 0"):
        config_module.from_mapping(raw_config(ingest={"stable_age": 0}), Path("."))


def test_config_toml_shows_a_forward_rule_with_every_key() -> None:
    text = (REPO / "config.toml").read_text()
    example = text.split("# [[forward]]\n", 1)[1].split("\n\n", 1)[0]
    rule = tomllib.loads("\n".join(line.removeprefix("# ") for line in example.splitlines()))
    assert set(rule) == {f.name for f in dataclasses.fields(ForwardRule)}


# -- the queue in the index (no network) ----------------------------------------------


def instance_row(ds: Dataset, calling_ae: str, received_at: float) -> InstanceRow:
    v = validate(received_record(ds))
    uid = str(ds.SOPInstanceUID)
    return InstanceRow(
        v.attributes, ExplicitVRLittleEndian, uid, 100, uid, received_at, calling_ae, "E", "ip"
    )


def keep(existing: Existing | None, digest: str) -> Decision:
    return Decision.NEW if existing is None else Decision.SAME


def test_the_queue_settles_studies_and_orders_attempts(tmp_path: Path, index_url: str) -> None:
    async def scenario() -> None:
        index: SQLiteIndex | PostgresIndex = (
            PostgresIndex(index_url, durable=False)
            if index_url
            else SQLiteIndex(tmp_path / "index.sqlite", durable=False)
        )
        dialect = index.dialect
        await index.open()
        try:
            study, series = generate_uid(), generate_uid()
            first = [ct_dataset(study, series, n) for n in (1, 2)]
            t0 = 1000.0
            await index.commit_batch([instance_row(ds, "CTSCANNER", t0) for ds in first], [], keep)

            def settle(now: float) -> Callable[[Connection], forward_queue.Settled]:
                return lambda db: forward_queue.settle(
                    db, now, now - 10, lambda _: ["DEST"], 100, dialect
                )

            def claim_at(now: float) -> Callable[[Connection], forward_queue.Claim | None]:
                return lambda db: forward_queue.claim(db, now, (), lease, dialect)

            # Not settled yet at t0 + 5; settled at t0 + 10.
            assert (await index.write(settle(t0 + 5))).stable == []
            done = await index.write(settle(t0 + 10))
            assert [f.calling_aes for f in done.stable] == [("CTSCANNER",)]
            assert done.queued == [(study, "DEST")]
            assert (await index.stats())["stable_studies"] == 1

            def lease(attempt: int) -> float:
                return 100.0

            # Claimed: attempt 1, pushed into the future (its lease).
            claim = await index.write(claim_at(t0 + 11))
            assert claim is not None and claim.attempt == 1 and not claim.acknowledged
            assert await forward_queue.next_due(index, ()) == t0 + 111
            assert await index.write(claim_at(t0 + 12)) is None

            # A new instance makes the study unstable; settled again it gets a new item
            # (the first one is under way), which waits for the first to end.
            late = ct_dataset(study, series, 3)
            await index.commit_batch([instance_row(late, "CTSCANNER", t0 + 20)], [], keep)
            assert (await index.stats())["stable_studies"] == 0
            again = await index.write(settle(t0 + 30))
            assert again.queued == [(study, "DEST")]
            # Settling once more while the new item waits untried queues nothing.
            await index.commit_batch(
                [instance_row(ct_dataset(study, series, 4), "CTSCANNER", t0 + 31)], [], keep
            )
            assert (await index.write(settle(t0 + 41))).queued == []
            assert (await index.stats())["forward_pending"] == 2
            blocked = await index.write(claim_at(t0 + 50))
            assert blocked is None, "the second item must wait for the first"

            # The first attempt falls short: what was acknowledged is kept for the retry.
            uids = [str(ds.SOPInstanceUID) for ds in first]
            await index.write(
                lambda d: forward_queue.finish_retry(d, claim, uids[:1], t0 + 60, "down")
            )
            retry = await index.write(claim_at(t0 + 60))
            assert retry is not None and retry.id == claim.id and retry.attempt == 2
            assert retry.acknowledged == {uids[0]}
            # It covers the later item, queued before this attempt started.
            assert retry.covers > claim.id
            ended = await index.write(lambda d: forward_queue.finish_done(d, retry, t0 + 61))
            assert ended == 2
            counts = await index.stats()
            assert (counts["forward_pending"], counts["forward_failed"]) == (0, 0)
            rows = await index.read("SELECT COUNT(*) FROM forward_sent")
            assert [tuple(row) for row in rows] == [(0,)]
        finally:
            await index.close()

    asyncio.run(scenario())


# -- real destinations ---------------------------------------------------------------


class StoreSCP:
    """dcmtk storescp as AE DEST on ``port``, started and stopped on demand."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder / "received"
        self.folder.mkdir(parents=True)
        self.log_path = folder / "storescp.log"
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                # Files named after their SOP Instance UID (-uf, the default), a line
                # per C-STORE received (-v).
                ["storescp", "-v", "-uf", "-aet", "DEST", "-od", str(self.folder), str(self.port)],
                env=dcmtk_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._listening, "storescp to listen")

    def _listening(self) -> bool:
        import socket

        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(WAIT)
            self.process = None

    def stores_received(self) -> int:
        if not self.log_path.exists():
            return 0
        return self.log_path.read_text(errors="replace").count("Received Store Request")

    def files(self) -> dict[str, Dataset]:
        """What arrived, by SOP Instance UID (one file per UID: -uf overwrites)."""
        found = {}
        for path in self.folder.iterdir():
            ds = dcmread(path)
            assert str(ds.SOPInstanceUID) not in found
            found[str(ds.SOPInstanceUID)] = ds
        return found


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"gave up after {WAIT}s waiting for {what}"
        time.sleep(POLL)


def queue(engine: Engine) -> list[tuple[Any, ...]]:
    """(study_uid, destination, state, attempts, last_error) of every item, in order."""
    return engine.query_rows(
        "SELECT study_uid, destination, state, attempts, last_error FROM forward_queue ORDER BY id"
    )


def forwarding_engine(
    folder: Path,
    dest_port: int,
    rules: str,
    index_url: str,
    forwarding: dict[str, Any] | None = None,
) -> Engine:
    engine = Engine(
        folder,
        {
            "ingest": {"stable_age": STABLE_AGE},
            "forwarding": FAST_RETRIES | (forwarding or {}),
        },
        index_url=index_url,
    )
    assert engine.config_path is not None
    peer = f'\n[[dicom.peers]]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {dest_port}\n'
    engine.config_path.write_text(engine.config_path.read_text() + peer + rules)
    return engine


def study(n: int, patient: str, modality: str = "CT") -> list[Dataset]:
    study_uid, series_uid = generate_uid(), generate_uid()
    datasets = [ct_dataset(study_uid, series_uid, i, patient_id=patient, seed=i) for i in range(n)]
    if modality == "MR":
        for ds in datasets:
            ds.Modality = "MR"
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    return datasets


def send(engine: Engine, datasets: list[Dataset], calling_ae: str) -> None:
    results = send_datasets(engine, datasets, calling_ae=calling_ae)
    assert {code for _, code in results} == {status.SUCCESS}


@pytest.mark.peers
def test_a_study_waits_for_its_destination_across_a_restart(tmp_path: Path, index_url: str) -> None:
    """Destination down, engine restarted, destination up: the matching study arrives
    complete and each instance once; the studies the rule filters out never do."""
    dest = StoreSCP(tmp_path / "dest", free_port())
    rules = '\n[[forward]]\ndestination = "DEST"\nmodality = "CT"\ncalling_ae = "CTSCANNER"\n'
    engine = forwarding_engine(tmp_path / "engine", dest.port, rules, index_url).start()
    wanted = study(6, "FWD1")
    other_modality = study(2, "FWD2", modality="MR")
    other_sender = study(2, "FWD3")
    try:
        send(engine, wanted, "CTSCANNER")
        send(engine, other_modality, "CTSCANNER")
        send(engine, other_sender, "ELSEWHERE")
        wait_until(lambda: engine.stats()["stable_studies"] == 3, "three stable studies")
        # Only the matching study is queued; it is tried again and again meanwhile.
        wait_until(lambda: queue(engine)[0][3] >= 2, "two attempts at the down destination")
        ((study_uid, destination, state, _, error),) = queue(engine)
        assert (study_uid, destination, state) == (wanted[0].StudyInstanceUID, "DEST", "pending")
        assert "none of 6 instance(s) acknowledged" in error
        assert engine.stats()["forward_pending"] == 1

        # A clean stop and a start while the destination is down lose nothing.
        assert engine.stop() == 0, engine.log()
        assert [row[2] for row in queue(engine)] == ["pending"]
        engine.start()
        dest.start()
        wait_until(lambda: queue(engine)[0][2] == "done", "the forward to finish")

        arrived = dest.files()
        assert set(arrived) == {str(ds.SOPInstanceUID) for ds in wanted}
        for ds in wanted:
            assert arrived[str(ds.SOPInstanceUID)].PixelData == ds.PixelData
        assert dest.stores_received() == len(wanted), "an instance was sent twice"
        counts = engine.stats()
        assert counts["stable_studies"] == 3
        assert (counts["forward_pending"], counts["forward_failed"]) == (0, 0)
        log = engine.log()
        assert "start, attempt 1 of 1000, 6 instance(s)" in log
        assert "attempt 1 of 1000 failed" in log
        assert f"study {wanted[0].StudyInstanceUID} to DEST: done, 6 instance(s)" in log

        # New instances make the study unstable; stable again, it is forwarded again.
        more = [
            ct_dataset(wanted[0].StudyInstanceUID, generate_uid(), i, patient_id="FWD1")
            for i in (1, 2)
        ]
        send(engine, more, "CTSCANNER")
        wait_until(
            lambda: [row[2] for row in queue(engine)] == ["done", "done"], "a second forward"
        )
        assert set(dest.files()) == {str(ds.SOPInstanceUID) for ds in wanted + more}
        assert engine.stats()["stable_studies"] == 3
    finally:
        dest.stop()
        if engine.process is not None:
            assert engine.stop() == 0, engine.log()


@pytest.mark.peers
def test_a_forward_is_given_up_after_its_attempts(tmp_path: Path, index_url: str) -> None:
    rules = '\n[[forward]]\ndestination = "DEST"\n'
    engine = forwarding_engine(
        tmp_path, free_port(), rules, index_url, {"max_attempts": 2, "retry_initial": 0.1}
    ).start()
    try:
        datasets = study(2, "FWD4")
        send(engine, datasets, "CTSCANNER")
        wait_until(lambda: engine.stats()["forward_failed"] == 1, "the forward to fail")
        ((_, _, state, attempts, error),) = queue(engine)
        assert (state, attempts) == ("failed", 2)
        assert "none of 2 instance(s) acknowledged" in error
        assert "ERROR engine.forwarding: forward 1 of study" in engine.log()
        assert "failed after 2 attempt(s), given up" in engine.log()
    finally:
        assert engine.stop() == 0, engine.log()


class RecordingSCP:
    """A pynetdicom storage SCP that records every C-STORE; it can refuse one instance
    the first time it comes, and take its time over each."""

    def __init__(self, port: int, refuse_once: str = "", delay: float = 0.0) -> None:
        self.refuse_once = refuse_once
        self.delay = delay
        self.received: list[str] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="DEST")
        ae.supported_contexts = StoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: evt.Event) -> int:
        time.sleep(self.delay)
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            first = uid not in self.received
            self.received.append(uid)
        return status.OUT_OF_RESOURCES if uid == self.refuse_once and first else status.SUCCESS

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def close(self) -> None:
        self.server.shutdown()


def test_a_retry_sends_only_what_was_not_acknowledged(tmp_path: Path, index_url: str) -> None:
    datasets = study(5, "FWD5")
    refused = str(datasets[2].SOPInstanceUID)
    port = free_port()
    destination = RecordingSCP(port, refuse_once=refused)
    rules = '\n[[forward]]\ndestination = "DEST"\n'
    engine = forwarding_engine(tmp_path, port, rules, index_url).start()
    try:
        send(engine, datasets, "CTSCANNER")
        wait_until(lambda: bool(queue(engine)) and queue(engine)[0][2] == "done", "the forward")
        assert sorted(destination.received) == sorted(
            [str(ds.SOPInstanceUID) for ds in datasets] + [refused]
        )
        ((_, _, _, attempts, _),) = queue(engine)
        assert attempts == 2
        assert "start, attempt 2 of 1000, 1 instance(s) (4 sent before)" in engine.log()
    finally:
        assert engine.stop() == 0, engine.log()
        destination.close()


def test_a_forward_cut_short_by_a_shutdown_goes_on_at_the_next_start(
    tmp_path: Path, index_url: str
) -> None:
    datasets = study(8, "FWD6")
    port = free_port()
    destination = RecordingSCP(port, delay=0.2)
    rules = '\n[[forward]]\ndestination = "DEST"\n'
    engine = forwarding_engine(tmp_path, port, rules, index_url).start()
    try:
        send(engine, datasets, "CTSCANNER")
        wait_until(lambda: destination.count() >= 2, "the forward to be under way")
        assert engine.stop() == 0, engine.log()
        ((_, _, state, _, error),) = queue(engine)
        assert (state, error) == ("pending", "interrupted")
        assert "interrupted by the shutdown" in engine.log()
        sent_before = destination.count()
        assert sent_before < len(datasets)
        engine.start()
        wait_until(lambda: queue(engine)[0][2] == "done", "the forward to finish")
        # Each instance once: what was acknowledged before the stop was not sent again.
        assert sorted(destination.received) == sorted(str(ds.SOPInstanceUID) for ds in datasets)
        assert f"({sent_before} sent before)" in engine.log()
    finally:
        if engine.process is not None:
            assert engine.stop() == 0, engine.log()
        destination.close()
