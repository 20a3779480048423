"""C-FIND (PS3.4 annex C): a request identifier -> one SQL query -> response identifiers.

``plan`` checks the identifier as the baseline hierarchical search requires
(PS3.4 C.4.1.2, C.4.1.3.1): a QueryRetrieveLevel of the model, and for a query
at level L the unique key of every level above L, with a single value. It then
builds one parameterised SELECT returning one row per entity at level L (joined
with the tables above it when their columns are needed), and the list of keys
to return: exactly the request's, plus QueryRetrieveLevel.

Keys are matched at the query level and above; the index answers the ones it
has columns for (``keys.py``). Any other key, a sequence or a key below the query
level is returned empty and not matched, as PS3.4 allows for optional keys it
does not support: ``Plan.unsupported`` lists them, so that the caller can send
Pending 0xFF01 instead of 0xFF00.

``run`` executes a plan on a caller's connection (reads only: ``engine/index/reads.py``)
and yields the responses; database errors propagate (``IndexReadError`` and
``sqlite3.Error``). The SQL is built for the index's dialect (``plan(dialect=...)``).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from engine.index.dialect import SQLITE, Dialect
from engine.index.reads import Connection, Cursor
from engine.query import matching
from engine.query.keys import BY_KEYWORD, KEYS, Key, Matching
from engine.query.levels import HIERARCHY, Level, Tables
from engine.query.ranges import BadValue
from engine.query.response import QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET, ReturnKey, respond
from engine.status import (
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
    INVALID_MATCHING_VALUE,
    PENDING,
    PENDING_UNSUPPORTED_KEYS,
)

log = logging.getLogger(__name__)


class Model(enum.Enum):
    """The Query/Retrieve information models (PS3.4 C.6.1, C.6.2)."""

    PATIENT_ROOT = "PATIENT_ROOT"
    STUDY_ROOT = "STUDY_ROOT"

    @property
    def levels(self) -> tuple[Level, ...]:
        """Its levels, top first. In Study Root, patient keys are study keys."""
        return HIERARCHY if self is Model.PATIENT_ROOT else HIERARCHY[1:]


class QueryError(Exception):
    """A C-FIND that cannot be answered: its failure status and an error comment."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"0x{status:04X}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Plan:
    """A checked C-FIND: its SQL and parameters, and the keys each response carries."""

    model: Model
    level: Level
    sql: str
    params: tuple[object, ...]
    returns: tuple[ReturnKey, ...]
    unsupported: tuple[BaseTag, ...]  # keys returned empty or not matched
    charset: str | None  # the request's SpecificCharacterSet
    dialect: Dialect = SQLITE

    @property
    def pending_status(self) -> int:
        """The status of each match: 0xFF01 when optional keys were not supported."""
        return PENDING_UNSUPPORTED_KEYS if self.unsupported else PENDING


# Deterministic order of the matches at each level.
_ORDER = {
    Level.PATIENT: (
        (Level.PATIENT, "patient_name"),
        (Level.PATIENT, "patient_id"),
        (Level.PATIENT, "issuer_of_patient_id"),
    ),
    Level.STUDY: (
        (Level.STUDY, "study_date"),
        (Level.STUDY, "study_time"),
        (Level.STUDY, "study_uid"),
    ),
    Level.SERIES: ((Level.SERIES, "series_number"), (Level.SERIES, "series_uid")),
    Level.IMAGE: ((Level.IMAGE, "instance_number"), (Level.IMAGE, "sop_instance_uid")),
}
_NOT_KEYS = frozenset({QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET})


def _texts(value: Any) -> list[str]:
    """An element's value as stripped text values; empty ones dropped."""
    if value is None:
        return []
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    texts = []
    for item in items:
        if isinstance(item, bytes):
            item = item.decode("latin-1")
        text = str(item).strip(" \x00") if item is not None else ""
        if text:
            texts.append(text)
    return texts


def _element(identifier: Dataset, tag: BaseTag) -> tuple[str, list[str]]:
    """(VR, text values) of a request element.

    pydicom cannot convert some matching values (``*`` in an IS); those are read
    from the raw bytes, which for such VRs are ASCII.
    """
    try:
        element = identifier[tag]
    except Exception:
        raw = identifier.get_item(tag)
        if not isinstance(raw, RawDataElement):
            raise
        vr = raw.VR or (dictionary_VR(tag) if dictionary_has_tag(tag) else "UN")
        text = raw.value.decode("latin-1") if isinstance(raw.value, bytes) else ""
        return vr, _texts(text.split("\\"))
    return element.VR, [] if element.VR == "SQ" else _texts(element.value)


def _level(model: Model, identifier: Dataset) -> Level:
    values = _texts(identifier.get("QueryRetrieveLevel"))
    if len(values) != 1:
        raise QueryError(
            IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "QueryRetrieveLevel is missing or not one value"
        )
    try:
        level = Level(values[0])
    except ValueError:
        raise QueryError(
            IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"unknown QueryRetrieveLevel {values[0]!r}"
        ) from None
    if level not in model.levels:
        raise QueryError(
            IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            f"QueryRetrieveLevel {level.value} is not a level of the {model.value} model",
        )
    return level


def _check_hierarchy(model: Model, level: Level, identifier: Dataset) -> None:
    """The unique key of each level above the query level, with one value (C.4.1.3.1)."""
    for above in model.levels[: model.levels.index(level)]:
        keyword = above.unique_key
        if keyword not in identifier:
            raise QueryError(
                IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                f"a {level.value} query needs the {above.value} unique key {keyword}",
            )
        try:
            values = _element(identifier, BY_KEYWORD[keyword].tag)[1]
        except Exception as exc:
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{keyword}: {exc}") from exc
        if len(values) != 1 or matching.has_wildcard(values[0]):
            raise QueryError(
                IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                f"{keyword} must have a single value above the query level, not {values!r}",
            )


def _match(
    key: Key, tables: Tables, values: list[str], fuzzy: bool, dialect: Dialect
) -> matching.Condition:
    fuzzy = fuzzy and key.matching is Matching.NAME
    try:
        if key.column is not None:
            expr = tables.column(key.level, key.column)
            return matching.condition(key.matching, expr, values, fuzzy=fuzzy, dialect=dialect)
        assert key.exists is not None and key.matched is not None
        inner = matching.condition(
            key.matching, key.matched, values, fuzzy=fuzzy, dialect=dialect
        )
    except BadValue as exc:
        raise QueryError(INVALID_MATCHING_VALUE, f"{key.keyword}: {exc}") from exc
    return matching.Condition(tables.expand(key.exists).replace("{match}", inner.sql), inner.params)


def plan(
    model: Model,
    identifier: Dataset,
    *,
    fuzzy_names: bool = False,
    relational: bool = False,
    dialect: Dialect = SQLITE,
) -> Plan:
    """Check a C-FIND identifier and build its query; raises QueryError.

    ``fuzzy_names``: person names match case-insensitively. ``relational``: the unique
    keys above the query level may be absent or matched like any other key (QIDO-RS
    searches all series or all instances; C-FIND's baseline is hierarchical).
    """
    level = _level(model, identifier)
    if not relational:
        _check_hierarchy(model, level, identifier)
    tables = Tables(level)
    selects: dict[str, int] = {}
    where: list[str] = []
    params: list[object] = []
    returns: list[ReturnKey] = []
    unsupported: list[BaseTag] = []
    for tag in sorted(identifier.keys()):
        if tag in _NOT_KEYS or tag.element == 0:  # group lengths are not keys
            continue
        try:
            vr, values = _element(identifier, tag)
        except Exception as exc:
            raise QueryError(INVALID_MATCHING_VALUE, f"{tag}: {exc}") from exc
        key = KEYS.get(tag)
        if key is None or vr == "SQ" or key.level.rank > level.rank:
            returns.append(ReturnKey(tag, vr if vr != "UN" or key is None else key.vr, None))
            unsupported.append(tag)
            continue
        expr = tables.expand(key.value)
        returns.append(ReturnKey(tag, key.vr, selects.setdefault(expr, len(selects))))
        if matching.is_universal(values):
            continue
        if key.matching is Matching.RETURN_ONLY:
            log.debug("%s is a return key; its value %r is not matched", key.keyword, values)
            unsupported.append(tag)
            continue
        condition = _match(key, tables, values, fuzzy_names, dialect)
        where.append(condition.sql)
        params.extend(condition.params)
    order = [tables.column(owner, column) for owner, column in _ORDER[level]]
    sql = (
        f"SELECT {', '.join(selects) or 'NULL'} FROM {tables.from_clause()}"
        + (f" WHERE {' AND '.join(where)}" if where else "")
        + f" ORDER BY {', '.join(order)}"
    )
    charset = _texts(identifier.get("SpecificCharacterSet"))
    query = Plan(
        model,
        level,
        sql,
        tuple(params),
        tuple(returns),
        tuple(unsupported),
        "\\".join(charset) or None,
        dialect,
    )
    log.debug("C-FIND %s %s: %s %r", model.value, level.value, sql, query.params)
    return query


class Matches(Iterator[Dataset]):
    """The responses of a running query, one per match, in order.

    With a limit, it yields at most that many; ``limit_hit`` then tells whether
    more matched (read it once iteration has ended). ``close`` ends it early
    (a C-CANCEL).
    """

    def __init__(self, cursor: Cursor, plan: Plan, limit: int | None) -> None:
        self._cursor: Cursor | None = cursor
        self._plan = plan
        self._limit = limit
        self.count = 0
        self.limit_hit = False

    def __iter__(self) -> Matches:
        return self

    def __next__(self) -> Dataset:
        if self._cursor is None:
            raise StopIteration
        row = self._cursor.fetchone()
        if row is not None and self._limit is not None and self.count >= self._limit:
            self.limit_hit = True
            row = None
        if row is None:
            self.close()
            raise StopIteration
        self.count += 1
        plan = self._plan
        return respond(plan.level.value, plan.returns, plan.charset, row)

    def close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()
            self._cursor = None


def run(db: Connection, plan: Plan, limit: int | None = None, offset: int = 0) -> Matches:
    """Execute ``plan`` on ``db`` (a SELECT only): the response identifiers, lazily.

    ``limit``: yield at most this many; ``Matches.limit_hit`` says whether there
    were more (one more row is read to know it). ``offset``: skip that many matches.
    """
    sql, params = limited(plan, None if limit is None else limit + 1, offset)
    return Matches(db.execute(sql, params), plan, limit)


def limited(plan: Plan, limit: int | None, offset: int = 0) -> tuple[str, tuple[object, ...]]:
    """``plan``'s SQL and parameters, returning at most ``limit`` rows after ``offset``."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must not be negative: {limit}")
    if offset < 0:
        raise ValueError(f"offset must not be negative: {offset}")
    if limit is None and not offset:
        return plan.sql, plan.params
    count = plan.dialect.no_limit if limit is None else limit
    return f"{plan.sql} LIMIT ? OFFSET ?", (*plan.params, count, offset)
