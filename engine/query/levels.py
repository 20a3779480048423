"""The four levels of the Query/Retrieve information models and their index tables.

A query at one level reads that level's table and joins the tables above it only
when it needs their columns. A lower table also holds the keys of the levels
above it (``studies.patient_id``, ``series.study_uid``, ``instances.series_uid``,
...), and matching on those copies instead of the parent's column lets SQLite
use the child's index (``series_study``, ``instances_series``) without a join.
"""

from __future__ import annotations

import enum
import re


class Level(enum.Enum):
    """A QueryRetrieveLevel (PS3.4 C.6.1.1.1); the value is the attribute's text."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def rank(self) -> int:
        """0 for PATIENT down to 3 for IMAGE: a smaller rank is a higher level."""
        return HIERARCHY.index(self)

    @property
    def table(self) -> str:
        return _TABLES[self]

    @property
    def alias(self) -> str:
        return _ALIASES[self]

    @property
    def unique_key(self) -> str:
        """The keyword of the level's unique key (PS3.4 C.6.1.1 / C.6.2.1)."""
        return _UNIQUE_KEYS[self]


HIERARCHY = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)

_TABLES = {
    Level.PATIENT: "patients",
    Level.STUDY: "studies",
    Level.SERIES: "series",
    Level.IMAGE: "instances",
}
_ALIASES = {Level.PATIENT: "p", Level.STUDY: "st", Level.SERIES: "se", Level.IMAGE: "i"}
_UNIQUE_KEYS = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}

# Columns of a higher level that a lower level's table holds too (see the schema).
_ALSO_HELD = {
    Level.STUDY: frozenset({"patient_id", "issuer_of_patient_id"}),
    Level.SERIES: frozenset({"study_uid"}),
    Level.IMAGE: frozenset({"study_uid", "series_uid"}),
}

# How a query at one level reaches a table above it.
_JOINS = {
    (Level.IMAGE, Level.SERIES): "JOIN series se ON se.series_uid = i.series_uid",
    (Level.IMAGE, Level.STUDY): "JOIN studies st ON st.study_uid = i.study_uid",
    (Level.SERIES, Level.STUDY): "JOIN studies st ON st.study_uid = se.study_uid",
}
_JOIN_PATIENTS = (
    "JOIN patients p ON p.patient_id = st.patient_id "
    "AND p.issuer_of_patient_id = st.issuer_of_patient_id"
)

# "{STUDY.study_uid}" in a SQL template: a column of a level, resolved per query.
_PLACEHOLDER = re.compile(r"\{(PATIENT|STUDY|SERIES|IMAGE)\.(\w+)\}")


class Tables:
    """The tables one query at ``level`` reads, collected while its SQL is built."""

    def __init__(self, level: Level) -> None:
        self.level = level
        self._used = {level}

    def column(self, owner: Level, column: str) -> str:
        """``owner``'s ``column`` as this query reads it: from the lowest table holding it."""
        if owner.rank > self.level.rank:
            raise ValueError(f"{owner.value} is below the query level {self.level.value}")
        for level in reversed(HIERARCHY[owner.rank : self.level.rank + 1]):
            if level is owner or column in _ALSO_HELD.get(level, ()):
                self._use(level)
                return f"{level.alias}.{column}"
        raise AssertionError("unreachable: the owner's table holds its column")

    def expand(self, template: str) -> str:
        """A SQL template with its ``{LEVEL.column}`` placeholders resolved."""
        return _PLACEHOLDER.sub(lambda m: self.column(Level[m[1]], m[2]), template)

    def _use(self, level: Level) -> None:
        self._used.add(level)
        if level is Level.PATIENT and self.level is not Level.PATIENT:
            self._used.add(Level.STUDY)  # patients are reached through studies

    def from_clause(self) -> str:
        """FROM and JOINs: call it after every column has been resolved."""
        parts = [f"{self.level.table} {self.level.alias}"]
        for level in (Level.SERIES, Level.STUDY):
            if level in self._used and level is not self.level:
                parts.append(_JOINS[(self.level, level)])
        if Level.PATIENT in self._used and self.level is not Level.PATIENT:
            parts.append(_JOIN_PATIENTS)
        return " ".join(parts)
