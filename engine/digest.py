"""The content digest of a dataset: BLAKE3 (256-bit) of its bytes as received, in hex.

It decides whether a re-sent instance is the same (same UID, same digest), names the
file (its first 16 hex digits) and lets a check compare a file with its index row.
BLAKE3 is a cryptographic hash like SHA-256 (a sender cannot make two different
datasets look the same) and about five times faster here: 0.05 ms instead of 0.25 ms
for a 512 KB CT slice, on the hot path of every instance.

Indexes written before the change hold SHA-256 digests; an instance stored then and
re-sent now is judged "other content" and the duplicate policy applies (with "keep",
the default, the stored copy stays and the sender gets success).
"""

from __future__ import annotations

from blake3 import blake3

ALGORITHM = "blake3"


def of(data: bytes | memoryview) -> str:
    """The digest of ``data``, as stored in the index."""
    return blake3(data).hexdigest()


def hasher() -> blake3:
    """An incremental hasher (``update`` each fragment, then ``hexdigest``)."""
    return blake3()
