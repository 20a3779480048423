"""Response identifiers: the request's keys, filled with one result row.

Values go out as stored (dates, times and names as received; multi-valued text
joined with backslashes becomes a multi-valued element again). Integers stored
by the index are written in the VR's form: an IS as the integer's text.

The stored text is the decoded Python string, so a response is free to choose its
encoding: one with a non-ASCII value is sent as UTF-8 (``ISO_IR 192``); an ASCII
one as the request's character set when it named one (ASCII is valid in all),
else without SpecificCharacterSet (the default repertoire).

Values are not validated against their VR here: the index keeps what scanners
sent, and a long or odd value must not stop a query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import config
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

UTF8 = "ISO_IR 192"
QUERY_RETRIEVE_LEVEL = Tag(0x0008, 0x0052)
SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)
_BINARY_INTEGER_VRS = frozenset({"US", "UL", "SS", "SL", "UV", "SV"})


@dataclass(frozen=True, slots=True)
class ReturnKey:
    """One key of the response: its tag and VR, and where its value is in a result row."""

    tag: BaseTag
    vr: str
    column: int | None  # None: the index does not know it; it is returned empty


def _value(stored: Any, vr: str) -> Any:
    if stored is None or stored == "" or vr == "SQ":
        return empty_value_for_VR(vr)
    if vr in _BINARY_INTEGER_VRS:
        try:
            return int(stored)
        except ValueError:
            return empty_value_for_VR(vr)
    return str(stored)  # an IS as the integer's text


_JSON_INTEGER_VRS = _BINARY_INTEGER_VRS | {"IS"}
_JSON_NUMBER_VRS = frozenset({"DS", "FL", "FD"})


def _json_value(stored: Any, vr: str) -> list[Any] | None:
    """A stored value as a DICOM JSON "Value" list (PS3.18 F.2.3); None if empty."""
    if stored is None or stored == "" or vr == "SQ":
        return None
    texts = str(stored).split("\\")
    try:
        if vr in _JSON_INTEGER_VRS:
            return [int(text) if text.strip() else None for text in texts]
        if vr in _JSON_NUMBER_VRS:
            return [float(text) if text.strip() else None for text in texts]
    except ValueError:
        return [text.strip() for text in texts]  # as received: never stop a query
    if vr == "PN":
        return [_person_name(text) for text in texts]
    return [text if text else None for text in texts]


_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def _person_name(text: str) -> dict[str, str]:
    return {group: part for group, part in zip(_PN_GROUPS, text.split("="), strict=False) if part}


def respond_json(returns: Sequence[ReturnKey], row: Sequence[Any]) -> dict[str, Any]:
    """The DICOM JSON object (PS3.18 annex F) of one result row, for QIDO-RS."""
    result: dict[str, Any] = {}
    for key in returns:
        element: dict[str, Any] = {"vr": key.vr}
        value = _json_value(row[key.column], key.vr) if key.column is not None else None
        if value is not None:
            element["Value"] = value
        result[f"{key.tag:08X}"] = element
    return result


def respond(
    level: str, returns: Sequence[ReturnKey], charset: str | None, row: Sequence[Any]
) -> Dataset:
    """The response identifier for one result row."""
    ds = Dataset()
    ascii_only = True
    for key in returns:
        stored = row[key.column] if key.column is not None else None
        if isinstance(stored, str) and not stored.isascii():
            ascii_only = False
        ds.add(DataElement(key.tag, key.vr, _value(stored, key.vr), validation_mode=config.IGNORE))
    ds.add(DataElement(QUERY_RETRIEVE_LEVEL, "CS", level))
    if not ascii_only:
        ds.add(DataElement(SPECIFIC_CHARACTER_SET, "CS", UTF8))
    elif charset:
        ds.add(DataElement(SPECIFIC_CHARACTER_SET, "CS", charset, validation_mode=config.IGNORE))
    return ds
