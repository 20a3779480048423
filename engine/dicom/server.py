"""The native DICOM listener: ``loop.create_server`` with one ``Association`` per connection.

It owns what outlives one connection: the acceptor's negotiation settings, the
count of open associations (beyond ``maximum_associations`` a request is refused
as transient, "local limit exceeded"), and the tasks that serve requests, so a
shutdown can wait for every answer owed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from pydicom.uid import AllTransferSyntaxes

from engine.config import DicomConfig
from engine.dicom import acse
from engine.dicom.association import Association
from engine.dicom.qr import QUERY_RETRIEVE_CLASSES
from engine.dicom.services import Services
from engine.metrics import Metrics
from engine.storage.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = logging.getLogger(__name__)

SHUTDOWN_POLL = 0.05
BACKLOG = 256
# A PDU may carry at most our advertised maximum; 0 ("unlimited") still gets a bound.
UNLIMITED_PDU_BODY = 64 * 1024 * 1024


class NativeServer:
    def __init__(self, config: DicomConfig, services: Services, metrics: Metrics) -> None:
        self.config = config
        self.services = services
        # Associations count themselves: accepted and active in ``Association._ae7`` and
        # ``connection_lost``, refused in ``_ae8``.
        self.metrics = metrics
        self.settings = acse.AcceptorSettings(
            ae_title=config.ae_title,
            max_pdu_length=config.maximum_pdu_size,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version_name=IMPLEMENTATION_VERSION_NAME,
            transfer_syntaxes=frozenset(str(uid) for uid in AllTransferSyntaxes),
            accepts_abstract=lambda uid: (
                acse.storage_like(uid)
                or (services.query is not None and uid in QUERY_RETRIEVE_CLASSES)
            ),
        )
        self.max_pdu_body = config.maximum_pdu_size or UNLIMITED_PDU_BODY
        self.acse_timeout = config.acse_timeout
        self.network_timeout = config.network_timeout
        self.dimse_timeout = config.dimse_timeout
        self.receive_buffer = config.receive_buffer
        self.associations: set[Association] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Association(self),
            self.config.host,
            self.config.port,
            reuse_address=True,
            backlog=BACKLOG,
        )
        log.info(
            "DICOM AE %s listening on %s:%d (native transport, up to %d associations)",
            self.config.ae_title,
            self.config.host,
            self.port,
            self.config.maximum_associations,
        )

    def refusal(self, request: acse.AssociateRequest) -> tuple[bytes, str] | None:
        """The A-ASSOCIATE-RJ to send, with the reason for the log, or None to accept."""
        if len(self.associations) > self.config.maximum_associations:
            return (
                acse.encode_associate_rj(
                    acse.RejectResult.TRANSIENT,
                    acse.RejectSource.SERVICE_PROVIDER_PRESENTATION,
                    acse.PresentationRejectReason.LOCAL_LIMIT_EXCEEDED,
                ),
                f"more than {self.config.maximum_associations} associations",
            )
        if self.config.require_called_ae_title and request.called_ae != self.config.ae_title:
            return (
                acse.encode_associate_rj(
                    acse.RejectResult.PERMANENT,
                    acse.RejectSource.SERVICE_USER,
                    acse.RejectReason.CALLED_AE_NOT_RECOGNIZED,
                ),
                f"called AE title {request.called_ae!r} is not {self.config.ae_title!r}",
            )
        if request.application_context != acse.DICOM_APPLICATION_CONTEXT:
            return (
                acse.encode_associate_rj(
                    acse.RejectResult.PERMANENT,
                    acse.RejectSource.SERVICE_USER,
                    acse.RejectReason.APPLICATION_CONTEXT_NOT_SUPPORTED,
                ),
                f"application context {request.application_context}",
            )
        return None

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run one request; the server keeps the task until it ends."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, grace: float) -> None:
        """Stop accepting; give open associations ``grace`` seconds, then abort them.

        Every request already received is answered (or, if its association was
        aborted, finished in the pipeline) before this returns.
        """
        if self._server is None:
            return
        self._server.close()
        deadline = time.monotonic() + grace
        while self.associations and time.monotonic() < deadline:
            await asyncio.sleep(SHUTDOWN_POLL)
        for association in list(self.associations):
            log.warning("aborting association with %s at shutdown", association.origin.calling_ae)
            association.abort()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for association in list(self.associations):
            if association.transport is not None:
                association.transport.abort()
        await self._server.wait_closed()
        self._server = None
