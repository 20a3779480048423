-- Schema version 3: the backups made by the running engine ([backup] interval), one row
-- per attempt (engine/backup/schedule.py). ``python -m engine backup`` run by hand only
-- reads the index and records its result in the backup folder (backup.json) instead.
-- The age of the last good backup is SELECT MAX(finished_at) FROM backups WHERE ok.
CREATE TABLE backups (
    id            INTEGER PRIMARY KEY,
    started_at    REAL NOT NULL,             -- seconds since the epoch, like received_at
    finished_at   REAL NOT NULL,
    destination   TEXT NOT NULL,             -- the backup folder
    ok            INTEGER NOT NULL,          -- 1: complete, every copy read back and checked
    files_copied  INTEGER NOT NULL DEFAULT 0,
    bytes_copied  INTEGER NOT NULL DEFAULT 0,
    message       TEXT NOT NULL DEFAULT ''   -- a summary, or why it failed
);
CREATE INDEX backups_finished ON backups (finished_at);
