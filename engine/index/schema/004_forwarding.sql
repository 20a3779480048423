-- Schema version 4: stable studies and the forwarding queue.
--
-- A study is stable once it has received nothing for [ingest] stable_age seconds: the
-- engine's stability task sets stable_at then (engine/stability.py), and the index
-- writer clears it when an instance of the study is added or replaced, so the study
-- becomes stable again later. Studies indexed before this version are long settled:
-- they are marked stable as of their last instance, so that an upgrade does not
-- forward the whole archive.
ALTER TABLE studies ADD COLUMN stable_at REAL;
UPDATE studies SET stable_at = updated_at;
-- Only the studies still settling: small, scanned at every stability check.
CREATE INDEX studies_unstable ON studies (updated_at) WHERE stable_at IS NULL;

-- One row per (study, destination) to send, queued by a [[forward]] rule when the study
-- became stable (engine/forwarding.py). 'pending' rows are the forwarding backlog.
CREATE TABLE forward_queue (
    id               INTEGER PRIMARY KEY,
    study_uid        TEXT NOT NULL,
    destination      TEXT NOT NULL,            -- an ae_title of [[dicom.peers]]
    state            TEXT NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'done', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL,            -- while an attempt runs: when it is retried if the engine dies
    last_error       TEXT,
    created_at       REAL NOT NULL,
    done_at          REAL                      -- when it ended, done or failed
);
CREATE INDEX forward_queue_due ON forward_queue (next_attempt_at) WHERE state = 'pending';
CREATE INDEX forward_queue_study ON forward_queue (study_uid, destination, state);

-- The instances a destination acknowledged in an unfinished item's earlier attempts:
-- a retry sends the others only. Removed when the item ends.
CREATE TABLE forward_sent (
    queue_id          INTEGER NOT NULL,
    sop_instance_uid  TEXT NOT NULL,
    PRIMARY KEY (queue_id, sop_instance_uid)
) WITHOUT ROWID;
