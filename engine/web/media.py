"""Media types of DICOMweb (PS3.18 section 8.7): Accept negotiation and multipart bodies.

A WADO-RS request names what it accepts: ``multipart/related; type="application/dicom";
transfer-syntax=UID`` for instances, ``multipart/related; type="application/octet-stream"``
(uncompressed) or an image type (``image/jpeg``, ``image/jls``, ...) for frames. ``*`` as
the transfer syntax takes the stored one, whatever it is. Without a transfer syntax
the standard's default applies: Explicit VR Little Endian for instances and
uncompressed bytes for frames (PS3.18 8.7.3.5.2, 8.7.3.3.2).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
MULTIPART_RELATED = "multipart/related"
ANY_SYNTAX = "*"
EXPLICIT_LITTLE = str(ExplicitVRLittleEndian)
UNCOMPRESSED_SYNTAXES = frozenset({EXPLICIT_LITTLE, str(ImplicitVRLittleEndian)})

# PS3.18 table 8.7.3-5: the media type of a compressed frame, by transfer syntax.
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


class NotAcceptable(Exception):
    """Nothing the request accepts can be produced (HTTP 406)."""


@dataclass(frozen=True, slots=True)
class MediaRange:
    """One entry of an Accept header."""

    type: str  # e.g. "multipart/related", "application/dicom", "*/*"
    related_type: str | None  # multipart/related's type parameter
    transfer_syntax: str | None
    quality: float


def _parameters(text: str) -> tuple[str, dict[str, str]]:
    parts = [p.strip() for p in text.split(";")]
    params: dict[str, str] = {}
    for part in parts[1:]:
        name, _, value = part.partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    return parts[0].lower(), params


def accept_ranges(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, most preferred first (absent: ``*/*``)."""
    ranges: list[MediaRange] = []
    for entry in _split_outside_quotes(header or "*/*"):
        if not entry.strip():
            continue
        media, params = _parameters(entry)
        try:
            quality = float(params.get("q", "1"))
        except ValueError:
            quality = 1.0
        ranges.append(MediaRange(media, params.get("type"), params.get("transfer-syntax"), quality))
    return sorted(ranges, key=lambda r: -r.quality)  # stable: ties keep their order


def _split_outside_quotes(text: str) -> list[str]:
    """Split on commas, except inside quotes (a type parameter may hold one)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _choose_syntax(asked: str | None, stored: str, default: str) -> str | None:
    """The syntax to send for one media range, or None when it cannot be produced."""
    if asked is None:
        asked = default
    if asked in (ANY_SYNTAX, stored):
        return stored
    if asked in UNCOMPRESSED_SYNTAXES:
        return asked  # any stored syntax can be decompressed to these
    return None


def instance_syntax(header: str | None, stored: str) -> str:
    """The transfer syntax to send a stored instance in, for this Accept header."""
    for media in accept_ranges(header):
        if media.type in (MULTIPART_RELATED, "*/*", "multipart/*"):
            if media.related_type not in (None, DICOM, "*/*"):
                continue
        elif media.type != DICOM:
            continue
        syntax = _choose_syntax(media.transfer_syntax, stored, EXPLICIT_LITTLE)
        if syntax is not None:
            return syntax
    raise NotAcceptable(
        f"cannot send an instance stored as {stored} in any of: {header}; "
        f'ask for transfer-syntax=* or {EXPLICIT_LITTLE} (type="{DICOM}")'
    )


@dataclass(frozen=True, slots=True)
class FrameChoice:
    """How frames (or bulk data) go out: compressed as stored, or uncompressed."""

    media_type: str
    transfer_syntax: str
    multipart: bool

    @property
    def uncompressed(self) -> bool:
        return self.media_type == OCTET_STREAM


def frame_choice(header: str | None, stored: str) -> FrameChoice:
    """What to send frames (or pixel bulk data) of an instance stored as ``stored`` in."""
    compressed_type = FRAME_MEDIA_TYPES.get(stored)
    as_stored = FrameChoice(compressed_type or OCTET_STREAM, stored, True)
    uncompressed = FrameChoice(OCTET_STREAM, EXPLICIT_LITTLE, True)
    for media in accept_ranges(header):
        multipart = media.type in (MULTIPART_RELATED, "multipart/*", "*/*")
        wanted = (media.related_type or OCTET_STREAM) if multipart else media.type
        syntax = media.transfer_syntax
        if wanted == "*/*" or (wanted == OCTET_STREAM and syntax == ANY_SYNTAX):
            choice = as_stored
        elif wanted == OCTET_STREAM and syntax in (None, EXPLICIT_LITTLE):
            choice = uncompressed
        elif wanted == compressed_type and syntax in (None, ANY_SYNTAX, stored):
            choice = as_stored
        else:
            continue
        return FrameChoice(choice.media_type, choice.transfer_syntax, multipart)
    raise NotAcceptable(
        f"cannot send frames stored as {stored} in any of: {header}; "
        f'ask for type="{OCTET_STREAM}" (uncompressed) or transfer-syntax=*'
    )


class Multipart:
    """A multipart/related body written part by part (PS3.18 8.6.1.2)."""

    def __init__(self, related_type: str, transfer_syntax: str | None = None) -> None:
        self.boundary = uuid.uuid4().hex
        self.related_type = related_type
        self.transfer_syntax = transfer_syntax

    @property
    def content_type(self) -> str:
        value = f'{MULTIPART_RELATED}; type="{self.related_type}"; boundary={self.boundary}'
        if self.transfer_syntax is not None:
            value += f"; transfer-syntax={self.transfer_syntax}"
        return value

    def part_head(
        self, media_type: str, transfer_syntax: str | None = None, location: str = ""
    ) -> bytes:
        lines = [f"--{self.boundary}", f"Content-Type: {media_type}"]
        if transfer_syntax is not None:
            lines[-1] += f"; transfer-syntax={transfer_syntax}"
        if location:
            lines.append(f"Content-Location: {location}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")

    def end(self) -> bytes:
        return f"\r\n--{self.boundary}--\r\n".encode("ascii")

    def between(self) -> bytes:
        return b"\r\n"


def is_uid(text: str) -> bool:
    """A well-formed UID (PS3.5 9.1): at most 64 characters, digits and dots."""
    return 0 < len(text) <= 64 and all(c.isdigit() or c == "." for c in text) and UID(text).is_valid
