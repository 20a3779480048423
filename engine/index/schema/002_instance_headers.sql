-- Schema version 2: each instance's encoded header (its dataset up to the pixel data,
-- in the stored transfer syntax), kept at ingest so that WADO-RS metadata is answered
-- from the index without reading the files. A separate table keeps the instances
-- table narrow for C-FIND and QIDO scans. No row: the header was too long or could not
-- be cut (metadata is then read from the file).
CREATE TABLE instance_headers (
    sop_instance_uid  TEXT PRIMARY KEY,
    header            BLOB NOT NULL
);
