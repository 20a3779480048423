"""QIDO-RS (PS3.18 section 10.6): searches for studies, series and instances.

A search's query parameters become a C-FIND identifier, and the same planner answers
it (``engine/query/find.py``): the matching rules (wildcards, date ranges, UID lists,
person names) are written once for DIMSE and DICOMweb. Differences from C-FIND:
searches are relational (``/series`` needs no study), the response carries the
default attributes of PS3.18 table 10.6.3-3 and 10.6.3-4 plus those named by
``includefield``, and ``limit`` / ``offset`` page through the matches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from engine.config import Config
from engine.index.reads import Reads, reads_of
from engine.query.find import Model, QueryError, limited, plan
from engine.query.keys import KEYS
from engine.query.levels import Level
from engine.query.response import respond_json

log = logging.getLogger(__name__)

RETRIEVE_URL = Tag(0x0008, 0x1190)
INSTANCE_AVAILABILITY = Tag(0x0008, 0x0056)
_CONTROL = frozenset({"limit", "offset", "fuzzymatching", "includefield"})
# Query parameters some viewers add that are not attributes; ignored.
_IGNORED = frozenset({"_", "callback"})

# PS3.18 tables 10.6.3-3 (study), 10.6.3-4 (series), 10.6.3-5 (instance): what a
# search returns without includefield (those the index knows; the rest are left out).
_DEFAULTS = {
    Level.STUDY: (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    Level.SERIES: (
        "Modality",
        "SeriesDescription",
        "SeriesNumber",
        "SeriesInstanceUID",
        "SeriesDate",
        "SeriesTime",
        "NumberOfSeriesRelatedInstances",
        "StudyInstanceUID",
    ),
    Level.IMAGE: (
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "SeriesInstanceUID",
        "StudyInstanceUID",
    ),
}
# A search at a level without the study in its path also returns the study's
# attributes (PS3.18 10.6.3.3.1), and an instance search the series'.
_ABOVE = {
    Level.STUDY: (),
    Level.SERIES: (Level.STUDY,),
    Level.IMAGE: (Level.STUDY, Level.SERIES),
}


class BadQuery(Exception):
    """A search that cannot be run as asked (HTTP 400)."""


@dataclass(frozen=True, slots=True)
class Search:
    """One QIDO-RS request, parsed."""

    level: Level
    study: str | None  # from the path
    series: str | None
    filters: tuple[tuple[BaseTag, str], ...]
    include: tuple[BaseTag, ...]
    include_all: bool
    limit: int
    offset: int
    fuzzy: bool


def _tag_of(name: str) -> BaseTag:
    """An attribute named by keyword or by 8 hex digits; BadQuery otherwise."""
    text = name.strip()
    if len(text) == 8 and all(c in "0123456789abcdefABCDEF" for c in text):
        tag = Tag(int(text, 16))
        if dictionary_has_tag(tag):
            return tag
    else:
        number = tag_for_keyword(text)
        if number is not None:
            return Tag(number)
    if "." in text:
        raise BadQuery(f"sequence attribute paths are not supported in searches: {name!r}")
    raise BadQuery(f"unknown attribute {name!r}: use a DICOM keyword or 8 hex digits")


def _count(params: dict[str, str], name: str, default: int) -> int:
    text = params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadQuery(f"{name} must be a whole number, not {text!r}") from None
    if value < 0:
        raise BadQuery(f"{name} must not be negative, not {value}")
    return value


def parse(
    level: Level,
    study: str | None,
    series: str | None,
    query: Iterable[tuple[str, str]],
    max_results: int,
) -> Search:
    """Read a search's query parameters; raises BadQuery with a readable message."""
    pairs = list(query)
    controls = {name.lower(): value for name, value in pairs if name.lower() in _CONTROL}
    filters: list[tuple[BaseTag, str]] = []
    include: list[BaseTag] = []
    include_all = False
    for name, value in pairs:
        lowered = name.lower()
        if lowered == "includefield":
            for field in value.split(","):
                if field.strip().lower() == "all":
                    include_all = True
                elif field.strip():
                    include.append(_tag_of(field))
        elif lowered not in _CONTROL and name not in _IGNORED:
            filters.append((_tag_of(name), value))
    limit = _count(controls, "limit", max_results)
    if limit == 0 or limit > max_results:
        limit = max_results
    fuzzy = controls.get("fuzzymatching", "false").strip().lower() == "true"
    return Search(
        level,
        study,
        series,
        tuple(filters),
        tuple(include),
        include_all,
        limit,
        _count(controls, "offset", 0),
        fuzzy,
    )


def _element(tag: BaseTag, value: str) -> DataElement:
    vr = dictionary_VR(tag)
    if vr == "UI":
        value = value.replace(",", "\\")  # QIDO-RS lists UIDs with commas
    return DataElement(tag, vr, value)


def identifier(search: Search) -> Dataset:
    """The C-FIND identifier the search stands for."""
    ds = Dataset()
    ds.QueryRetrieveLevel = search.level.value
    keywords = list(_DEFAULTS[search.level])
    for above in _ABOVE[search.level]:
        keywords.extend(k for k in _DEFAULTS[above] if k not in keywords)
    wanted: list[BaseTag] = [_tag_of(k) for k in keywords]
    wanted.extend(search.include)
    if search.include_all:
        wanted.extend(key.tag for key in KEYS.values() if key.level.rank <= search.level.rank)
    for tag in wanted:
        if tag not in ds:
            ds.add(DataElement(tag, dictionary_VR(tag), None))
    for tag, value in search.filters:
        ds.add(_element(tag, value))
    if search.study is not None:
        ds.StudyInstanceUID = search.study
    if search.series is not None:
        ds.SeriesInstanceUID = search.series
    return ds


def _retrieve_url(base: str, level: Level, result: dict[str, Any]) -> str | None:
    def uid(keyword: str) -> str | None:
        element = result.get(f"{tag_for_keyword(keyword):08X}", {})
        values = element.get("Value")
        return str(values[0]) if values else None

    study = uid("StudyInstanceUID")
    if study is None:
        return None
    url = f"{base}/studies/{study}"
    if level is Level.STUDY:
        return url
    series = uid("SeriesInstanceUID")
    if series is None:
        return None
    url += f"/series/{series}"
    if level is Level.SERIES:
        return url
    instance = uid("SOPInstanceUID")
    return f"{url}/instances/{instance}" if instance else None


def run_search(
    search: Search, index: Reads | Path, config: Config, base_url: str
) -> tuple[list[dict[str, Any]], bool]:
    """The matches as DICOM JSON objects, and whether more are left past the limit.

    Blocking (run it in a worker thread). Raises BadQuery, or QueryError for a
    matching value that cannot be understood.
    """
    reads = reads_of(index)
    try:
        query = plan(
            Model.STUDY_ROOT,
            identifier(search),
            fuzzy_names=search.fuzzy or config.query.case_insensitive_names,
            relational=True,
            dialect=reads.dialect,
        )
    except QueryError as exc:
        raise BadQuery(exc.message) from exc
    sql, params = limited(query, search.limit + 1, search.offset)
    with reads.connect() as db:
        rows = db.execute(sql, params).fetchall()
    more = len(rows) > search.limit
    results = []
    for row in rows[: search.limit]:
        result = respond_json(query.returns, row)
        url = _retrieve_url(base_url, search.level, result)
        if url is not None:
            result[f"{RETRIEVE_URL:08X}"] = {"vr": "UR", "Value": [url]}
        result[f"{INSTANCE_AVAILABILITY:08X}"] = {"vr": "CS", "Value": ["ONLINE"]}
        results.append(dict(sorted(result.items())))
    log.debug(
        "QIDO-RS %s: %d matches%s", search.level.value, len(results), " (more)" if more else ""
    )
    return results, more


def keyword_or_tag(tag: BaseTag) -> str:
    """For messages: an attribute's keyword, or its tag."""
    return keyword_for_tag(tag) or f"{tag:08X}"
