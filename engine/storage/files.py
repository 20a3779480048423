"""The instance files of a storage folder, as ``reindex`` and ``verify`` see them.

``walk`` lists every file of the folder except the engine's own entries: every name
that starts with a dot, at any depth (``.incoming``, ``.journal``, ``.quarantine``,
``.lock``, ``.clean-shutdown``; the engine never gives an instance file or a shard
folder such a name, and NAS snapshots or ``.nfs*`` files are not instances either),
and the quarantine folder or index when the configuration puts them inside it.

``read`` reads one Part 10 file in a single pass: its file meta information, the first
bytes of its dataset (to parse the header from) and the content digest of the whole
dataset (``engine/digest.py``), without holding a large file in memory.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.filereader import read_dataset

from engine import digest, elements
from engine.storage import part10
from engine.storage.area import DIGEST_IN_NAME, SUFFIX

# Bytes read at a time; the first read also holds the file meta and the dataset's header
# (a CT header is 1-4 KB; a longer one makes the caller read the dataset whole).
CHUNK = 1024 * 1024
HIDDEN = "."
# <SOPInstanceUID>.<first 16 hex digits of the digest>[.<node>].dcm (StorageArea.instance_path)
_NAME = re.compile(
    rf"^(?P<uid>[0-9.]+)\.(?P<digest>[0-9a-f]{{{DIGEST_IN_NAME}}})"
    rf"(?:\.(?P<node>[A-Za-z][A-Za-z0-9_-]*))?{re.escape(SUFFIX)}$"
)


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file of the storage folder: its path relative to the folder, size and mtime."""

    rel_path: str
    size: int
    mtime: float

    @property
    def folder(self) -> str:
        return self.rel_path.rpartition("/")[0]

    @property
    def name(self) -> str:
        return self.rel_path.rpartition("/")[2]


@dataclass(frozen=True, slots=True)
class Name:
    """What the engine's file name says: the SOP Instance UID, the digest's start, and the
    node that wrote it ("" for a single engine)."""

    uid: str
    digest: str
    node: str = ""


def parse_name(name: str) -> Name | None:
    """The parts of an instance file's name, or None for a name the engine does not give."""
    match = _NAME.match(name)
    return Name(match["uid"], match["digest"], match["node"] or "") if match else None


def walk(root: Path, skip: Collection[Path] = ()) -> Iterator[StoredFile]:
    """Every file under ``root`` but the engine's own, in path order.

    ``skip``: absolute paths of files or folders left out too (a quarantine folder or
    an index placed inside the storage folder). Symbolic links to folders are not
    followed. Raises ``OSError`` when ``root`` cannot be read; a sub-folder that
    cannot be read is left out (a caller comparing with the index sees its files as
    missing).
    """
    skipped = {os.path.abspath(p) for p in skip}
    stack = [(str(root), "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name, reverse=True)
        except OSError:
            if not prefix:
                raise
            continue
        files: list[StoredFile] = []
        for entry in entries:
            if entry.name.startswith(HIDDEN) or os.path.abspath(entry.path) in skipped:
                continue
            rel = f"{prefix}{entry.name}"
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, f"{rel}/"))
                elif entry.is_file():
                    stat = entry.stat()
                    files.append(StoredFile(rel, stat.st_size, stat.st_mtime))
            except OSError:
                continue  # removed meanwhile
        # Depth first, names in order: the folders popped next are this one's first.
        yield from reversed(files)


# The file meta elements read (PS3.10 table 7.1-1), by keyword.
META_TAGS = {
    0x00020002: "MediaStorageSOPClassUID",
    0x00020003: "MediaStorageSOPInstanceUID",
    0x00020010: "TransferSyntaxUID",
    0x00020016: "SourceApplicationEntityTitle",
}
_WANTED_META = frozenset(META_TAGS)


@dataclass(frozen=True, slots=True)
class Part10File:
    """One instance file read through: what its meta says, its dataset's start and digest."""

    meta: dict[str, str]  # the ``META_TAGS`` present, as text
    size: int  # bytes of the whole file
    offset: int  # where the dataset starts
    head: bytes  # the dataset's first bytes (all of it when ``complete``)
    digest: str  # of the dataset (after the Part 10 header), as the index keeps it

    @property
    def complete(self) -> bool:
        return self.offset + len(self.head) == self.size

    @property
    def transfer_syntax(self) -> str:
        return self.meta_text("TransferSyntaxUID")

    def meta_text(self, keyword: str) -> str:
        return self.meta.get(keyword, "")


class NotPart10(Exception):
    """The file is not a DICOM Part 10 file as the engine writes them."""


def read(path: Path) -> Part10File:
    """Read ``path`` through once. Raises ``OSError``, or ``NotPart10`` with the reason."""
    hasher = digest.hasher()
    with open(path, "rb", buffering=0) as fh:
        first = fh.read(CHUNK)
        offset, meta = _meta(first)
        head = first[offset:]
        hasher.update(head)
        size = len(first)
        while chunk := fh.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return Part10File(meta, size, offset, head, hasher.hexdigest())


def _meta(first: bytes) -> tuple[int, dict[str, str]]:
    try:
        offset = part10.dataset_offset(first)
    except (ValueError, struct.error) as exc:
        raise NotPart10(f"not a DICOM Part 10 file as the engine writes them ({exc})") from None
    if offset > len(first):
        raise NotPart10("its file meta information is longer than the file or implausible")
    group = first[len(part10.PREAMBLE) : offset]
    walked = elements.walk(group, implicit=False, wanted=_WANTED_META)
    if walked is not None:
        raw = {tag: value for tag, (_, value) in walked.elements.items()}
        return offset, {
            META_TAGS[tag]: value.decode("ascii", "replace").strip(" \x00")
            for tag, value in raw.items()
        }
    try:  # not for the fast path: pydicom reads it, or says what is wrong
        ds = read_dataset(BytesIO(group), is_implicit_VR=False, is_little_endian=True)
        values = {keyword: ds.get(keyword) for keyword in META_TAGS.values()}
    except Exception as exc:
        raise NotPart10(f"its file meta information does not parse ({exc})") from None
    return offset, {k: str(v).strip(" \x00") for k, v in values.items() if v is not None}


def dataset_bytes(path: Path, offset: int) -> bytes:
    """The whole dataset of a file (for a header longer than ``Part10File.head``)."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read()


def legacy_digest(path: Path, offset: int) -> str:
    """SHA-256 of the dataset: the digest indexes kept before BLAKE3 (``engine/digest.py``)."""
    hasher = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        while chunk := fh.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()
