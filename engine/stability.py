"""Stable studies: a study that has received nothing for ``[ingest] stable_age`` seconds.

Why a stored mark (``studies.stable_at``) rather than ``updated_at`` compared with the
clock at each use: becoming stable is an event that forwarding acts on exactly once.
The check that sets the mark also queues the study's forwards, in the same
transaction, so a crash can neither forward a study twice for one arrival nor
forget to forward it. The index writer clears the mark when an instance of the study
is added or replaced (``engine/index/batch.py``); the study then settles again, and
its rules are applied again.

``StabilityMonitor.run`` checks a few times per ``stable_age`` (at least every
``MAX_CHECK_INTERVAL`` seconds); a check that finds nothing settled only reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable

from engine.index import forward_queue
from engine.index.base import Index
from engine.index.forward_queue import Route, Settled

log = logging.getLogger(__name__)

# Checks per stable_age: a study is seen stable at most stable_age / CHECKS_PER_AGE late.
CHECKS_PER_AGE = 4
# The longest time between two checks, in seconds, whatever stable_age is.
MAX_CHECK_INTERVAL = 5.0
# Studies marked in one transaction: the writer is not held long between two batches.
STUDIES_PER_TRANSACTION = 200


class StabilityMonitor:
    """Marks settled studies stable and queues their forwards (``route``).

    ``on_queued`` is called (on the loop) after a check that queued forwards.
    """

    def __init__(
        self,
        index: Index,
        stable_age: float,
        route: Route,
        on_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self.index = index
        self.stable_age = stable_age
        self.route = route
        self.on_queued = on_queued
        self.interval = min(stable_age / CHECKS_PER_AGE, MAX_CHECK_INTERVAL)

    async def run(self, stop: asyncio.Event) -> None:
        """Check until ``stop`` is set; a failed check is logged and tried again later."""
        while not stop.is_set():
            try:
                await self.check()
            except Exception:
                log.exception("stable-study check failed; trying again in %.1f s", self.interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    async def check(self) -> Settled:
        """One check: mark every settled study stable; what was marked and queued."""
        total = Settled()
        while True:
            now = time.time()
            cutoff = now - self.stable_age
            if not await forward_queue.has_settled(self.index, cutoff):
                return total
            settled = await self.index.write(
                functools.partial(
                    forward_queue.settle,
                    now=now,
                    cutoff=cutoff,
                    route=self.route,
                    limit=STUDIES_PER_TRANSACTION,
                    dialect=self.index.dialect,
                )
            )
            for facts in settled.stable:
                queued = [dest for study, dest in settled.queued if study == facts.study_uid]
                log.info(
                    "study %s is stable (%s from %s)%s",
                    facts.study_uid,
                    "/".join(facts.modalities) or "no modality",
                    ", ".join(facts.calling_aes) or "unknown AE",
                    f"; forward to {', '.join(queued)} queued" if queued else "",
                )
            total.stable.extend(settled.stable)
            total.queued.extend(settled.queued)
            if settled.queued:
                self.on_queued()
            if len(settled.stable) < STUDIES_PER_TRANSACTION:
                return total
