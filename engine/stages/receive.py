"""Stage 1, receive: the door between the network adapters' threads and the loop.

An association thread builds a ``Received`` record and calls ``submit_from_thread``:
one future per request, created on the loop, completed by the index stage; the
thread blocks until then (or until the store timeout). Backpressure is the bounded
first queue: when it is full, ``submit`` waits, so the scanner's C-STORE is
answered later; past ``store_timeout`` it is answered "out of resources".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque

from engine.metrics import Metrics
from engine.model import Outcome, Received, Result
from engine.stages.flow import Item, Stop

log = logging.getLogger(__name__)

LATENCY_SAMPLES = 1_000_000


class Receiver:
    """Every instance received (C-STORE on either transport, STOW-RS) passes ``submit``,
    which counts it, its bytes and its answer in ``metrics``."""

    def __init__(
        self, queue: asyncio.Queue[Item | Stop], store_timeout: float, metrics: Metrics
    ) -> None:
        self.queue = queue
        self.store_timeout = store_timeout
        self.metrics = metrics
        self.loop = asyncio.get_running_loop()
        self.in_pipeline = 0  # items put in the queue and not yet answered
        self.waiting = 0  # submitters blocked on a full queue
        self.closed = False
        self._none_waiting = asyncio.Event()
        # Seconds from a complete request to its answer; the oldest samples drop out.
        # deque.append is atomic, so association threads append without a lock.
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)

    async def drained(self) -> None:
        """Return once no sender is blocked on the first queue (call after closing)."""
        while self.waiting:
            self._none_waiting.clear()
            await self._none_waiting.wait()

    async def submit(self, received: Received) -> Result:
        """Put one item into the pipeline and wait for its result (on the loop)."""
        self.metrics.received(received.size)
        if self.closed:
            received.discard()
            return self.tally(Result(Outcome.OUT_OF_RESOURCES, "the engine is shutting down"))
        item = Item(received, self.loop.create_future())
        self.waiting += 1
        try:
            await self.queue.put(item)
        except BaseException:
            received.discard()  # never entered the pipeline (the sender gave up)
            raise
        finally:
            self.waiting -= 1
            if self.waiting == 0:
                self._none_waiting.set()
        self.in_pipeline += 1
        try:
            # Cancelled when the sender gives up: the item is then dropped at the
            # next stage boundary unless its file is already written.
            return self.tally(await item.future)
        finally:
            self.in_pipeline -= 1

    def tally(self, result: Result) -> Result:
        """Count the status answered (``submit`` does; the transports call it for the
        answers they give without the pipeline's result, such as a timeout)."""
        self.metrics.answered(result.outcome)
        return result

    def gave_up(self, received: Received) -> Result:
        """The answer when the pipeline did not answer within ``store_timeout``."""
        log.error(
            "no answer for %s within %.0f s; answering out of resources",
            received.sop_instance_uid,
            self.store_timeout,
        )
        return self.tally(
            Result(Outcome.OUT_OF_RESOURCES, "the engine is overloaded; try again later")
        )

    def answered(self, received: Received) -> None:
        """Note the seconds from the complete request to its answer (C-STORE)."""
        seconds = time.monotonic() - received.started
        self.latencies.append(seconds)
        self.metrics.store_latency.observe(seconds)

    def summary(self) -> dict[str, float]:
        """Answered requests and their latency percentiles, in milliseconds."""
        samples = sorted(self.latencies)
        if not samples:
            return {"answered": 0}

        def percentile(p: float) -> float:
            return round(samples[min(len(samples) - 1, int(p * len(samples)))] * 1000, 2)

        return {
            "answered": len(samples),
            "latency_p50_ms": percentile(0.50),
            "latency_p99_ms": percentile(0.99),
            "latency_max_ms": round(samples[-1] * 1000, 2),
        }

    def submit_from_thread(self, received: Received) -> Result:
        """Called from an association thread; blocks it until the pipeline answers."""
        future = asyncio.run_coroutine_threadsafe(self.submit(received), self.loop)
        try:
            result = future.result(timeout=self.store_timeout)
            self.answered(received)
            return result
        except concurrent.futures.TimeoutError:
            future.cancel()
            return self.gave_up(received)
        except Exception as exc:
            log.exception("pipeline failed for %s", received.sop_instance_uid)
            return self.tally(Result(Outcome.PROCESSING_FAILURE, f"internal error: {exc!r}"))
