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
from typing import Any

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


def _ready() -> bool:
    """A no-op that makes a new pool start its worker processes."""
    return True


class Decoder:
    """A pool of decoder processes, started off the loop when the pipeline needs one.

    A worker that dies (a decoder crashing on hostile input, an OOM kill) breaks a
    ``ProcessPoolExecutor`` for good, and a decoder stuck in a loop would hold its
    slot forever: both cases replace the pool. The image that broke it is answered
    as undecodable; the others in flight are tried once more on the new pool.
    """

    def __init__(self, workers: int, timeout: float) -> None:
        self._workers = workers or os.cpu_count() or 1
        self._timeout = timeout
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        context = multiprocessing.get_context("forkserver")
        pool = concurrent.futures.ProcessPoolExecutor(self._workers, mp_context=context)
        for future in [pool.submit(_ready) for _ in range(self._workers)]:
            future.result()
        log.info("decoder pool started with %d processes", self._workers)
        return pool

    async def start(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = await asyncio.to_thread(self._new_pool)
        return self._pool

    def _discard(self, pool: concurrent.futures.ProcessPoolExecutor, kill: bool) -> None:
        if self._pool is pool:
            self._pool = None
        if kill:
            # The executor has no public way to stop a busy worker.
            processes: dict[int, Any] = getattr(pool, "_processes", None) or {}
            for process in list(processes.values()):
                process.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    async def process(
        self, data: bytes, transfer_syntax: str, transcode: bool
    ) -> tuple[bytes, str]:
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            pool = await self.start()
            work = loop.run_in_executor(pool, decode_payload, data, transfer_syntax, transcode)
            try:
                return await asyncio.wait_for(work, self._timeout)
            except TimeoutError:
                log.error("a decoder ran past %.0f s; replacing the decoder pool", self._timeout)
                self._discard(pool, kill=True)
                raise DecodeError(f"decoding did not finish within {self._timeout:.0f} s") from None
            except concurrent.futures.process.BrokenProcessPool:
                log.error("a decoder process died; replacing the decoder pool")
                self._discard(pool, kill=False)
                if attempt == 2:
                    raise DecodeError("the decoder process crashed on this image") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
