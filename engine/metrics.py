"""The engine's Prometheus metrics: one registry per engine, served as text at ``/metrics``.

Two kinds of metric, by cost:

- Counted where it happens, a few per instance at most (no per-PDU work): instances and
  bytes received and the status answered (``Receiver.submit``), the latency from a
  complete C-STORE to its answer (where the receiver keeps its latencies), the size of
  each index transaction and the instances quarantined (the index stage), associations
  accepted and refused (each transport).
- Read when Prometheus scrapes, and only then: the depth of every queue, the items in
  the pipeline, the associations open (pynetdicom), and two values from the index read
  on a worker thread with a read-only connection: the age of the last successful backup
  and the forwarding backlog (tables of schemas 3 and 4); an index without those tables
  leaves the two metrics out instead of failing the scrape.

Counters and histograms take their own locks, so association threads update them too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from engine import status
from engine.index.backups import LAST_GOOD_SQL
from engine.index.reads import READ_ERRORS, Connection, Reads, SQLiteReads
from engine.model import Outcome

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds from a complete C-STORE to its answer: about 2 ms for one scanner on an idle
# engine, up to ``store_timeout`` (120 s by default) under backpressure.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0,
)  # fmt: skip
# Instances per index transaction: 1 for a lone scanner, up to ``batch_max`` in a burst.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Seconds a scrape waits for the index (it is written by one writer at a time, in WAL mode,
# so a reader is normally never blocked).
INDEX_READ_TIMEOUT = 5.0
FORWARD_PENDING_SQL = "SELECT COUNT(*) FROM forward_queue WHERE state = 'pending'"


def status_label(code: int) -> str:
    """A DIMSE status as the ``status`` label shows it: "0x0000", "0xA700"."""
    return f"0x{code:04X}"


@dataclass(frozen=True, slots=True)
class IndexReadings:
    """What a scrape reads from the index; None where the table (or index) is missing."""

    last_backup: float | None = None  # Unix time of the newest successful backup; -inf: none
    forward_pending: int | None = None
    read_at: float = 0.0  # Unix time of the reading


def _scalar(db: Connection, sql: str) -> tuple[bool, Any]:
    """(True, the first column of the first row), or (False, None) if the query cannot run
    (its table is not there yet, or the index is busy)."""
    try:
        row = db.execute(sql).fetchone()
    except READ_ERRORS as exc:
        if "no such" not in str(exc):  # "no such table/column": a schema not there yet
            log.warning("metrics: cannot read the index (%s): %s", sql, exc)
        return False, None
    return True, (row[0] if row else None)


def read_index(source: Reads | Path) -> IndexReadings:
    """The index's operational values, read-only (blocking: call on a worker thread)."""
    now = time.time()
    if isinstance(source, Path) and not source.exists():
        return IndexReadings(read_at=now)
    reads = source if not isinstance(source, Path) else SQLiteReads(source, INDEX_READ_TIMEOUT)
    try:
        with reads.connect() as db:
            # Scheduled backups are for an SQLite index only: no gauge on PostgreSQL.
            found, finished = (
                (False, None) if reads.dialect.postgresql else _scalar(db, LAST_GOOD_SQL)
            )
            last_backup = None
            if found:
                # Seconds since the epoch (schema 3); the table exists but no backup
                # succeeded yet: infinitely old.
                last_backup = -math.inf if finished is None else float(finished)
            found, pending = _scalar(db, FORWARD_PENDING_SQL)
            forward_pending = int(pending) if found and pending is not None else None
    except READ_ERRORS as exc:
        log.warning("metrics: cannot open the index: %s", exc)
        return IndexReadings(read_at=now)
    return IndexReadings(last_backup, forward_pending, now)


class IndexCollector:
    """Exports the last ``IndexReadings``; ``refresh`` reads new ones before a scrape."""

    def __init__(self, source: Reads | Path) -> None:
        self.source = source
        self.readings = IndexReadings()

    def refresh(self) -> None:
        self.readings = read_index(self.source)

    def collect(self) -> Iterator[Metric]:
        r = self.readings
        if r.last_backup is not None:
            yield GaugeMetricFamily(
                "engine_last_backup_age_seconds",
                "Seconds since the last successful backup finished (+Inf: none yet)",
                value=max(0.0, r.read_at - r.last_backup),
            )
        if r.forward_pending is not None:
            yield GaugeMetricFamily(
                "engine_forward_queue_pending",
                "Entries of the forwarding queue waiting to be sent",
                value=r.forward_pending,
            )


class Metrics:
    """Every metric of one engine, in a registry of its own (never the global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances_received = Counter(
            "dicom_instances_received",
            "Instances received complete and handed to the pipeline (C-STORE and STOW-RS)",
            registry=r,
        )
        self.received_bytes = Counter(
            "dicom_received_bytes",
            "Dataset bytes of the instances received (without file meta information)",
            registry=r,
        )
        responses = Counter(
            "dicom_store_responses",
            "Instances answered, by DIMSE status (C-STORE-RSP; STOW-RS failure reason)",
            ["status"],
            registry=r,
        )
        # One child per outcome, made once: no label lookup per instance, and every
        # status is exported from the start (at 0), so rates work from the first failure.
        self._responses = {
            outcome: responses.labels(status=status_label(status.for_outcome(outcome)))
            for outcome in Outcome
        }
        self.store_latency = Histogram(
            "dicom_store_latency_seconds",
            "Seconds from a complete C-STORE request to its answer",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.associations_active = Gauge(
            "dicom_associations_active", "DICOM associations open (accepted, not ended)", registry=r
        )
        self.associations_accepted = Counter(
            "dicom_associations_accepted", "DICOM associations accepted", registry=r
        )
        self.associations_refused = Counter(
            "dicom_associations_refused",
            "DICOM association requests rejected (too many open, wrong called AE, ...)",
            registry=r,
        )
        self.batch_size = Histogram(
            "engine_index_batch_instances",
            "Instances per index transaction (one batch of the index stage)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.quarantined = Counter(
            "engine_quarantined_instances",
            "Instances refused for what they are, kept in the quarantine with a note",
            registry=r,
        )
        self._queue_depth = Gauge(
            "engine_queue_depth",
            "Items waiting in a queue between two stages",
            ["queue"],
            registry=r,
        )
        self._queue_capacity = Gauge(
            "engine_queue_capacity", "Capacity of a queue between two stages", ["queue"], registry=r
        )
        self._in_pipeline = Gauge(
            "engine_pipeline_items", "Instances in the pipeline, not yet answered", registry=r
        )
        self._waiting = Gauge(
            "engine_senders_waiting",
            "Senders waiting for room in the full first queue (backpressure)",
            registry=r,
        )
        self._index: IndexCollector | None = None
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, fds

    # -- counted where it happens -----------------------------------------------------

    def received(self, size: int) -> None:
        self.instances_received.inc()
        self.received_bytes.inc(size)

    def answered(self, outcome: Outcome) -> None:
        self._responses[outcome].inc()

    # -- read at scrape time ----------------------------------------------------------

    def watch_queues(self, queues: Mapping[str, asyncio.Queue[Any]], capacity: int) -> None:
        for name, queue in queues.items():
            self._queue_depth.labels(queue=name).set_function(queue.qsize)
            self._queue_capacity.labels(queue=name).set(capacity)

    def watch_pipeline(self, in_pipeline: Callable[[], int], waiting: Callable[[], int]) -> None:
        self._in_pipeline.set_function(in_pipeline)
        self._waiting.set_function(waiting)

    def watch_associations(self, active: Callable[[], int]) -> None:
        """Count open associations at scrape time (instead of ``associations_active.inc``)."""
        self.associations_active.set_function(active)

    def watch_index(self, source: Reads | Path) -> None:
        self._index = IndexCollector(source)
        self.registry.register(self._index)

    async def exposition(self) -> bytes:
        """The text exposition format; the index is read on a worker thread first."""
        if self._index is not None:
            await asyncio.to_thread(self._index.refresh)
        return generate_latest(self.registry)
