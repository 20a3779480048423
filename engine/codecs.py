"""Pixel data decoding with pylibjpeg (through pydicom), in a process pool.

The event loop never decodes: a JPEG 2000 CT slice takes tens of milliseconds of
CPU. ``Decoder`` owns a ``ProcessPoolExecutor`` (forkserver, so the workers do
not inherit the server's threads and sockets); ``decode_payload`` is the work
each worker does on one dataset.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
from io import BytesIO

from pydicom.dataset import FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

log = logging.getLogger(__name__)

# JPEG, JPEG-LS and JPEG 2000 codestreams all end with the marker FFD9 (EOI, EOC).
# libjpeg decodes a JPEG or JPEG-LS stream that is cut short without complaint
# (the missing rows come out grey), so the check looks for the marker itself.
_END_MARKER = b"\xff\xd9"
_MARKER_ENDED = frozenset(
    [*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes]
)


class DecodeError(Exception):
    """The pixel data of a dataset cannot be decoded; the message is the decoder's."""


def is_compressed(transfer_syntax: str) -> bool:
    """JPEG-family, RLE and other encapsulated syntaxes (not deflate, which is whole-dataset)."""
    try:
        return bool(UID(transfer_syntax).is_compressed)
    except ValueError:
        return False


def check_end_markers(encapsulated: bytes, count: int) -> None:
    """Raise ``DecodeError`` when a frame's codestream lacks its end marker (truncated).

    Padding after the marker (0x00 to an even length, or 0xFF fill bytes) is allowed.
    """
    for number, frame in enumerate(generate_frames(encapsulated, number_of_frames=count), 1):
        if not frame.rstrip(b"\x00\xff").endswith(_END_MARKER):
            raise DecodeError(
                f"frame {number} of {count} is truncated: no end-of-image marker (FFD9)"
            )


def decode_payload(data: bytes, transfer_syntax: str, transcode: bool) -> tuple[bytes, str]:
    """Decode every frame; return the dataset to store and its transfer syntax.

    With ``transcode`` the result is the dataset decompressed to Explicit VR
    Little Endian (same SOP Instance UID); without, the input unchanged.
    Raises ``DecodeError`` when the pixel data is corrupt or truncated.
    """
    syntax = UID(transfer_syntax)
    ds = read_dataset(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    if "PixelData" not in ds:
        return data, transfer_syntax
    try:
        encapsulated = ds.PixelData
        if transcode:
            ds.decompress(generate_instance_uid=False)
        else:
            ds.pixel_array  # noqa: B018 - decoding all frames is the check
        # After the decoder, so that its own message is the one reported when it fails.
        if syntax in _MARKER_ENDED:
            check_end_markers(encapsulated, int(ds.get("NumberOfFrames") or 1))
        if not transcode:
            return data, transfer_syntax
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"{type(exc).__name__}: {exc}") from exc
    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = False
    del ds.file_meta
    write_dataset(out, ds)
    return out.getvalue(), ExplicitVRLittleEndian


class Decoder:
    """A pool of decoder processes, started lazily at the first compressed image."""

    def __init__(self, workers: int) -> None:
        self._workers = workers or os.cpu_count() or 1
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    async def process(
        self, data: bytes, transfer_syntax: str, transcode: bool
    ) -> tuple[bytes, str]:
        if self._pool is None:
            context = multiprocessing.get_context("forkserver")
            self._pool = concurrent.futures.ProcessPoolExecutor(self._workers, mp_context=context)
            log.info("decoder pool started with %d processes", self._workers)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, decode_payload, data, transfer_syntax, transcode
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
