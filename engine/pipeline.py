"""THE topology of the engine: two bounded queues, two stages, one TaskGroup.

```
 scanner --C-STORE--> dicom/association.py (native) or dicom/scp.py (pynetdicom thread)
                         |  Receiver.submit(Received) -> Result
                         v
 asyncio loop:  receive -> [validate -> dedupe -> write] -> index --> resolve futures
                        queue                            queue
```

Every stage takes whatever is queued when it becomes free, up to ``batch_max``,
and never sleeps to fill a batch. Memory is bounded: at most ``queue_size`` items
wait in each queue and ``batch_max`` in each stage; senders beyond that wait in
``Receiver.submit`` holding only their own request.

Validate, dedupe and write are the steps of one stage, run one after the other on
each batch (``flow.run_steps``), not three stages with queues between them: for
datasets the loop has spooled all three run on the loop's thread, so separate tasks
gave no overlap, only hand-offs, and each hand-off waits behind every socket's
pending reads (0.3-0.5 ms at four associations, measured, where the three steps
take 0.15 ms). (Whole datasets held in memory are parsed and written on threads.) The index stage
stays apart: its commit and flush overlap the next batch's arrival (group commit).

Shutdown (``stop``): the receiver closes, a Stop marker follows the last item
down the queues, each stage finishes its batch and passes the marker on, and the
TaskGroup ends when the index stage has committed the last batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from engine import codecs
from engine.config import Config, Transcode
from engine.index.base import Index
from engine.metrics import Metrics
from engine.stages import dedupe, validate, write
from engine.stages.flow import STOP, Item, Stop, run_steps
from engine.stages.index import IndexStage
from engine.stages.receive import Receiver
from engine.storage.area import StorageArea
from engine.storage.spool import Spooler

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(self, config: Config, index: Index, storage: StorageArea) -> None:
        self.config = config
        self.index = index
        self.storage = storage
        size = config.pipeline.queue_size
        self.queues: dict[str, asyncio.Queue[Item | Stop]] = {
            name: asyncio.Queue(size) for name in ("validate", "index")
        }
        # The engine's metrics (engine/metrics.py): the stages and adapters count into it.
        self.metrics = Metrics()
        self.metrics.watch_queues(self.queues, size)
        self.metrics.watch_index(index.reads)
        self.receiver = Receiver(self.queues["validate"], config.ingest.store_timeout, self.metrics)
        self.metrics.watch_pipeline(
            lambda: self.receiver.in_pipeline, lambda: self.receiver.waiting
        )
        # Storage I/O on the loop's own thread (write_threads = 0), unless each file is
        # synced on its own (sync_method = "fsync"): those waits need threads.
        threads = config.storage.write_threads or (1 if storage.sync_each else 0)
        self.thread = write.StorageThread(inline=threads == 0)
        self.in_flight = write.InFlight()
        self.decoder = codecs.Decoder(config.ingest.decode_workers, config.ingest.decode_timeout)
        # Temp files written as datasets arrive (native transport); the pipeline owns
        # each one from ``submit`` on: it renames it into place, quarantines or removes it.
        self.spooler = Spooler(
            storage.incoming,
            storage.sync_each,
            threads,
            validate.inspect_head,
            writeback=storage.fsync,
        )

    @property
    def capacity(self) -> int:
        """The most items the pipeline holds at once (queues plus one batch per stage)."""
        p = self.config.pipeline
        return len(self.queues) * p.queue_size + len(self.queues) * p.batch_max

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Pipeline]:
        """Run the stages for the duration of the block; stop them in order after it."""
        batch = self.config.pipeline.batch_max
        q = self.queues
        index_stage = IndexStage(
            self.index,
            self.storage,
            self.thread,
            self.in_flight,
            self.config.ingest.duplicate_policy,
            self.metrics,
        )
        ingest = self.config.ingest
        if ingest.check_pixels or ingest.transcode is not Transcode.NONE:
            await self.decoder.start()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(
                    run_steps(
                        q["validate"],
                        q["index"],
                        batch,
                        [
                            lambda items: validate.process(items, ingest, self.decoder),
                            lambda items: dedupe.process(
                                items, self.index, ingest.duplicate_policy, index_stage.committing
                            ),
                            lambda items: write.process(
                                items, self.storage, self.thread, self.in_flight
                            ),
                        ],
                    ),
                    name="validate-dedupe-write",
                )
                group.create_task(index_stage.run(q["index"], batch), name="index")
                try:
                    yield self
                except BaseException:
                    # A stage failed (the group cancelled us) or we were cancelled: the
                    # stages may be gone, so never wait on their queues here.
                    self.receiver.closed = True
                    with contextlib.suppress(asyncio.QueueFull):
                        q["validate"].put_nowait(STOP)
                    raise
                self.receiver.closed = True
                # Senders already blocked on the full first queue go in before Stop.
                await self.receiver.drained()
                await q["validate"].put(STOP)
        finally:
            await asyncio.to_thread(self.spooler.close)
            await asyncio.to_thread(self.thread.close)
            await asyncio.to_thread(self.decoder.close)
        log.info("pipeline stopped; %d items still in it", self.receiver.in_pipeline)
