"""The attributes the index keeps: index column name -> DICOM keyword, by level.

The index schema (``index/schema/*.sql``) has exactly these columns; the
validate stage extracts them, the index stores them, queries match on them.
"""

PATIENT_KEYS = {
    "patient_id": "PatientID",
    "issuer_of_patient_id": "IssuerOfPatientID",
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
}
STUDY_KEYS = {
    "study_uid": "StudyInstanceUID",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "accession_number": "AccessionNumber",
    "study_id": "StudyID",
    "study_description": "StudyDescription",
    "referring_physician_name": "ReferringPhysicianName",
}
SERIES_KEYS = {
    "series_uid": "SeriesInstanceUID",
    "modality": "Modality",
    "series_number": "SeriesNumber",
    "series_description": "SeriesDescription",
    "series_date": "SeriesDate",
    "series_time": "SeriesTime",
    "body_part_examined": "BodyPartExamined",
    "station_name": "StationName",
}
INSTANCE_KEYS = {
    "sop_instance_uid": "SOPInstanceUID",
    "sop_class_uid": "SOPClassUID",
    "instance_number": "InstanceNumber",
    "content_date": "ContentDate",
    "content_time": "ContentTime",
    "rows": "Rows",
    "columns": "Columns",
    "number_of_frames": "NumberOfFrames",
    "specific_character_set": "SpecificCharacterSet",
}
ALL_KEYS = {**PATIENT_KEYS, **STUDY_KEYS, **SERIES_KEYS, **INSTANCE_KEYS}
INTEGER_COLUMNS = frozenset(
    {"series_number", "instance_number", "rows", "columns", "number_of_frames"}
)
