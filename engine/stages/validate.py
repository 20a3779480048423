"""Validate (the first stage's first step): parse the header only, check what a store
needs, extract the index's keys.

``validate`` is plain code over records (tested without a loop). ``process`` is the
step: it validates a batch (on the loop when the spool has parsed the headers and
hashed the data already, as it does for datasets it writes as they arrive; else in a
worker thread: parsing and hashing a whole dataset is CPU work that must not hold the
event loop), sends compressed images to the decoder pool when the configuration asks
for a pixel check or transcoding, and passes every item on. Rejected items keep
flowing so the write step can quarantine their bytes and the index can count them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pydicom.config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, AllTransferSyntaxes, DeflatedExplicitVRLittleEndian

from engine import codecs, elements
from engine import digest as content_digest
from engine.attributes import ALL_KEYS, INTEGER_COLUMNS
from engine.config import IngestConfig, Transcode
from engine.model import Outcome, Received, Rejection, Validated
from engine.stages.flow import Item
from engine.storage.spool import Spooled

log = logging.getLogger(__name__)

# Scanners send values that break the letter of PS3.5 all the time (a trailing
# space in an IS, a long LO). Such values are indexed as they are; they are not a
# reason to refuse an image, and warnings must not reach the scanner as errors.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

KNOWN_SYNTAXES = frozenset(AllTransferSyntaxes)

# Pixel data and what follows it are never parsed here.
_PIXEL_TAGS = frozenset({Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009)})
_UNDEFINED_LENGTH = 0xFFFFFFFF

# PS3.5 9.1: digits and dots, components without leading zeros (tolerated here:
# some scanners write them), at most 64 characters.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX = 64

REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def is_well_formed_uid(value: str) -> bool:
    return 0 < len(value) <= UID_MAX and _UID.match(value) is not None


def _stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_TAGS


def _truncated(what: str, declared: int, present: int) -> Rejection:
    return Rejection(
        Outcome.CANNOT_UNDERSTAND,
        f"dataset is truncated: {what} declares {declared} bytes, {present} follow",
    )


# ``parse_header``'s size when only the start of a dataset is here and its length is
# not known yet (the spool parses the head while the rest arrives).
SIZE_UNKNOWN = -1


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed header, and where the pixel data's value starts and what length it declares."""

    ds: Dataset
    pixel_tag: BaseTag | None = None
    pixel_at: int = 0
    pixel_length: int = _UNDEFINED_LENGTH
    # The index's values, when ``fast_attributes`` could read them (else ``extract``).
    attributes: dict[str, Any] | None = None

    def check_size(self, size: int) -> None:
        """Reject a dataset of ``size`` bytes too short for its pixel data's declared length."""
        present = size - self.pixel_at
        declared = self.pixel_length != _UNDEFINED_LENGTH
        if self.pixel_tag is not None and declared and self.pixel_length > present:
            raise _truncated(f"element {self.pixel_tag}", self.pixel_length, present)


def parse_header(data: bytes, transfer_syntax: str, size: int | None = None) -> Header | None:
    """The dataset up to (not including) the pixel data, in the given syntax.

    Raises ``Rejection`` for an unknown syntax or bytes that do not parse,
    including a dataset cut short (pydicom reads a short value silently).

    ``size``: ``data`` is only the first part of a dataset of ``size`` bytes (or of a
    length not known yet: ``SIZE_UNKNOWN``; check the pixel data's length with
    ``Header.check_size`` once it is). Returns None if the pixel data does not start
    within ``data`` (parse the whole dataset then).
    """
    partial = size == SIZE_UNKNOWN or (size is not None and size > len(data))
    if transfer_syntax not in KNOWN_SYNTAXES:
        raise Rejection(Outcome.UNSUPPORTED_SYNTAX, f"unknown transfer syntax {transfer_syntax}")
    syntax = UID(transfer_syntax)
    pixels: list[tuple[BaseTag, int, int]] = []
    try:
        if syntax == DeflatedExplicitVRLittleEndian:
            if partial:
                return None  # a deflated stream is inflated whole
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)
        total = len(data) if not partial else size if size and size > 0 else None
        if syntax.is_little_endian and syntax != DeflatedExplicitVRLittleEndian:
            header = _walked_header(data, syntax, total, partial)
            if header is not None:
                return header
        stream = BytesIO(data)

        def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
            if not _stop_at_pixels(tag, vr, length):
                return False
            pixels.append((tag, stream.tell(), length))
            if total is not None:
                present = total - stream.tell()
                if length != _UNDEFINED_LENGTH and length > present:
                    raise _truncated(f"element {tag}", length, present)
            return True

        ds = read_dataset(
            stream,
            is_implicit_VR=syntax.is_implicit_VR,
            is_little_endian=syntax.is_little_endian,
            stop_when=stop,
        )
        if partial and not pixels:
            return None  # the header goes on past the bytes we have
        if len(ds) and stream.tell() == len(data):
            # Read to the end: only the last value (highest tag) can have been cut short.
            last = ds.get_item(max(ds.keys()))
            if (
                isinstance(last, RawDataElement)
                and last.length != _UNDEFINED_LENGTH
                and last.value is not None
                and len(last.value) < last.length
            ):
                raise _truncated(f"element {last.tag}", last.length, len(last.value))
        attributes = fast_attributes(ds, syntax)
        if attributes is None:
            # Elements are decoded lazily; decode the ones we use now, inside the try.
            _ = [ds.get(keyword) for keyword in ALL_KEYS.values()]
    except Rejection:
        if partial:
            return None  # perhaps only our cut: judge the whole dataset
        raise
    except Exception as exc:
        if partial:
            return None
        raise Rejection(Outcome.CANNOT_UNDERSTAND, f"dataset does not parse: {exc}") from exc
    if len(ds) == 0:
        raise Rejection(Outcome.CANNOT_UNDERSTAND, "empty dataset")
    if pixels and syntax != DeflatedExplicitVRLittleEndian:
        # (A deflated dataset is parsed whole, and offsets are in the inflated bytes.)
        tag, at, length = pixels[0]
        return Header(ds, tag, at, length, attributes)
    return Header(ds, attributes=attributes)


def _walked_header(data: bytes, syntax: UID, total: int | None, partial: bool) -> Header | None:
    """The fast path of ``parse_header`` (``engine/elements.py``); None: pydicom's way."""
    walked = elements.walk(data, syntax.is_implicit_VR, _WANTED_TAGS)
    if walked is None or (partial and walked.pixel_tag is None):
        return None
    attributes = attributes_from(walked.elements)
    if attributes is None:
        return None
    if walked.pixel_tag is None:
        return Header(Dataset(), attributes=attributes)
    header = Header(
        Dataset(), Tag(walked.pixel_tag), walked.pixel_at, walked.pixel_length, attributes
    )
    if total is not None:
        header.check_size(total)
    return header


def inspect_head(head: bytes, transfer_syntax: str, complete: bool) -> Header | Rejection | None:
    """The spool's early parse, on its thread, while the rest of the dataset arrives.

    ``complete``: ``head`` is the whole dataset. Returns the header, the final
    ``Rejection`` of a complete dataset, or None (judge it when it is all here).
    """
    try:
        return parse_header(head, transfer_syntax, None if complete else SIZE_UNKNOWN)
    except Rejection as rejection:
        return rejection
    except Exception:  # judged again, with the whole dataset, in the validate stage
        log.exception("early header parse failed")
        return None


def _plain(value: Any, column: str) -> Any:
    """An element value as the index stores it: text, or an integer where numeric."""
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list):
        if column in INTEGER_COLUMNS:
            value = value[0] if len(value) else None
            return _plain(value, column)
        return "\\".join(str(v) for v in value)
    if column in INTEGER_COLUMNS:
        try:
            return int(str(value).strip())
        except ValueError:
            return None
    return str(value).strip()


# -- the fast path of attribute extraction ----------------------------------------------
# pydicom converts an element on first access, looking up the character set each time:
# about 8 us per attribute, 0.2 ms per image for the index's 29, on the event loop's
# GIL. For the common case (little endian, default / Latin-1 / UTF-8 character set,
# each element in its dictionary VR) the values are read here from the raw elements,
# to the same result as ``extract``; anything else takes pydicom's way.


def _tag(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return Tag(tag)


_COLUMN_TAGS = {column: _tag(keyword) for column, keyword in ALL_KEYS.items()}
_COLUMN_VRS = {column: dictionary_VR(tag) for column, tag in _COLUMN_TAGS.items()}
_UID_COLUMNS = {column: keyword for column, keyword in ALL_KEYS.items() if keyword in REQUIRED_UIDS}
_CHARSET_TAG = Tag(0x0008, 0x0005)
_WANTED_TAGS = frozenset({*_COLUMN_TAGS.values(), _CHARSET_TAG})
# SpecificCharacterSet (as the raw text) -> Python codec for the VRs it applies to.
_SIMPLE_CHARSETS = {
    "": "latin-1",
    "ISO_IR 6": "latin-1",
    "ISO_IR 100": "latin-1",
    "ISO_IR 192": "utf-8",
}
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_TEXT_VRS = _CHARSET_VRS | {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"}
_US = struct.Struct("<H")


def fast_attributes(ds: Dataset, syntax: UID) -> dict[str, Any] | None:
    """``extract``'s result read straight from the raw elements, or None (use ``extract``)."""
    if not syntax.is_little_endian:
        return None
    raw: dict[int, tuple[str | None, bytes]] = {}
    for tag in _WANTED_TAGS:
        element = ds._dict.get(tag)
        if element is None:
            continue
        if not isinstance(element, RawDataElement):
            return None
        raw[tag] = (element.VR, element.value or b"")
    return attributes_from(raw)


def attributes_from(elements: dict[int, tuple[str | None, bytes]]) -> dict[str, Any] | None:
    """The index's values from raw (VR, value bytes) by tag, or None (pydicom's way)."""
    charset = elements.get(_CHARSET_TAG)
    charset_text = charset[1].decode("latin-1").strip(" \x00") if charset is not None else ""
    encoding = _SIMPLE_CHARSETS.get(charset_text)
    if encoding is None:
        return None
    attributes: dict[str, Any] = {}
    for column, tag in _COLUMN_TAGS.items():
        element = elements.get(tag)
        if element is None:
            attributes[column] = None
            continue
        vr = _COLUMN_VRS[column]
        if element[0] is not None and vr != element[0]:
            return None  # UN, or an unusual encoding: pydicom knows what to do
        raw = element[1]
        if vr == "US":
            attributes[column] = _US.unpack_from(raw)[0] if len(raw) >= _US.size else None
            continue
        if vr not in _TEXT_VRS:
            return None
        try:
            text = raw.decode(encoding if vr in _CHARSET_VRS else "latin-1")
        except UnicodeDecodeError:
            return None  # pydicom decodes what it can, with a warning
        values = text.rstrip(" \x00").split("\\")
        if column in INTEGER_COLUMNS:
            try:
                attributes[column] = int(values[0].strip()) if values[0].strip() else None
            except ValueError:
                return None  # pydicom's IS rules (e.g. "1.0") decide
            continue
        if column in _UID_COLUMNS and len(values) > 1:
            return None
        joined = "\\".join(value.strip() for value in values)
        attributes[column] = joined or None
    attributes["patient_id"] = attributes["patient_id"] or ""
    attributes["issuer_of_patient_id"] = attributes["issuer_of_patient_id"] or ""
    return attributes


def extract(ds: Dataset) -> dict[str, Any]:
    """The values the index keeps, by column name. Requires the UIDs to be present."""
    attributes: dict[str, Any] = {}
    for column, keyword in ALL_KEYS.items():
        attributes[column] = _plain(ds.get(keyword), column)
    # Type 2 keys: the patient is keyed on (PatientID, Issuer); empty is a valid key.
    attributes["patient_id"] = attributes["patient_id"] or ""
    attributes["issuer_of_patient_id"] = attributes["issuer_of_patient_id"] or ""
    return attributes


def check_uids(ds: Dataset, sop_class_uid: str, sop_instance_uid: str) -> None:
    """The UIDs a store needs: present, well formed, equal to the request's."""
    texts = {}
    for keyword in REQUIRED_UIDS:
        value = ds.get(keyword)
        texts[keyword] = None if value is None else str(value)
    check_uid_texts(texts, sop_class_uid, sop_instance_uid)


def check_uid_texts(
    texts: dict[str, str | None], sop_class_uid: str, sop_instance_uid: str
) -> None:
    """``check_uids`` on the UIDs' text, by keyword (None when absent)."""
    for keyword in REQUIRED_UIDS:
        text = texts[keyword]
        if text is None or text.strip() == "":
            raise Rejection(Outcome.MISSING_ATTRIBUTE, f"{keyword} is missing or empty")
        if not is_well_formed_uid(text.strip()):
            raise Rejection(Outcome.INVALID_UID, f"{keyword} {text!r} is not a valid UID")
    instance, sop_class = texts["SOPInstanceUID"], texts["SOPClassUID"]
    assert instance is not None and sop_class is not None
    if instance.strip() != sop_instance_uid:
        raise Rejection(
            Outcome.INSTANCE_MISMATCH,
            f"SOPInstanceUID {instance} differs from the request's "
            f"Affected SOP Instance UID {sop_instance_uid}",
        )
    if sop_class.strip() != sop_class_uid:
        raise Rejection(
            Outcome.SOP_CLASS_MISMATCH,
            f"SOPClassUID {sop_class} differs from the request's "
            f"Affected SOP Class UID {sop_class_uid}",
        )


def parse_complete(data: bytes, transfer_syntax: str) -> Header:
    header = parse_header(data, transfer_syntax)
    assert header is not None  # only a partial parse returns None
    return header


def _parse_spooled(spooled: Spooled, transfer_syntax: str) -> Header:
    """Use the spool's early parse, or the bytes kept in memory; read the file only for
    a header longer than those."""
    early = spooled.early
    if isinstance(early, Rejection):
        raise early
    if isinstance(early, Header):
        early.check_size(spooled.size)
        return early
    if transfer_syntax != DeflatedExplicitVRLittleEndian:
        header = parse_header(spooled.head, transfer_syntax, spooled.size)
        if header is not None:
            return header
    return parse_complete(spooled.read_dataset(), transfer_syntax)


# Longest header kept in the index for metadata queries (a CT header is 1-4 KB).
HEADER_KEPT_MAX = 64 * 1024
# Bytes before a pixel data element's value: tag, (VR, reserved,) length (PS3.5 7.1).
_ELEMENT_HEADER = {True: 8, False: 12}


def header_bytes(data: bytes, transfer_syntax: str, header: Header) -> bytes | None:
    """The dataset up to (not including) its pixel data element, from ``data`` (the whole
    dataset or its first bytes); None when that is longer than ``HEADER_KEPT_MAX``, not
    all in ``data``, or the dataset is deflated (offsets are in the inflated bytes)."""
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return None
    if header.pixel_tag is None:
        end = len(data)  # no pixel data: the whole dataset, if it is all here
    else:
        end = header.pixel_at - _ELEMENT_HEADER[UID(transfer_syntax).is_implicit_VR]
    if end > HEADER_KEPT_MAX or end > len(data) or end <= 0:
        return None
    return data[:end]


def validate(received: Received) -> Validated:
    """Header-only validation of one received instance. Raises ``Rejection``."""
    if not received.size:
        raise Rejection(Outcome.CANNOT_UNDERSTAND, "empty dataset")
    spooled = received.spooled
    if spooled is not None:
        header = _parse_spooled(spooled, received.transfer_syntax)
        digest = spooled.digest  # hashed as it arrived
        complete = spooled.size == len(spooled.head)
        kept = header_bytes(spooled.head, received.transfer_syntax, header)
        if kept is not None and header.pixel_tag is None and not complete:
            kept = None  # no pixel data and only the head here: not the whole dataset
    else:
        header = parse_complete(received.data, received.transfer_syntax)
        digest = content_digest.of(received.data)
        kept = header_bytes(received.data, received.transfer_syntax, header)
    attributes = header.attributes
    if attributes is not None:
        texts = {keyword: attributes[column] for column, keyword in _UID_COLUMNS.items()}
        check_uid_texts(texts, received.sop_class_uid, received.sop_instance_uid)
        attributes = dict(attributes)
    else:
        check_uids(header.ds, received.sop_class_uid, received.sop_instance_uid)
        attributes = extract(header.ds)
    return Validated(
        received=received,
        attributes=attributes,
        digest=digest,
        payload=received.data,
        payload_syntax=received.transfer_syntax,
        spooled=spooled,
        header=kept,
    )


def validate_batch(items: list[Item]) -> None:
    """Validate each item in place: sets ``validated`` or ``rejection``."""
    for item in items:
        try:
            item.validated = validate(item.received)
        except Rejection as rejection:
            item.reject(rejection.outcome, rejection.message)
        except Exception as exc:  # a bug must not leave a scanner hanging
            log.exception("validation failed unexpectedly for %s", item.received.sop_instance_uid)
            item.reject(Outcome.PROCESSING_FAILURE, f"internal error in validation: {exc!r}")


def _parsed_early(item: Item) -> bool:
    spooled = item.received.spooled
    return spooled is not None and spooled.early is not None


def needs_decoding(config: IngestConfig, transfer_syntax: str) -> bool:
    """Whether this item goes through the decoder pool."""
    if not codecs.is_compressed(transfer_syntax):
        return False
    return config.check_pixels or config.transcode is not Transcode.NONE


async def _decode(item: Item, config: IngestConfig, decoder: codecs.Decoder) -> None:
    validated = item.validated
    assert validated is not None
    transcode = config.transcode is Transcode.EXPLICIT_LITTLE
    if validated.spooled is not None:  # the transport spools only what needs no decoding
        spooled, validated.spooled = validated.spooled, None
        validated.payload = await asyncio.to_thread(spooled.read_dataset)
        await asyncio.to_thread(spooled.discard)
    try:
        payload, syntax = await decoder.process(
            validated.payload, validated.payload_syntax, transcode
        )
    except codecs.DecodeError as exc:
        item.reject(Outcome.CORRUPT_PIXEL_DATA, f"pixel data cannot be decoded: {exc}")
        return
    except Exception as exc:
        log.exception("decoder failed for %s", item.received.sop_instance_uid)
        item.reject(Outcome.PROCESSING_FAILURE, f"internal error in the decoder: {exc!r}")
        return
    if syntax != validated.payload_syntax:  # transcoded: keep the new dataset's header
        try:
            validated.header = header_bytes(payload, syntax, parse_complete(payload, syntax))
        except Rejection:
            validated.header = None
    validated.payload = payload
    validated.payload_syntax = syntax


async def process(batch: list[Item], config: IngestConfig, decoder: codecs.Decoder) -> None:
    """Validate a batch (the step of the pipeline's first stage)."""
    if all(_parsed_early(item) for item in batch):
        validate_batch(batch)  # what is left is a few checks: no hand-off to a thread
    else:
        await asyncio.get_running_loop().run_in_executor(None, validate_batch, batch)
    decoding = [
        _decode(item, config, decoder)
        for item in batch
        if item.validated is not None
        and item.rejection is None
        and needs_decoding(config, item.validated.payload_syntax)
    ]
    if decoding:
        await asyncio.gather(*decoding)
