"""What moves between the stages: ``Item``, the ``Stop`` marker, and batch taking.

Batching is opportunistic: a stage waits for one item, then takes whatever else is
already queued, up to a cap, and never sleeps to fill a batch. A lone scanner is
never held back; under a burst batches grow by themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from engine.model import Outcome, Received, Result, Validated


class Stop:
    """Passed down the queues at shutdown, after the last item."""


STOP = Stop()


@dataclass(eq=False, slots=True)
class Item:
    """One instance on its way through the pipeline, with the future its sender awaits.

    ``rejection`` is set when a stage refused the item: later stages only
    quarantine and count it. ``result`` is set when it is resolved.
    """

    received: Received
    future: asyncio.Future[Result]
    validated: Validated | None = None
    rejection: Result | None = None
    path: str | None = None  # relative path of the written file
    quarantine_path: str | None = None  # relative to the quarantine folder
    journal: str | None = None  # the write batch's journal name
    size: int = 0  # bytes of the written file

    def reject(self, outcome: Outcome, message: str) -> None:
        if self.rejection is None:
            self.rejection = Result(outcome, message)

    @property
    def done(self) -> bool:
        return self.future.done()

    def resolve(self, result: Result) -> None:
        """Complete the sender's future (on the loop's thread), once."""
        if not self.future.done():
            self.future.set_result(result)


async def take_batch(queue: asyncio.Queue[Item | Stop], cap: int) -> tuple[list[Item], bool]:
    """Wait for one entry, then take what is already queued, up to ``cap`` items.

    Returns the items and whether the Stop marker was seen (it is always last).
    """
    batch: list[Item] = []
    entry = await queue.get()
    while True:
        if isinstance(entry, Stop):
            return batch, True
        batch.append(entry)
        if len(batch) >= cap:
            return batch, False
        try:
            entry = queue.get_nowait()
        except asyncio.QueueEmpty:
            return batch, False


def _discard_all(dropped: list[Received]) -> None:
    for received in dropped:
        received.discard()


async def going_on(batch: list[Item]) -> list[Item]:
    """The items that go on to the next step.

    An item already answered (a duplicate, or a sender that gave up waiting) goes
    no further, unless its file is written: then the index must still see it.
    """
    kept, dropped = [], []
    for item in batch:
        if not item.done or item.path is not None:
            kept.append(item)
        else:
            dropped.append(item.received)  # answered without a file of its own
    if dropped:  # their temp files go, off the loop (a NAS unlink is a round trip)
        await asyncio.to_thread(_discard_all, dropped)
    return kept


async def forward(outbox: asyncio.Queue[Item | Stop], batch: list[Item], stop: bool) -> None:
    """Pass the items that go on (``going_on``), then the Stop marker if it was seen."""
    for item in await going_on(batch):
        await outbox.put(item)
    if stop:
        await outbox.put(STOP)


Step = Callable[[list[Item]], Awaitable[None]]


async def run_steps(
    inbox: asyncio.Queue[Item | Stop],
    outbox: asyncio.Queue[Item | Stop],
    batch_max: int,
    steps: Sequence[Step],
) -> None:
    """A stage made of several steps run one after the other on each batch (validate,
    dedupe, write): what the previous step answered goes no further."""
    while True:
        batch, stop = await take_batch(inbox, batch_max)
        for step in steps:
            if batch:
                await step(batch)
                batch = await going_on(batch)
        await forward(outbox, batch, stop)
        if stop:
            return
