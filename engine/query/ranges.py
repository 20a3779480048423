"""Date and time matching values (DA, TM, DT): validation, single values and ranges.

The index stores dates and times as the text received, so a range is a pair of
string comparisons (which uses ``studies_date``). That is exact when both sides
have the same form: a bound given with less precision is widened to the whole
period it names (``-10`` for a TM means "up to 10:59:59.999999", ``2024`` for a
DT "from the first instant of 2024"), as PS3.4 C.2.2.2.5 reads for partial
values. Stored values shorter than the standard form (a TM of "1010") compare
as text; such values are rare and compare as if they were followed by nothing.

UTC offsets in DT values are not supported (no index column is a DT).
"""

from __future__ import annotations

import re
from datetime import datetime


class BadValue(ValueError):
    """A matching value that cannot be understood (malformed date, time, range ...)."""


_DA = re.compile(r"\d{8}")
_TM = re.compile(r"(?P<h>\d\d)(?:(?P<m>\d\d)(?:(?P<s>\d\d)(?:\.\d{1,6})?)?)?")
_DT = re.compile(r"\d{4}(?:\d\d(?:\d\d(?:\d\d(?:\d\d(?:\d\d(?:\.\d{1,6})?)?)?)?)?)?")
_HOURS, _MINUTES, _SECONDS = 24, 60, 61  # 60: a leap second

# Padding of a partial value to its first (floor) and last (ceiling) instant.
_FLOOR = {"DA": "", "TM": "000000", "DT": "00000101000000"}
_CEILING = {"DA": "", "TM": "235959", "DT": "99991231235959"}
_FRACTION_DIGITS = 6
RANGE_SEPARATOR = "-"


def normalise(vr: str, value: str) -> str:
    """A DA, TM or DT value in its standard form; raises BadValue if malformed.

    Tolerates the ACR-NEMA forms ``YYYY.MM.DD`` and ``HH:MM:SS``.
    """
    if vr == "DA":
        text = value.replace(".", "")
        if _DA.fullmatch(text) is None or not _valid_date(text):
            raise BadValue(f"{value!r} is not a date (YYYYMMDD)")
        return text
    if vr == "TM":
        text = value.replace(":", "")
        found = _TM.fullmatch(text)
        if found is None or not _valid_time(found["h"], found["m"], found["s"]):
            raise BadValue(f"{value!r} is not a time (HHMMSS.FFFFFF)")
        return text
    if vr == "DT":
        found = _DT.fullmatch(value)
        digits = value.partition(".")[0]
        padded = digits + _FLOOR["DT"][len(digits) :]
        if (
            found is None
            or not _valid_date(padded[:8])
            or not _valid_time(padded[8:10], padded[10:12], padded[12:14])
        ):
            raise BadValue(f"{value!r} is not a date and time (YYYYMMDDHHMMSS.FFFFFF)")
        return value
    raise ValueError(f"not a date or time VR: {vr}")


def _valid_date(text: str) -> bool:
    try:
        datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return False
    return True


def _valid_time(hours: str, minutes: str | None, seconds: str | None) -> bool:
    return (
        int(hours) < _HOURS
        and (not minutes or int(minutes) < _MINUTES)
        and (not seconds or int(seconds) < _SECONDS)
    )


def floor(vr: str, value: str) -> str:
    """The first instant ``value`` names, in the form the index compares."""
    digits, dot, _ = value.partition(".")
    return value if dot else digits + _FLOOR[vr][len(digits) :]


def ceiling(vr: str, value: str) -> str:
    """The last instant ``value`` names, in the form the index compares."""
    if vr == "DA":
        return value
    digits, _, fraction = value.partition(".")
    return f"{digits}{_CEILING[vr][len(digits) :]}.{fraction.ljust(_FRACTION_DIGITS, '9')}"


def is_range(value: str) -> bool:
    return RANGE_SEPARATOR in value


def bounds(vr: str, value: str) -> tuple[str | None, str | None]:
    """A range ``A-B``, ``-B`` or ``A-`` as (lowest, highest) inclusive; None: open."""
    if value.count(RANGE_SEPARATOR) != 1:
        raise BadValue(f"{value!r} is not a range (A-B, -B or A-)")
    start, _, end = (part.strip() for part in value.partition(RANGE_SEPARATOR))
    if not start and not end:
        raise BadValue(f"{value!r} is a range without bounds")
    low = floor(vr, normalise(vr, start)) if start else None
    high = ceiling(vr, normalise(vr, end)) if end else None
    if low is not None and high is not None and low > high:
        raise BadValue(f"{value!r} is a range that ends before it starts")
    return low, high
