"""The keys the index can match and return, by DICOM tag.

Stored keys come from ``engine/attributes.py`` (the columns the validate stage
extracts), so the catalogue follows the schema. The additional Query/Retrieve
attributes of PS3.4 C.3.4 (counts, ModalitiesInStudy, SOPClassesInStudy) are
read from the counters the index keeps or computed with a correlated subquery
that goes through an index (``studies_patient``, ``instances_study``).

A key's SQL is a template whose ``{LEVEL.column}`` placeholders are resolved per
query (``levels.Tables``); templates are constants of this module, never values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.tag import BaseTag, Tag

from engine.attributes import INSTANCE_KEYS, PATIENT_KEYS, SERIES_KEYS, STUDY_KEYS
from engine.query.levels import Level


class Matching(enum.Enum):
    """How a matching value is compared with the stored one (PS3.4 C.2.2.2)."""

    TEXT = "text"  # single value, wildcard
    NAME = "name"  # as TEXT, optionally case-insensitive, or on the first component group
    UID = "uid"  # single value, list of UIDs
    DATE = "date"  # single value, range
    TIME = "time"
    DATETIME = "datetime"
    INTEGER = "integer"  # single value
    RETURN_ONLY = "return only"  # counts: PS3.4 C.3.4 defines them as return keys


_BY_VR = {
    "PN": Matching.NAME,
    "UI": Matching.UID,
    "DA": Matching.DATE,
    "TM": Matching.TIME,
    "DT": Matching.DATETIME,
    "IS": Matching.INTEGER,
    "US": Matching.INTEGER,
    "UL": Matching.INTEGER,
    "SS": Matching.INTEGER,
    "SL": Matching.INTEGER,
}


@dataclass(frozen=True, slots=True)
class Key:
    """One attribute the index knows, at its level."""

    keyword: str
    tag: BaseTag
    vr: str
    level: Level
    value: str  # SQL template of the returned value
    matching: Matching
    column: str | None = None  # the level's column a stored key is matched on
    # Set-valued keys match when one row of a related table does: an EXISTS template
    # with "{match}" for the condition, which is on ``matched`` (a column of ``x``).
    exists: str | None = None
    matched: str | None = None


def _tag(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return Tag(tag)


def _key(
    keyword: str,
    level: Level,
    value: str,
    matching: Matching | None = None,
    *,
    column: str | None = None,
    exists: str | None = None,
    matched: str | None = None,
) -> Key:
    tag = _tag(keyword)
    vr = dictionary_VR(tag)
    return Key(
        keyword,
        tag,
        vr,
        level,
        value,
        matching or _BY_VR.get(vr, Matching.TEXT),
        column,
        exists,
        matched,
    )


# The character set of an instance is not a key: a response's own is set from its values.
_NOT_KEYS = frozenset({"specific_character_set"})


def _stored(level: Level, columns: dict[str, str]) -> list[Key]:
    return [
        _key(keyword, level, f"{{{level.name}.{column}}}", column=column)
        for column, keyword in columns.items()
        if column not in _NOT_KEYS
    ]


_SAME_PATIENT = (
    "x.patient_id = {PATIENT.patient_id} "
    "AND x.issuer_of_patient_id = {PATIENT.issuer_of_patient_id}"
)
_COMPUTED = [
    _key(
        "NumberOfPatientRelatedStudies",
        Level.PATIENT,
        f"(SELECT COUNT(*) FROM studies x WHERE {_SAME_PATIENT})",
        Matching.RETURN_ONLY,
    ),
    _key(
        "NumberOfPatientRelatedSeries",
        Level.PATIENT,
        f"(SELECT CAST(COALESCE(SUM(x.num_series), 0) AS BIGINT) FROM studies x"
        f" WHERE {_SAME_PATIENT})",
        Matching.RETURN_ONLY,
    ),
    _key(
        "NumberOfPatientRelatedInstances",
        Level.PATIENT,
        f"(SELECT CAST(COALESCE(SUM(x.num_instances), 0) AS BIGINT) FROM studies x"
        f" WHERE {_SAME_PATIENT})",
        Matching.RETURN_ONLY,
    ),
    _key("NumberOfStudyRelatedSeries", Level.STUDY, "{STUDY.num_series}", Matching.RETURN_ONLY),
    _key(
        "NumberOfStudyRelatedInstances", Level.STUDY, "{STUDY.num_instances}", Matching.RETURN_ONLY
    ),
    _key(
        "NumberOfSeriesRelatedInstances",
        Level.SERIES,
        "{SERIES.num_instances}",
        Matching.RETURN_ONLY,
    ),
    # The index keeps ModalitiesInStudy as the series' modalities (those with instances).
    _key(
        "ModalitiesInStudy",
        Level.STUDY,
        "{STUDY.modalities}",
        Matching.TEXT,
        exists=(
            "EXISTS (SELECT 1 FROM series x WHERE x.study_uid = {STUDY.study_uid} "
            "AND x.num_instances > 0 AND {match})"
        ),
        matched="x.modality",
    ),
    _key(
        "SOPClassesInStudy",
        Level.STUDY,
        "(SELECT GROUP_CONCAT(c, '\\') FROM (SELECT DISTINCT x.sop_class_uid AS c "
        "FROM instances x WHERE x.study_uid = {STUDY.study_uid} ORDER BY c) AS classes)",
        Matching.UID,
        exists=(
            "EXISTS (SELECT 1 FROM instances x WHERE x.study_uid = {STUDY.study_uid} AND {match})"
        ),
        matched="x.sop_class_uid",
    ),
]

KEYS: dict[BaseTag, Key] = {
    key.tag: key
    for key in [
        *_stored(Level.PATIENT, PATIENT_KEYS),
        *_stored(Level.STUDY, STUDY_KEYS),
        *_stored(Level.SERIES, SERIES_KEYS),
        *_stored(Level.IMAGE, INSTANCE_KEYS),
        *_COMPUTED,
    ]
}
BY_KEYWORD = {key.keyword: key for key in KEYS.values()}
