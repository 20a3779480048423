"""Two engine nodes on one PostgreSQL index forward each stable study once.

Both nodes run the stability check and the forwarder with the same [[forward]] rule to
one dcmtk ``storescp``. A study received half on each node at the same time becomes
stable once, is queued once and sent once (storescp logs every C-STORE it receives), by
whichever node got there first; so are studies received by one node only, which both
nodes' checks find settled at the same moment. (Without the row locks, two nodes mark
and queue the same study now and then: this test then failed about half its runs.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from tests.helpers import Engine, free_port
from tests.postgres import TWO_NODE_MARKS, Databases
from tests.test_forward import (
    FAST_RETRIES,
    STABLE_AGE,
    RecordingSCP,
    StoreSCP,
    send,
    study,
    wait_until,
)

pytestmark = TWO_NODE_MARKS

RULE = '\n[[forward]]\ndestination = "DEST"\n'


def start_nodes(folder: Path, url: str, dest_port: int) -> list[Engine]:
    """Nodes "a" and "b" on one database and one storage folder, each with the rule."""
    engines = []
    for name in ("a", "b"):
        engine = Engine(
            folder / name,
            {"ingest": {"stable_age": STABLE_AGE}, "forwarding": FAST_RETRIES},
            index_url=url,
            node=name,
            storage_path=folder / "storage",
        )
        assert engine.config_path is not None
        peer = f'\n[[dicom.peers]]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {dest_port}\n'
        engine.config_path.write_text(engine.config_path.read_text() + peer + RULE)
        engines.append(engine)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda e: e.start(), engines))
    return engines


def stop_nodes(engines: list[Engine]) -> None:
    for engine in engines:
        if engine.process is not None:
            assert engine.stop() == 0, engine.log()


@pytest.fixture
def forwarding_nodes(
    tmp_path: Path, postgres: Databases
) -> Iterator[tuple[Engine, Engine, StoreSCP]]:
    destination = StoreSCP(tmp_path / "dest", free_port())
    destination.start()
    engines = start_nodes(tmp_path, postgres.create("forward_nodes"), destination.port)
    try:
        yield engines[0], engines[1], destination
    finally:
        stop_nodes(engines)
        destination.stop()


def test_each_stable_study_is_forwarded_once(
    forwarding_nodes: tuple[Engine, Engine, StoreSCP],
) -> None:
    a, b, destination = forwarding_nodes
    shared = study(20, "SPLIT")
    singles = [study(4, f"ONE{n}") for n in range(4)]

    def to(engine: Engine, datasets: list[Dataset], calling_ae: str) -> None:
        send(engine, datasets, calling_ae)

    with ThreadPoolExecutor(2) as pool:
        done = [
            pool.submit(to, a, shared[0::2], "CTSCANNER"),
            pool.submit(to, b, shared[1::2], "CTSCANNER"),
        ]
        for future in done:
            future.result()
    for n, single in enumerate(singles):
        send((a, b)[n % 2], single, "MRSCANNER")
    everything = shared + [ds for single in singles for ds in single]
    total = len(everything)
    studies = sorted({str(ds.StudyInstanceUID) for ds in everything})

    def all_done() -> bool:
        rows = a.query_rows("SELECT state FROM forward_queue")
        return len(rows) >= len(studies) and all(state == "done" for (state,) in rows)

    wait_until(all_done, "both studies forwarded")
    wait_until(lambda: destination.stores_received() >= total, "storescp's stores")
    # A few stability checks later, still nothing more: each study was sent once.
    for engine in (a, b):
        wait_until(
            lambda e=engine: e.stats()["stable_studies"] == len(studies), "studies stable"
        )
    items = a.query_rows(
        "SELECT study_uid, destination, state FROM forward_queue ORDER BY study_uid"
    )
    assert [tuple(item) for item in items] == [(s, "DEST", "done") for s in studies]
    assert destination.stores_received() == total
    received = destination.files()
    assert set(received) == {str(ds.SOPInstanceUID) for ds in everything}
    for ds in everything:
        assert received[str(ds.SOPInstanceUID)].PixelData == ds.PixelData
    # One node marked each study stable (the log line of the check that did it).
    marks = [
        line
        for engine in (a, b)
        for line in engine.log().splitlines()
        if "is stable" in line
    ]
    assert len(marks) == len(studies), marks
    for uid in studies:
        assert sum(uid in line for line in marks) == 1, (uid, marks)


def test_the_forward_of_a_killed_node_is_taken_over(tmp_path: Path, postgres: Databases) -> None:
    """The node sending a study is killed (SIGKILL) in the middle: it renews its lease no
    more, and the other node sends the study again, whole, once the lease has run out."""
    port = free_port()
    destination = RecordingSCP(port, delay=0.05)
    engines = start_nodes(tmp_path, postgres.create("forward_takeover"), port)
    try:
        datasets = study(40, "TAKEOVER")
        send(engines[0], datasets, "CTSCANNER")

        def sender() -> Engine | None:
            for engine in engines:
                if "forward 1 of study" in engine.log():
                    return engine
            return None

        wait_until(lambda: sender() is not None and destination.count() >= 5, "a send")
        dying = sender()
        assert dying is not None
        dying.kill()
        killed_at = destination.count()
        survivor = engines[1] if dying is engines[0] else engines[0]
        wait_until(
            lambda: survivor.query_rows("SELECT state FROM forward_queue") == [("done",)],
            "the other node to finish the forward",
        )
        assert killed_at < len(datasets), "the send ended before the kill"
        log = survivor.log()
        assert "attempt 2 of" in log, log
        # Every instance arrived; the ones before the kill twice at most.
        received = Counter(destination.received)
        assert set(received) == {str(ds.SOPInstanceUID) for ds in datasets}
        assert max(received.values()) <= 2
        (attempts,) = survivor.query_rows("SELECT attempts FROM forward_queue")
        assert tuple(attempts) == (2,)
    finally:
        stop_nodes(engines)
        destination.close()
