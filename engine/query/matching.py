"""SQL conditions for the matching types of PS3.4 C.2.2.2, one key at a time.

Values come in as text; each condition is SQL with ``?`` parameters, never with
values in it. Several values for one key (a backslash-separated list) match when
any of them does: PS3.4 defines that for UIDs (list of UID matching) and for
ModalitiesInStudy; it is extended to every key, as most archives do.

Wildcards are the backend's case-sensitive pattern matching (SQLite's GLOB,
PostgreSQL's LIKE: ``engine/index/dialect.py``), which with a literal prefix can
use an index.

Case-insensitive person names compare ``lower()`` values; SQLite's built-in
``lower()`` folds ASCII letters only (PostgreSQL's too, on the "C" collation), so
the value is folded the same way here (``É`` and ``é`` stay different). A name
without ``=`` also matches any one component group of a stored name:
``Yamada^Tarou``, ``山田^太郎`` and ``やまだ*`` all find
``Yamada^Tarou=山田^太郎=やまだ^たろう`` (alphabetic, ideographic and phonetic groups,
as Japanese names are stored). The stored value is the whole decoded name, whatever
character set it arrived in, so the query's own character set does not matter either.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from engine.index.dialect import SQLITE, Dialect
from engine.query import ranges
from engine.query.keys import Matching
from engine.query.ranges import BadValue

WILDCARDS = ("*", "?")
UNIVERSAL = "*"
GROUP_SEPARATOR = "="
# The character after "=" (ASCII 0x3D): "name=" <= value < "name>" is "starts with name=".
_AFTER_GROUP_SEPARATOR = ">"
# SQLite's default limit on host parameters is 32766; a longer list is refused.
MAX_VALUES = 1000

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


@dataclass(frozen=True, slots=True)
class Condition:
    sql: str
    params: tuple[object, ...]


def is_universal(values: list[str]) -> bool:
    """Universal matching: no value, or ``*`` (PS3.4 C.2.2.2.3, C.2.2.2.4)."""
    return not values or UNIVERSAL in values


def has_wildcard(value: str) -> bool:
    return any(w in value for w in WILDCARDS)


def condition(
    matching: Matching, expr: str, values: list[str], *, fuzzy: bool, dialect: Dialect = SQLITE
) -> Condition:
    """The condition on the SQL expression ``expr`` for a key's non-universal ``values``.

    Raises BadValue for a value that cannot be matched as its VR requires.
    """
    if len(values) > MAX_VALUES:
        raise BadValue(f"{len(values)} values; at most {MAX_VALUES} are supported")
    if matching is Matching.UID:
        return _uids(expr, values)
    if matching is Matching.RETURN_ONLY:
        raise ValueError("a return key is not matched")
    parts = [_one(matching, expr, value, fuzzy, dialect) for value in values]
    if len(parts) == 1:
        return parts[0]
    return Condition(
        "(" + " OR ".join(p.sql for p in parts) + ")",
        tuple(param for p in parts for param in p.params),
    )


def _one(matching: Matching, expr: str, value: str, fuzzy: bool, dialect: Dialect) -> Condition:
    if matching is Matching.NAME:
        return _name(expr, value, fuzzy, dialect)
    if matching is Matching.TEXT:
        if has_wildcard(value):
            return Condition(dialect.wildcard(expr), (dialect.pattern(value),))
        return Condition(f"{expr} = ?", (value,))
    if has_wildcard(value):
        raise BadValue(f"{value!r}: wildcards are for text values only")
    if matching is Matching.INTEGER:
        try:
            return Condition(f"{expr} = ?", (int(value),))
        except ValueError:
            raise BadValue(f"{value!r} is not an integer") from None
    vr = _DATE_VRS[matching]
    if not ranges.is_range(value):
        return Condition(f"{expr} = ?", (ranges.normalise(vr, value),))
    low, high = ranges.bounds(vr, value)
    if low is None:
        return Condition(f"{expr} <= ?", (high,))
    if high is None:
        return Condition(f"{expr} >= ?", (low,))
    return Condition(f"{expr} BETWEEN ? AND ?", (low, high))


_DATE_VRS = {Matching.DATE: "DA", Matching.TIME: "TM", Matching.DATETIME: "DT"}


def _uids(expr: str, values: list[str]) -> Condition:
    for value in values:
        if has_wildcard(value):
            raise BadValue(f"{value!r}: wildcards are not allowed in UIDs (PS3.4 C.2.2.2.4)")
    unique = list(dict.fromkeys(values))
    if len(unique) == 1:
        return Condition(f"{expr} = ?", (unique[0],))
    marks = ", ".join("?" for _ in unique)
    return Condition(f"{expr} IN ({marks})", tuple(unique))


def _name(expr: str, value: str, fuzzy: bool, dialect: Dialect) -> Condition:
    if fuzzy:
        expr, value = f"lower({expr})", value.translate(_ASCII_LOWER)
    groups = GROUP_SEPARATOR not in value  # also match any one component group
    sep = GROUP_SEPARATOR
    like = dialect.wildcard(expr)
    if has_wildcard(value):
        if groups:
            patterns = (value, f"{value}{sep}*", f"*{sep}{value}{sep}*", f"*{sep}{value}")
            return Condition(
                f"({like} OR {like} OR {like} OR {like})",
                tuple(dialect.pattern(p) for p in patterns),
            )
        return Condition(like, (dialect.pattern(value),))
    if groups:
        # The first group as a range on the text, so that the patients_name index
        # serves the common case; the later groups by pattern. The value's own
        # characters are literal: only the added "*" is a wildcard.
        literal = dialect.pattern(value)
        star = dialect.pattern("*")
        return Condition(
            f"({expr} = ? OR ({expr} >= ? AND {expr} < ?) OR {like} OR {like})",
            (
                value,
                value + sep,
                value + _AFTER_GROUP_SEPARATOR,
                f"{star}{sep}{literal}{sep}{star}",
                f"{star}{sep}{literal}",
            ),
        )
    return Condition(f"{expr} = ?", (value,))
