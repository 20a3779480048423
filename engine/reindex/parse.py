"""A stored file read and parsed for the index as the ingest parses what it receives
(``engine/stages/validate.py``), so that a rebuilt index holds what the ingest made."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.attributes import ALL_KEYS
from engine.model import Rejection
from engine.stages.validate import (
    REQUIRED_UIDS,
    check_uid_texts,
    extract,
    header_bytes,
    parse_complete,
    parse_header,
)
from engine.storage import files


@dataclass(frozen=True, slots=True)
class Parsed:
    """A file read and parsed as the ingest parses what it receives."""

    file: files.StoredFile
    size: int
    attributes: dict[str, Any]
    transfer_syntax: str
    header: bytes | None
    digest: str  # of the file's dataset
    # SHA-256 of the dataset, when the file's name does not carry its BLAKE3.
    legacy_digest: str | None
    source_ae: str

    @property
    def uid(self) -> str:
        return str(self.attributes["sop_instance_uid"])


def parse(root: Path, stored: files.StoredFile) -> Parsed | str:
    """One file read and parsed as the ingest does; or why it cannot be indexed."""
    path = root / stored.rel_path
    try:
        return _parse(path, stored)
    except files.NotPart10 as exc:
        return str(exc)
    except Rejection as rejection:
        return rejection.message
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    except Exception as exc:  # whatever a file holds, the others are indexed
        return f"does not parse: {exc!r}"


def parse_all(root: Path, stored: list[files.StoredFile]) -> list[Parsed | str]:
    return [parse(root, f) for f in stored]


def _parse(path: Path, stored: files.StoredFile) -> Parsed:
    opened = files.read(path)
    syntax = opened.transfer_syntax
    size = opened.size - opened.offset
    data = opened.head
    header = None if opened.complete else parse_header(data, syntax, size)
    if header is None:  # the header goes on past the first bytes, or a deflated dataset
        if not opened.complete:
            data = files.dataset_bytes(path, opened.offset)
        header = parse_complete(data, syntax)
    fast = header.attributes
    attributes = dict(fast) if fast is not None else extract(header.ds)
    texts = {kw: attributes[col] for col, kw in ALL_KEYS.items() if kw in REQUIRED_UIDS}
    # The file meta's UIDs play the request's part: the ingest wrote them from it.
    check_uid_texts(
        texts,
        opened.meta_text("MediaStorageSOPClassUID") or str(texts["SOPClassUID"] or "").strip(),
        opened.meta_text("MediaStorageSOPInstanceUID")
        or str(texts["SOPInstanceUID"] or "").strip(),
    )
    kept = header_bytes(data, syntax, header)
    if kept is not None and header.pixel_tag is None and len(data) < size:
        kept = None  # no pixel data and only the dataset's start here: not all of it
    name = files.parse_name(stored.name)
    legacy = None
    if name is not None and not opened.digest.startswith(name.digest):
        legacy = files.legacy_digest(path, opened.offset)
    return Parsed(
        file=stored,
        size=opened.size,
        attributes=attributes,
        transfer_syntax=syntax,
        header=kept,
        digest=opened.digest,
        legacy_digest=legacy,
        source_ae=opened.meta_text("SourceApplicationEntityTitle"),
    )
