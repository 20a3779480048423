"""C-ECHO and C-STORE SCP on pynetdicom, bridged into the asyncio pipeline.

pynetdicom runs each association in its own threads. The C-STORE handler is the
"threaded adapter": it builds a ``Received`` record, hands it to the pipeline and
blocks its association thread until the pipeline has answered, then returns the
status. Every storage SOP class is accepted, private ones too, in every transfer
syntax pydicom knows; anything the handler cannot handle gets an error status,
never a hung scanner.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from engine import status
from engine.config import DicomConfig
from engine.dicom import dimse
from engine.model import Origin, Outcome, Received, Result
from engine.stages.receive import Receiver

log = logging.getLogger(__name__)

# Accept any storage-like abstract syntax (private SOP classes included), not just
# the ones pynetdicom lists. pynetdicom reads this module-level switch during
# negotiation; the engine sets it once, here, and never changes it back.
_config.UNRESTRICTED_STORAGE_SERVICE = True

SHUTDOWN_POLL = 0.05


def response(result: Result) -> int | Dataset:
    """The C-STORE-RSP status, with an Error Comment on failures."""
    code = status.for_outcome(result.outcome)
    if result.outcome.is_success:
        return code
    rsp = Dataset()
    rsp.Status = code
    if result.message:
        rsp.ErrorComment = result.message[: dimse.ERROR_COMMENT_MAX]
    return rsp


def origin_of(event: evt.Event) -> Origin:
    requestor = event.assoc.requestor
    return Origin(
        peer_ip=str(requestor.address),
        peer_port=int(requestor.port),
        calling_ae=str(requestor.ae_title).strip(),
        called_ae=str(event.assoc.acceptor.ae_title).strip(),
    )


class StoreSCP:
    """The listening AE: one object per running engine."""

    def __init__(self, config: DicomConfig, receiver: Receiver) -> None:
        self.config = config
        self.receiver = receiver
        ae = AE(ae_title=config.ae_title)
        ae.maximum_associations = config.maximum_associations
        ae.maximum_pdu_size = config.maximum_pdu_size
        ae.network_timeout = config.network_timeout
        ae.acse_timeout = config.acse_timeout
        ae.dimse_timeout = config.dimse_timeout
        syntaxes = list(AllTransferSyntaxes)
        ae.add_supported_context(Verification, syntaxes)
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        self.ae = ae
        self.server: Any = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self.handle_connection),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_ABORTED, self.handle_aborted),
        ]
        self.server = self.ae.start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=handlers
        )
        log.info(
            "DICOM AE %s listening on %s:%d (up to %d associations)",
            self.config.ae_title,
            self.config.host,
            self.port,
            self.config.maximum_associations,
        )

    def stop(self, grace: float) -> None:
        """Stop accepting; give open associations ``grace`` seconds, then abort them."""
        if self.server is None:
            return
        self.server.shutdown()
        deadline = time.monotonic() + grace
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(SHUTDOWN_POLL)
        for assoc in self.ae.active_associations:
            log.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()
        self.server = None

    # -- handlers (association threads) ----------------------------------------------

    def handle_connection(self, event: evt.Event) -> None:
        """Answers are small writes after a large read: never let Nagle hold them back."""
        transport = event.assoc.dul.socket
        sock = transport.socket if transport is not None else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle_echo(self, event: evt.Event) -> int:
        return status.SUCCESS

    def handle_store(self, event: evt.Event) -> int | Dataset:
        try:
            request = event.request
            assert isinstance(request, C_STORE) and request.DataSet is not None
            received = Received(
                origin=origin_of(event),
                sop_class_uid=str(request.AffectedSOPClassUID),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
                transfer_syntax=str(event.context.transfer_syntax),
                data=request.DataSet.getvalue(),
                received_at=time.time(),
                started=time.monotonic(),
            )
            result = self.receiver.submit_from_thread(received)
        except Exception as exc:  # the protocol edge: log, answer, keep serving
            log.exception("C-STORE handler failed")
            result = Result(Outcome.PROCESSING_FAILURE, f"internal error: {exc!r}")
        return response(result)

    def handle_accepted(self, event: evt.Event) -> None:
        o = origin_of(event)
        log.info("association accepted: %s from %s:%d", o.calling_ae, o.peer_ip, o.peer_port)

    def handle_rejected(self, event: evt.Event) -> None:
        o = origin_of(event)
        log.warning("association rejected: %s from %s:%d", o.calling_ae, o.peer_ip, o.peer_port)

    def handle_aborted(self, event: evt.Event) -> None:
        o = origin_of(event)
        log.warning("association aborted: %s from %s:%d", o.calling_ae, o.peer_ip, o.peer_port)
