"""The storage area: sharded Part 10 files, temp + rename, fsync per batch; quarantine."""
