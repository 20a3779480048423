"""The native DICOM listener: ``loop.create_server`` with one ``Association`` per connection.

It owns what outlives one connection: the acceptor's negotiation settings, the
count of open associations (beyond ``maximum_associations`` a request is refused
as transient, "local limit exceeded"), and the tasks that serve requests, so a
shutdown can wait for every answer owed. Connections not associated (yet) take no
slot and are bounded apart (``connections.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Coroutine
from typing import Any

from pydicom.uid import AllTransferSyntaxes

from engine.certificates import TlsPort
from engine.config import DicomConfig
from engine.dicom import access, acse
from engine.dicom.association import Association
from engine.dicom.connections import Unassociated
from engine.dicom.qr import QUERY_RETRIEVE_CLASSES
from engine.dicom.services import Services
from engine.dicom.tls import TlsAcceptor
from engine.metrics import Metrics
from engine.storage.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = logging.getLogger(__name__)

SHUTDOWN_POLL = 0.05
BACKLOG = 256
# A PDU may carry at most our advertised maximum; 0 ("unlimited") still gets a bound.
UNLIMITED_PDU_BODY = 64 * 1024 * 1024


class NativeServer:
    def __init__(
        self,
        config: DicomConfig,
        services: Services,
        metrics: Metrics,
        tls: TlsPort | None = None,
    ) -> None:
        """``tls``: also listen on a TLS port (engine/dicom/tls.py), same services."""
        self.config = config
        self.tls = tls
        self._tls_acceptor: TlsAcceptor | None = None
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
        # Who may call, and what each caller may do (engine/dicom/access.py).
        self.access = access.AccessControl(config)
        self._granted_settings: dict[frozenset[access.Service], acse.AcceptorSettings] = {}
        self.max_pdu_body = config.maximum_pdu_size or UNLIMITED_PDU_BODY
        self.acse_timeout = config.acse_timeout
        self.network_timeout = config.network_timeout
        self.dimse_timeout = config.dimse_timeout
        self.receive_buffer = config.receive_buffer
        self.associations: set[Association] = set()  # every connection open
        self.accepted: set[Association] = set()  # those holding an association slot
        self.unassociated: Unassociated[Association] = Unassociated()  # all the others
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.access.resolve)  # host names: before any caller
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
        if self.tls is not None:
            self._tls_acceptor = TlsAcceptor(
                self.config.host,
                self.tls,
                lambda: Association(self),
                self.acse_timeout,
            )
            await self._tls_acceptor.start()
            log.info(
                "DICOM AE %s listening for TLS on %s:%d",
                self.config.ae_title,
                self.config.host,
                self._tls_acceptor.port,
            )

    def refusal(self, request: acse.AssociateRequest) -> tuple[bytes, str] | None:
        """The A-ASSOCIATE-RJ to send, with the reason for the log, or None to accept."""
        if len(self.accepted) >= self.config.maximum_associations:
            return (
                acse.encode_associate_rj(
                    acse.RejectResult.TRANSIENT,
                    acse.RejectSource.SERVICE_PROVIDER_PRESENTATION,
                    acse.PresentationRejectReason.LOCAL_LIMIT_EXCEEDED,
                ),
                f"more than {self.config.maximum_associations} associations",
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

    def admission(
        self, request: acse.AssociateRequest, peer_ip: str
    ) -> access.Grant | tuple[bytes, str]:
        """What the caller may do, or the A-ASSOCIATE-RJ (and the reason for the log):
        ``refusal`` first, then access control (called and calling AE title, address)."""
        refusal = self.refusal(request)
        if refusal is not None:
            return refusal
        decision = self.access.admit(request.calling_ae, request.called_ae, peer_ip)
        if isinstance(decision, access.Denial):
            rj = acse.encode_associate_rj(
                acse.RejectResult.PERMANENT, acse.RejectSource.SERVICE_USER, decision.reason
            )
            return rj, decision.why
        return decision

    def settings_for(self, grant: access.Grant) -> acse.AcceptorSettings:
        """The negotiation settings of an association with this grant: the contexts of
        services it may not use are refused (one settings object per set of services)."""
        settings = self._granted_settings.get(grant.services)
        if settings is None:
            accepts = self.settings.accepts_abstract
            settings = dataclasses.replace(
                self.settings,
                accepts_abstract=lambda uid: grant.accepts_context(uid) and accepts(uid),
            )
            self._granted_settings[grant.services] = settings
        return settings

    def opened(self, association: Association) -> None:
        """A new connection: no slot until accepted; the oldest unassociated one makes
        room if there are too many."""
        self.associations.add(association)
        oldest = self.unassociated.add(association)
        if oldest is not None:
            log.warning(
                "dropping %s: more than %d connections without an association",
                oldest.describe(),
                self.unassociated.limit,
            )
            oldest.drop()

    def admitted(self, association: Association) -> None:
        """Its A-ASSOCIATE-AC went out: it holds a slot until it closes."""
        self.unassociated.discard(association)
        self.accepted.add(association)

    def closed(self, association: Association) -> None:
        self.associations.discard(association)
        self.accepted.discard(association)
        self.unassociated.discard(association)

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
        if self._tls_acceptor is not None:
            await self._tls_acceptor.stop()
            self._tls_acceptor = None
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
