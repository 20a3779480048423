"""Forwarding: stable studies sent on to other DICOM nodes by ``[[forward]]`` rules.

```
 studies settle --StabilityMonitor--> forward_queue (in the index) --Forwarder--> C-STORE SCU
                  (engine/stability.py:      'pending' items          (engine/dicom/store_scu.py,
                   rules applied here)                                  in a worker thread)
```

- **Rules** (``destinations``): a study that becomes stable is queued once for each
  destination whose rule matches it; every filter of a rule must match (``matches``).
- **The queue is in the index**, so a restart or a peer that is down loses nothing.
  Its invariants are written in ``engine/index/forward_queue.py``.
- **An attempt** sends every instance of the study as indexed when it starts, except
  those the destination acknowledged in earlier attempts of the same item. It
  succeeds when every instance sent was acknowledged (success or a warning status).
  Otherwise it is retried after ``retry_initial`` seconds, twice as long each time up
  to ``retry_max``; after ``max_attempts`` the item is 'failed' (an ERROR in the log).
  An attempt cut short by the engine's shutdown is retried at the next start.
- **A study that changes after it was forwarded** (new or replaced instances) becomes
  unstable, then stable again, and is queued again: the new item sends the study whole
  (the destination stores an instance it already has again under the same UID).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager

from pydicom.dataset import Dataset

from engine import codecs
from engine.config import Config, ForwardingConfig, ForwardRule
from engine.dicom.qr import Decompressor, QueryEngine
from engine.dicom.store_scu import Destination, Instance, Progress, send
from engine.index import forward_queue
from engine.index.base import Index
from engine.index.forward_queue import Claim, StudyFacts
from engine.query.find import Model
from engine.stability import StabilityMonitor

log = logging.getLogger(__name__)

# The longest the forwarder sleeps without looking at the queue, in seconds (it is
# woken when forwards are queued or an attempt ends here), and never longer than
# [forwarding] retry_initial: on an index shared by several nodes, items queued by
# another node, or left by a node that died, are seen within that time.
IDLE_CHECK = 60.0
# Seconds before the forwarder looks at the queue again after failing to read it.
ERROR_PAUSE = 5.0
# A claim's lease is renewed this many times per lease while its attempt runs, and not
# more often than every RENEW_MIN seconds.
RENEWALS_PER_LEASE = 3
RENEW_MIN = 0.05
# 2.0 ** this is still a finite float: retry delays are computed below it.
MAX_DOUBLINGS = 1000


# -- rules --------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _pattern(text: str) -> re.Pattern[str]:
    """A filter as a regular expression: ``*`` any run of characters, ``?`` any one."""
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in text.strip())
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL)


def _any_matches(pattern: str, values: Iterable[str]) -> bool:
    if not pattern.strip():
        return True
    compiled = _pattern(pattern)
    return any(compiled.fullmatch(value.strip()) for value in values)


def matches(rule: ForwardRule, study: StudyFacts) -> bool:
    """Whether every filter of ``rule`` matches ``study`` (an empty filter always does)."""
    return (
        _any_matches(rule.modality, study.modalities)
        and _any_matches(rule.calling_ae, study.calling_aes)
        and _any_matches(rule.study_description, [study.study_description])
    )


def destinations(rules: Sequence[ForwardRule], study: StudyFacts) -> list[str]:
    """The destinations of the rules that match ``study``, each once, in rule order."""
    chosen = (rule.destination.strip() for rule in rules if matches(rule, study))
    return list(dict.fromkeys(chosen))


def retry_delay(attempt: int, settings: ForwardingConfig) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (from 1)."""
    doublings = min(max(attempt - 1, 0), MAX_DOUBLINGS)
    return min(settings.retry_initial * 2.0**doublings, settings.retry_max)


def study_identifier(study_uid: str) -> Dataset:
    """The C-MOVE-style identifier that selects a whole study (``QueryEngine.instances``)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    return identifier


def acknowledged(sent: Sequence[Instance], progress: Progress) -> list[str]:
    """The UIDs the destination acknowledged: the SCU works in order, so the instances
    it got to are the first ``len(sent) - remaining``; those not failed were accepted."""
    failed = set(progress.failed_uids)
    reached = sent[: len(sent) - progress.remaining]
    return [i.sop_instance_uid for i in reached if i.sop_instance_uid not in failed]


# -- the forwarder ------------------------------------------------------------------


class Forwarder:
    """Sends the queue's due items, at most ``[forwarding] associations`` at once."""

    def __init__(
        self,
        config: Config,
        index: Index,
        query: QueryEngine,
        decoder: codecs.Decoder | None = None,
    ) -> None:
        """``decoder``: decompresses instances for a destination that refuses their
        compressed syntax (without one, those instances fail)."""
        self.settings = config.forwarding
        self.calling_ae = config.dicom.ae_title
        self.peers = {peer.ae_title.strip(): peer for peer in config.dicom.peers}
        self.index = index
        self.query = query
        self.decoder = decoder
        self._wake = asyncio.Event()
        # Read by the SCU's worker thread between two instances.
        self._stopping = threading.Event()
        self._busy: set[int] = set()
        # Lease renewals of the attempts under way, by item id.
        self._renewals: dict[int, asyncio.Task[None]] = {}
        self._idle_check = min(IDLE_CHECK, self.settings.retry_initial)

    @property
    def busy(self) -> int:
        """Attempts under way."""
        return len(self._busy)

    def wake(self) -> None:
        """Look at the queue now (forwards were queued)."""
        self._wake.set()

    def stop(self) -> None:
        """Claim nothing more; attempts under way stop after their current instance."""
        self._stopping.set()
        self._wake.set()

    def _lease(self, attempt: int) -> float:
        return retry_delay(attempt, self.settings)

    async def run(self) -> None:
        """Until ``stop``: claim due items, each attempt a task of this group."""
        async with asyncio.TaskGroup() as group:
            while not self._stopping.is_set():
                self._wake.clear()
                wait = self._idle_check
                try:
                    if len(self._busy) < self.settings.associations:
                        claim = await self._claim()
                        if isinstance(claim, Claim):
                            self._busy.add(claim.id)
                            group.create_task(self._forward(claim), name=f"forward-{claim.id}")
                            continue
                        if claim is not None:
                            wait = min(max(claim - time.time(), 0.0), self._idle_check)
                except Exception:
                    wait = ERROR_PAUSE
                    log.exception("forwarding queue unreadable; looking again in %.0f s", wait)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)

    async def _claim(self) -> Claim | float | None:
        """A claimed item; else when the next one is due; None if nothing is queued."""
        due = await forward_queue.next_due(self.index, self._busy)
        now = time.time()
        if due is None or due > now:
            return due
        busy = frozenset(self._busy)
        dialect = self.index.dialect
        return await self.index.write(
            lambda db: forward_queue.claim(db, now, busy, self._lease, dialect)
        )

    async def _forward(self, claim: Claim) -> None:
        self._renewals[claim.id] = asyncio.create_task(
            self._renew(claim), name=f"forward-lease-{claim.id}"
        )
        try:
            await self._attempt(claim)
        except Exception:
            # The item stays pending: it is tried again when its claim's lease runs out.
            log.exception("forward %d of study %s to %s: attempt broke off", *_who(claim))
        finally:
            await self._stop_renewing(claim)
            self._busy.discard(claim.id)
            self._wake.set()

    async def _renew(self, claim: Claim) -> None:
        """Keep the claim's lease while its attempt runs, however long the study takes to
        send. Engine nodes sharing the index take an item over only once its lease has
        run out: when the node sending it has died (it renews no more)."""
        lease = self._lease(claim.attempt)
        while True:
            await asyncio.sleep(max(lease / RENEWALS_PER_LEASE, RENEW_MIN))
            until = time.time() + lease
            try:
                renewal = functools.partial(forward_queue.renew, claim=claim, until=until)
                await self.index.write(renewal)
            except Exception:
                log.warning("forward %d of study %s to %s: lease not renewed", *_who(claim))

    async def _stop_renewing(self, claim: Claim) -> None:
        """Before the attempt's end is written: no renewal may come after it (a renewal
        already handed to the writer runs before anything submitted after it)."""
        task = self._renewals.pop(claim.id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _attempt(self, claim: Claim) -> None:
        peer = self.peers.get(claim.destination)
        if peer is None:
            await self._stop_renewing(claim)
            await self._give_up(claim, f"{claim.destination} is not in [[dicom.peers]] any more")
            return
        found = await asyncio.to_thread(
            self.query.instances, Model.STUDY_ROOT, study_identifier(claim.study_uid)
        )
        todo = [i for i in found if i.sop_instance_uid not in claim.acknowledged]
        log.info(
            "forward %d of study %s to %s: start, attempt %d of %d, %d instance(s)%s",
            *_who(claim),
            claim.attempt,
            self.settings.max_attempts,
            len(todo),
            f" ({len(found) - len(todo)} sent before)" if len(todo) < len(found) else "",
        )
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        progress = await asyncio.to_thread(
            send,
            Destination(peer.ae_title, peer.host, peer.port),
            todo,
            calling_ae=self.calling_ae,
            cancelled=self._stopping.is_set,
            timeout=self.settings.timeout,
            decompress=Decompressor(self.decoder, loop) if self.decoder else None,
        )
        await self._stop_renewing(claim)
        now = time.time()
        if not progress.failed and not progress.remaining:
            ended = await self.index.write(lambda db: forward_queue.finish_done(db, claim, now))
            log.info(
                "forward %d of study %s to %s: done, %d instance(s) in %.1f s%s",
                *_who(claim),
                len(todo),
                time.monotonic() - started,
                f" (with {ended - 1} later request(s) for it)" if ended > 1 else "",
            )
            return
        sent = acknowledged(todo, progress)
        if not progress.failed:  # cut short by the shutdown: go on at the next start
            await self.index.write(
                lambda db: forward_queue.finish_retry(db, claim, sent, now, "interrupted")
            )
            log.info(
                "forward %d of study %s to %s: interrupted by the shutdown, %d of %d sent",
                *_who(claim),
                len(sent),
                len(todo),
            )
            return
        error = _failure(progress, len(todo))
        if claim.attempt >= self.settings.max_attempts:
            await self._give_up(claim, error)
            return
        delay = retry_delay(claim.attempt, self.settings)
        await self.index.write(
            lambda db: forward_queue.finish_retry(db, claim, sent, now + delay, error)
        )
        log.warning(
            "forward %d of study %s to %s: attempt %d of %d failed (%s); next in %.1f s",
            *_who(claim),
            claim.attempt,
            self.settings.max_attempts,
            error,
            delay,
        )

    async def _give_up(self, claim: Claim, error: str) -> None:
        now = time.time()
        await self.index.write(lambda db: forward_queue.finish_failed(db, claim, now, error))
        log.error(
            "forward %d of study %s to %s: failed after %d attempt(s), given up: %s",
            *_who(claim),
            claim.attempt,
            error,
        )


def _who(claim: Claim) -> tuple[int, str, str]:
    return claim.id, claim.study_uid, claim.destination


def _failure(progress: Progress, total: int) -> str:
    if not progress.completed and not progress.warning:
        return f"none of {total} instance(s) acknowledged (destination down or refusing?)"
    return f"{progress.failed} of {total} instance(s) not acknowledged"


@asynccontextmanager
async def running(
    config: Config, index: Index, query: QueryEngine, decoder: codecs.Decoder | None
) -> AsyncIterator[Forwarder]:
    """Stable-study checks and the forwarder, for the duration of the block.

    At its end no new attempt starts, and those under way stop after their current
    instance (a C-STORE waits at most ``[forwarding] timeout`` for its response).
    """
    forwarder = Forwarder(config, index, query, decoder)
    monitor = StabilityMonitor(
        index,
        config.ingest.stable_age,
        functools.partial(destinations, config.forward),
        forwarder.wake,
    )
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        group.create_task(monitor.run(stop), name="stable-studies")
        group.create_task(forwarder.run(), name="forwarder")
        try:
            yield forwarder
        finally:
            if forwarder.busy:
                log.info("forwarding: stopping %d attempt(s) under way", forwarder.busy)
            stop.set()
            forwarder.stop()
