"""Two engine nodes, one PostgreSQL index, one storage folder: real processes and peers.

Each node is a ``python -m engine serve`` of its own (nodes "a" and "b") on an ephemeral
port of 127.0.0.1, both on one fresh database of the session's throwaway cluster
(tests/postgres.py) and one storage folder. What must hold, whatever node a scanner
sends to and however the nodes are stopped:

- one study sent half to each node at the same time, every instance also re-sent to
  the other node meanwhile: one study, every instance once (one row, one file), the
  counts right and the same from both nodes;
- a node killed with SIGKILL in the middle of a burst: the other keeps accepting; after
  the restart, nothing either node acknowledged is missing and no file is orphaned;
- a node's start-up recovery touches only its own work, never the other node's files
  in flight (each has its own ``.incoming-<node>``, ``.journal-<node>``, lock and mark).

The checks read the index and the folder directly: every row's file exists with the
row's size, every instance file outside the hidden folders has a row, the counters
agree with the rows, and after a clean stop no node left a temp file or a journal.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from engine import status
from engine.storage.files import Name, parse_name
from tests.burst import (
    Burst,
    burst_datasets,
    check_store,
    consistency,
    index_rows,
    leftovers,
    restart,
)
from tests.helpers import Engine, ct_dataset, send_datasets, storescu
from tests.postgres import TWO_NODE_MARKS, Databases

pytestmark = TWO_NODE_MARKS

WAIT = 60.0
SIZE = 128  # 32 KB of pixel data per instance


@pytest.fixture
def nodes(tmp_path: Path, postgres: Databases) -> Iterator[tuple[Engine, Engine]]:
    """Nodes "a" and "b" on one new database and one storage folder, started at once
    (both apply the schema of the empty database: one waits for the other)."""
    url = postgres.create("nodes")
    shared = tmp_path / "storage"
    a, b = (
        Engine(tmp_path / name, index_url=url, node=name, storage_path=shared)
        for name in ("a", "b")
    )
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(Engine.start, (a, b)))
        yield a, b
    finally:
        for node in (a, b):
            node.kill()


def study_files(folder: Path, datasets: list[Dataset]) -> Path:
    """``datasets`` as Part 10 files in ``folder``, for storescu."""
    folder.mkdir(parents=True)
    for n, ds in enumerate(datasets):
        ds.save_as(folder / f"{n:04d}.dcm", enforce_file_format=True)
    return folder


def file_names(engine: Engine) -> list[Name]:
    """What the names of the instance files say (UID, digest, the node that wrote it)."""
    names = []
    for path in engine.stored_files():
        name = parse_name(path.name)
        assert name is not None, f"{path}: a name the engine does not give"
        names.append(name)
    return names


def assert_consistent(a: Engine, b: Engine, acked: set[str]) -> dict[str, int]:
    """The index and the folder agree (seen by each node), every acknowledged instance is
    there, and both nodes count the same; returns the counts."""
    for node in (a, b):
        problems = consistency(node, acked)
        assert not problems, problems[:10]
    ((total, distinct),) = a.query_rows(
        "SELECT COUNT(*), COUNT(DISTINCT sop_instance_uid) FROM instances"
    )
    assert total == distinct, "an instance with two rows"
    rows = index_rows(a)
    assert len(rows) == total
    uids = Counter(name.uid for name in file_names(a))
    assert set(uids) == set(rows)
    assert [uid for uid, count in uids.items() if count != 1] == []
    counts = a.stats()
    assert b.stats() == counts
    assert counts["instances"] == len(rows)
    assert counts["bytes"] == sum(row.size for row in rows.values())
    return counts


def assert_clean_stops(a: Engine, b: Engine) -> None:
    """SIGTERM both: exit 0, and neither leaves a temp file, a journal or a spare."""
    for node in (a, b):
        assert node.stop() == 0, node.log()
    for node in (a, b):
        area = node.area()
        assert area.clean_mark.is_file()
        assert leftovers(node) == ([], [])
        assert sorted(area.incoming.iterdir()) == []
        journals = sorted(area.journal_dir.iterdir()) if area.journal_dir.exists() else []
        assert journals == []


def test_one_study_sent_half_to_each_node_at_once_is_stored_once(
    nodes: tuple[Engine, Engine], tmp_path: Path
) -> None:
    a, b = nodes
    study_uid = generate_uid()
    datasets = []
    for s in range(2):
        series_uid = generate_uid()
        for i in range(1, 21):
            ds = ct_dataset(study_uid, series_uid, i, seed=s, size=SIZE)
            ds.SeriesNumber = s + 1
            datasets.append(ds)
    halves = datasets[0::2], datasets[1::2]
    folders = [study_files(tmp_path / f"half{n}", half) for n, half in enumerate(halves)]
    sent = {str(ds.SOPInstanceUID): ds for ds in datasets}

    # Four associations at once: each half to its node with storescu, and re-sent to the
    # other node with pynetdicom. Every instance arrives at both nodes concurrently.
    with ThreadPoolExecutor(4) as pool:
        dcmtk = [
            pool.submit(storescu, node, str(f)) for node, f in ((a, folders[0]), (b, folders[1]))
        ]
        scu = [
            pool.submit(send_datasets, node, half, f"SCU{n}")
            for n, (node, half) in enumerate(((b, halves[0]), (a, halves[1])))
        ]
        for run in dcmtk:
            assert "Store Failed" not in run.result().stderr
        answers = [answer for future in scu for answer in future.result()]
    assert {code for _, code in answers} == {status.SUCCESS}
    assert len(answers) == len(datasets)

    counts = assert_consistent(a, b, set(sent))
    assert {k: counts[k] for k in ("patients", "studies", "series", "instances")} == {
        "patients": 1,
        "studies": 1,
        "series": 2,
        "instances": len(datasets),
    }
    assert counts["quarantined"] == 0
    rows = index_rows(a)
    assert set(rows) == set(sent)
    for uid, row in rows.items():
        assert dcmread(b.storage / row.path) == sent[uid]
    assert {name.node for name in file_names(a)} <= {"a", "b"}

    # The whole study again, to both nodes at once: all success, nothing changes.
    files_before = {p: p.stat().st_mtime_ns for p in a.stored_files()}
    with ThreadPoolExecutor(2) as pool:
        again = [pool.submit(storescu, node, *map(str, folders)) for node in (a, b)]
        for run in again:
            assert "Store Failed" not in run.result().stderr
    assert assert_consistent(a, b, set(sent)) == counts
    assert {p: p.stat().st_mtime_ns for p in a.stored_files()} == files_before

    assert_clean_stops(a, b)


def test_a_node_killed_during_a_burst_loses_nothing_and_the_other_goes_on(
    nodes: tuple[Engine, Engine],
) -> None:
    a, b = nodes
    to_a = Burst(a, burst_datasets(2, 100, SIZE))  # 200 instances, two scanners
    to_b = Burst(b, burst_datasets(2, 40, SIZE))
    to_a.start()
    to_b.start()
    answered = to_a.wait_for_answers(50, WAIT)
    assert answered >= 50, f"only {answered} answers from node a before its senders ended"
    a.kill()  # SIGKILL in the middle of the burst
    to_a.join(WAIT)
    assert len(to_a.answers) < to_a.total, "the burst was over before the kill"
    assert set(to_a.answers.values()) == {status.SUCCESS}
    assert all(isinstance(e, RuntimeError | OSError) for e in to_a.errors), to_a.errors

    # Node b goes on: its own burst, and new stores after the kill, all succeed.
    after = [ct_dataset(generate_uid(), generate_uid(), i, size=SIZE) for i in range(1, 11)]
    assert {code for _, code in send_datasets(b, after)} == {status.SUCCESS}
    to_b.join(WAIT)
    assert to_b.errors == []
    assert to_b.acked == set(to_b.datasets)

    log = restart(a)
    assert "last stop was not clean" in log
    sent = {**to_a.datasets, **to_b.datasets, **{str(ds.SOPInstanceUID): ds for ds in after}}
    acked = to_a.acked | to_b.acked | {str(ds.SOPInstanceUID) for ds in after}
    rows = check_store(a, acked, sent)  # also reads every file of what was sent
    assert set(rows) <= set(sent)
    assert_consistent(a, b, acked)

    # The scanner of the killed node sends the rest to the other node: all there, once.
    missing = [ds for uid, ds in to_a.datasets.items() if uid not in to_a.acked]
    assert {code for _, code in send_datasets(b, missing)} == {status.SUCCESS}
    counts = assert_consistent(a, b, set(sent))
    assert counts["instances"] == len(sent)
    assert_clean_stops(a, b)


def test_a_node_restarting_leaves_the_other_nodes_work_alone(
    nodes: tuple[Engine, Engine],
) -> None:
    """Node b killed and started again while node a takes a burst: b's recovery (temp
    files, journals, the missing-file check of an unclean stop) is b's own only."""
    a, b = nodes
    mine = [ct_dataset(generate_uid(), generate_uid(), i, size=SIZE) for i in range(1, 6)]
    assert {code for _, code in send_datasets(b, mine)} == {status.SUCCESS}
    to_a = Burst(a, burst_datasets(2, 60, SIZE)).start()
    assert to_a.wait_for_answers(20, WAIT) >= 20
    b.kill()
    log = restart(b)  # while a still writes
    assert "last stop was not clean" in log
    to_a.join(WAIT)
    assert to_a.errors == []
    assert to_a.acked == set(to_a.datasets)
    sent = {**to_a.datasets, **{str(ds.SOPInstanceUID): ds for ds in mine}}
    rows = check_store(a, set(sent), sent)
    assert set(rows) == set(sent)
    assert_consistent(a, b, set(sent))
    assert "missing; removing its index row" not in log
    assert_clean_stops(a, b)
