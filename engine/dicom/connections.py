"""Connections that are not associations (yet): what they may hold, on both transports.

A connection becomes an association when its A-ASSOCIATE-RQ is accepted. Before
that (waiting for the request, at most ``acse_timeout``), and after a refusal or an
abort (waiting for the peer to close, again at most ``acse_timeout``), it takes
none of the ``maximum_associations`` slots: a port scanner, a load balancer's health
check, or a peer that sends garbage, a truncated PDU or nothing at all can never
lock a scanner out, however many such connections it opens.

They are still bounded: past ``UNASSOCIATED_LIMIT`` of them the oldest is dropped to
make room (``Unassociated.add`` names it). A real requestor sends its A-ASSOCIATE-RQ
within a round trip of connecting, so only a flood of that many new connections
inside one round trip could push it out; the connections silent the longest go first.
Each may buffer at most one association PDU (``pdu.CONTROL_PDU_MAX_LENGTH``), so
this also bounds their memory.

Rule: every connection is in exactly one of two places, the association slots
(accepted) or here, from its accept to its close.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

# Connections without an association kept open at once; see the module docstring.
UNASSOCIATED_LIMIT = 128

C = TypeVar("C", bound=Hashable)


class Unassociated(Generic[C]):
    """The connections without an association, oldest first (one thread or loop only)."""

    def __init__(self, limit: int = UNASSOCIATED_LIMIT) -> None:
        if limit < 1:
            raise ValueError(f"limit must be positive, not {limit}")
        self.limit = limit
        self._open: dict[C, None] = {}  # insertion order: oldest first

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, connection: object) -> bool:
        return connection in self._open

    def __iter__(self) -> Iterator[C]:
        return iter(list(self._open))

    def add(self, connection: C) -> C | None:
        """Track a new connection; the oldest one to drop if that makes one too many."""
        self._open[connection] = None
        if len(self._open) <= self.limit:
            return None
        oldest = next(iter(self._open))
        del self._open[oldest]
        return oldest

    def discard(self, connection: C) -> None:
        """It became an association, or it closed."""
        self._open.pop(connection, None)
