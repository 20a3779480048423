"""The DICOM listener the engine runs, by ``[dicom] transport``; one small interface."""

from __future__ import annotations

import asyncio
from typing import Protocol

from engine.certificates import TlsPort
from engine.codecs import Decoder
from engine.config import DicomConfig, IngestConfig, TransportKind
from engine.dicom.qr import Decompressor, QueryEngine, QueryService
from engine.dicom.scp import StoreSCP
from engine.dicom.server import NativeServer
from engine.dicom.services import Services
from engine.metrics import Metrics
from engine.stages.receive import Receiver
from engine.stages.validate import needs_decoding
from engine.storage.spool import Spooler


class Listener(Protocol):
    @property
    def port(self) -> int: ...
    async def start(self) -> None: ...
    async def stop(self, grace: float) -> None: ...


class ThreadedListener:
    """pynetdicom's threaded server; its blocking calls run off the loop."""

    def __init__(
        self,
        config: DicomConfig,
        receiver: Receiver,
        metrics: Metrics,
        query: QueryEngine | None = None,
        decoder: Decoder | None = None,
        tls: TlsPort | None = None,
    ) -> None:
        decompress = Decompressor(decoder, asyncio.get_running_loop()) if decoder else None
        self.scp = StoreSCP(config, receiver, metrics, query, decompress, tls)

    @property
    def port(self) -> int:
        return self.scp.port

    async def start(self) -> None:
        await asyncio.to_thread(self.scp.start)

    async def stop(self, grace: float) -> None:
        await asyncio.to_thread(self.scp.stop, grace)


def make_listener(
    dicom: DicomConfig,
    ingest: IngestConfig,
    receiver: Receiver,
    spooler: Spooler | None = None,
    query: QueryEngine | None = None,
    decoder: Decoder | None = None,
    *,
    metrics: Metrics,
    tls: TlsPort | None = None,
) -> Listener:
    """The listener for ``dicom.transport``. The native one writes C-STORE datasets to
    ``spooler`` as they arrive, except those the pipeline must decode (held in memory).
    Both count their associations in ``metrics``; with ``tls``, both also listen on a
    TLS port."""
    if dicom.transport is TransportKind.NATIVE:
        services = Services(
            receiver,
            ingest.store_timeout,
            spooler,
            lambda transfer_syntax: not needs_decoding(ingest, transfer_syntax),
            QueryService(query, dicom.peers, dicom.ae_title, decoder) if query else None,
        )
        return NativeServer(dicom, services, metrics, tls)
    return ThreadedListener(dicom, receiver, metrics, query, decoder, tls)
