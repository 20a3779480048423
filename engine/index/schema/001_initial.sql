-- Schema version 1: the four levels of the DICOM information model, and the quarantine.
-- Natural keys (UIDs, PatientID + Issuer) are the primary keys: a batch inserts all
-- levels with executemany and no round trips for surrogate ids.

CREATE TABLE patients (
    patient_id            TEXT NOT NULL,
    issuer_of_patient_id  TEXT NOT NULL DEFAULT '',
    patient_name          TEXT,
    patient_birth_date    TEXT,
    patient_sex           TEXT,
    PRIMARY KEY (patient_id, issuer_of_patient_id)
);
CREATE INDEX patients_name ON patients (patient_name);

CREATE TABLE studies (
    study_uid                 TEXT PRIMARY KEY,
    patient_id                TEXT NOT NULL,
    issuer_of_patient_id      TEXT NOT NULL DEFAULT '',
    study_date                TEXT,
    study_time                TEXT,
    accession_number          TEXT,
    study_id                  TEXT,
    study_description         TEXT,
    referring_physician_name  TEXT,
    modalities                TEXT,            -- ModalitiesInStudy, backslash separated
    num_series                INTEGER NOT NULL DEFAULT 0,
    num_instances             INTEGER NOT NULL DEFAULT 0,
    created_at                REAL NOT NULL,
    updated_at                REAL NOT NULL,   -- last instance received: for stable-study detection
    FOREIGN KEY (patient_id, issuer_of_patient_id) REFERENCES patients
);
CREATE INDEX studies_patient ON studies (patient_id, issuer_of_patient_id);
CREATE INDEX studies_date ON studies (study_date);
CREATE INDEX studies_accession ON studies (accession_number);

CREATE TABLE series (
    series_uid          TEXT PRIMARY KEY,
    study_uid           TEXT NOT NULL REFERENCES studies,
    modality            TEXT,
    series_number       INTEGER,
    series_description  TEXT,
    series_date         TEXT,
    series_time         TEXT,
    body_part_examined  TEXT,
    station_name        TEXT,
    num_instances       INTEGER NOT NULL DEFAULT 0,
    updated_at          REAL NOT NULL
);
CREATE INDEX series_study ON series (study_uid);

CREATE TABLE instances (
    sop_instance_uid        TEXT PRIMARY KEY,
    series_uid              TEXT NOT NULL REFERENCES series,
    study_uid               TEXT NOT NULL REFERENCES studies,
    sop_class_uid           TEXT NOT NULL,
    instance_number         INTEGER,
    content_date            TEXT,
    content_time            TEXT,
    rows                    INTEGER,
    columns                 INTEGER,
    number_of_frames        INTEGER,
    specific_character_set  TEXT,
    transfer_syntax         TEXT NOT NULL,     -- as stored in the file
    path                    TEXT NOT NULL,     -- relative to the storage folder
    size                    INTEGER NOT NULL,  -- bytes of the file
    digest                  TEXT NOT NULL,     -- content digest of the dataset as received (engine/digest.py)
    received_at             REAL NOT NULL,
    calling_ae              TEXT,
    called_ae               TEXT,
    peer_ip                 TEXT
);
CREATE INDEX instances_series ON instances (series_uid);
CREATE INDEX instances_study ON instances (study_uid);

CREATE TABLE quarantine (
    id                INTEGER PRIMARY KEY,
    path              TEXT,                    -- relative to the quarantine folder
    outcome           TEXT NOT NULL,
    status            INTEGER NOT NULL,        -- the DIMSE status answered
    reason            TEXT NOT NULL,
    sop_class_uid     TEXT,
    sop_instance_uid  TEXT,
    transfer_syntax   TEXT,
    calling_ae        TEXT,
    called_ae         TEXT,
    peer_ip           TEXT,
    received_at       REAL NOT NULL
);
