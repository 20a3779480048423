"""Dedupe (the first stage's second step): the fast path for a UID that is already stored.

A scanner re-sending after a timeout is normal. Same UID and same bytes: success,
nothing written. Same UID and other bytes: the configured policy. ``decide`` is
the rule; this stage applies it against the index before anything is written,
and the index stage applies it again inside its transaction, which makes the
index the final judge (two associations sending the same UID at once both pass
here, and the second is settled there).
"""

from __future__ import annotations

import logging
from collections.abc import Container
from typing import Protocol

from engine.config import DuplicatePolicy
from engine.duplicates import Decision, Existing, decide
from engine.model import Outcome, Result
from engine.stages.flow import Item

log = logging.getLogger(__name__)


OUTCOME_OF = {
    Decision.NEW: Outcome.STORED,
    Decision.SAME: Outcome.ALREADY_STORED,
    Decision.KEEP: Outcome.KEPT_EXISTING,
    Decision.OVERWRITE: Outcome.OVERWRITTEN,
    Decision.REJECT: Outcome.DUPLICATE_REJECTED,
}
DUPLICATE_MESSAGE = "an instance with this SOP Instance UID and different content is already stored"


class Lookup(Protocol):
    async def lookup(self, sop_instance_uids: list[str]) -> dict[str, Existing]: ...
    def lookup_now(self, sop_instance_uids: list[str]) -> dict[str, Existing] | None: ...


def apply(item: Item, decision: Decision, existing: Existing | None) -> None:
    """Resolve or reject the item when the decision ends its journey here."""
    uid = item.received.sop_instance_uid
    if decision is Decision.REJECT:
        log.warning("%s received again with different content; rejected by policy", uid)
        item.reject(OUTCOME_OF[decision], DUPLICATE_MESSAGE)
    elif decision in (Decision.SAME, Decision.KEEP):
        assert existing is not None
        if decision is Decision.KEEP:
            log.warning("%s received again with different content; keeping the stored copy", uid)
        item.resolve(Result(OUTCOME_OF[decision], "", existing.path))


async def process(
    batch: list[Item],
    index: Lookup,
    policy: DuplicatePolicy,
    committing: Container[str] = frozenset(),
) -> None:
    """Look the batch's UIDs up and apply the policy (a step of the first stage).

    ``committing``: UIDs of the index stage's batch in progress. Their rows may be
    committed and visible while its flush still runs: "already stored" must not be
    answered from them before they are on disk, so the index stage judges those.
    """
    candidates = [
        i
        for i in batch
        if i.validated is not None
        and i.rejection is None
        and i.received.sop_instance_uid not in committing
    ]
    if not candidates:
        return
    uids = [i.received.sop_instance_uid for i in candidates]
    try:
        quick = index.lookup_now(uids)
        existing = quick if quick is not None else await index.lookup(uids)
    except Exception:
        # The index stage judges again; a failed fast path costs only a write.
        log.exception("duplicate lookup failed; leaving the decision to the index")
        existing = {}
    for item in candidates:
        assert item.validated is not None
        found = existing.get(item.received.sop_instance_uid)
        apply(item, decide(found, item.validated.digest, policy), found)
