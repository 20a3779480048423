"""The duplicate rule, shared by the dedupe stage (fast path) and the index (final judge)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from engine.config import DuplicatePolicy


@dataclass(frozen=True, slots=True)
class Existing:
    """What the index holds for a SOP Instance UID."""

    digest: str
    path: str


class Decision(enum.Enum):
    NEW = "new"  # not stored yet: write it
    SAME = "same"  # identical bytes stored: success, write nothing
    KEEP = "keep"  # other bytes stored, policy keep: success, write nothing
    OVERWRITE = "overwrite"  # other bytes stored, policy overwrite: write, replace
    REJECT = "reject"  # other bytes stored, policy reject: Duplicate SOP Instance


_ON_CONFLICT = {
    DuplicatePolicy.KEEP: Decision.KEEP,
    DuplicatePolicy.OVERWRITE: Decision.OVERWRITE,
    DuplicatePolicy.REJECT: Decision.REJECT,
}


def decide(existing: Existing | None, digest: str, policy: DuplicatePolicy) -> Decision:
    if existing is None:
        return Decision.NEW
    if existing.digest == digest:
        return Decision.SAME
    return _ON_CONFLICT[policy]
