"""``python -m engine reindex``: rebuild the index from the storage folder alone.

Every instance file is read through once: its header is parsed and its index values
extracted by the ingest's own code (``engine/stages/validate.py``), so patients,
studies, series, instances and the kept headers (``instance_headers``, from which
WADO-RS metadata is answered) come out as the ingest made them, and C-FIND, QIDO-RS and
WADO-RS answer as before. Rows go in through ``SQLiteIndex.commit_batch``, a few
hundred files per transaction, with the ingest's counts and recounts.

What only the index knew is taken from the old index, when there is one and it can
be read:

- per instance, when the file is the one its row named: when it was received, the
  calling and called AE titles, the peer's address, and its digest (of the dataset as
  received: for an image stored transcoded, not the digest of the file's dataset);
- per study its created, updated and stable times, per series its updated time;
- every other table (``quarantine``, ``backups``, ``forward_queue``, ``forward_sent``,
  and whatever a later schema adds), copied whole.

Without it, or for a file it did not know: a journal entry left by a crash still
names the instance's origin; otherwise ``received_at`` is the file's mtime, the
calling AE title the file meta's Source AE Title, the called AE title and the peer's
address are unknown (empty), and the digest is computed from the file. The quarantine
table is rebuilt from the quarantine folder's notes; the backups and forwarding
history are lost; studies settled for ``stable_age`` are marked stable as of their last
instance (as the index upgrade that brought stable studies did), so that no
``[[forward]]`` rule sends the whole archive again.

Invariants:

- No engine runs on the storage folder: reindex holds the lock the engine takes
  (``StorageArea``) from start to end, and does not start when it cannot take it.
- Nothing in the storage folder is written, moved or removed: a file that does not
  parse, or another copy of an instance already indexed, is reported and left as is.
- The new index is built beside the old one (``<index>.reindex``), synced, and renamed
  over it in one step. Until then the old index is untouched (but for a checkpoint of
  its write-ahead log); it is kept as ``<index>.bak`` until the rename has succeeded,
  and for good when some of it could not be read. A reindex stopped before the rename
  leaves the old index as it was, and its next run starts again from the beginning.
"""

from engine.reindex.rebuild import NEW_SUFFIX, OLD_SUFFIX, READERS, Reindexed, reindex

__all__ = ["NEW_SUFFIX", "OLD_SUFFIX", "READERS", "Reindexed", "reindex"]
