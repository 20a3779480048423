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
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from engine import status
from engine.certificates import TlsPort
from engine.config import DicomConfig
from engine.dicom import dimse
from engine.dicom.access import (
    NO_GRANT,
    AccessControl,
    Denial,
    Grant,
    Service,
    note_admission,
    store_refused,
)
from engine.dicom.acse import RejectResult, RejectSource
from engine.dicom.qr import (
    FIND_MODELS,
    GET_MODELS,
    MOVE_MODELS,
    QUERY_RETRIEVE_CLASSES,
    UNCOMPRESSED,
    QueryEngine,
)
from engine.dicom.store_scu import Instance, plan_contexts
from engine.dicom.threaded import start_guarded, wake_acceptor
from engine.dicom.tls import TlsAssociationServer, start_threaded
from engine.metrics import Metrics
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


def _sub_operations(
    event: evt.Event,
    instances: list[Instance],
    decompress: Callable[[Instance], Dataset] | None = None,
) -> Iterator[Any]:
    """(status, dataset) per instance for pynetdicom's C-MOVE/C-GET machinery.

    With ``decompress`` (C-GET, whose contexts are known here): a compressed instance
    whose syntax the requestor did not accept, but an uncompressed one, goes decompressed.
    """
    accepted = {
        (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        for cx in event.assoc.accepted_contexts
    }
    for instance in instances:
        if event.is_cancelled:
            yield status.CANCEL, None
            return
        stored = (instance.sop_class_uid, instance.transfer_syntax) in accepted
        plain = any((instance.sop_class_uid, ts) in accepted for ts in UNCOMPRESSED)
        try:
            if (
                decompress is not None
                and not stored
                and plain
                and (instance.transfer_syntax not in UNCOMPRESSED)
            ):
                yield status.PENDING, decompress(instance)
            else:
                yield status.PENDING, dcmread(instance.path)
        except Exception as exc:  # a file or a decoder failure is this instance's alone
            log.error("cannot read %s for a retrieval: %s", instance.path, exc)
            failed = Dataset()
            failed.SOPInstanceUID = instance.sop_instance_uid
            yield status.UNABLE_TO_PERFORM_SUBOPERATIONS, failed


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

    def __init__(
        self,
        config: DicomConfig,
        receiver: Receiver,
        metrics: Metrics,
        query: QueryEngine | None = None,
        decompress: Callable[[Instance], Dataset] | None = None,
        tls: TlsPort | None = None,
    ) -> None:
        """``tls``: also listen on a TLS port (engine/dicom/tls.py), same handlers."""
        self.config = config
        self.tls = tls
        self.tls_server: TlsAssociationServer | None = None
        self.receiver = receiver
        self.metrics = metrics
        self.query = query
        self.decompress = decompress
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
        if query is not None:
            for sop_class in QUERY_RETRIEVE_CLASSES:
                ae.add_supported_context(sop_class, syntaxes)
        self.peers = {peer.ae_title.strip(): peer for peer in config.peers}
        # Who may call, and what each caller may do (engine/dicom/access.py); the grant
        # of each admitted association, read by its own thread's handlers.
        self.access = AccessControl(config)
        self._grants: weakref.WeakKeyDictionary[Any, Grant] = weakref.WeakKeyDictionary()
        self._grants_lock = threading.Lock()
        self.ae = ae
        self.server: Any = None
        metrics.watch_associations(self._active)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self.access.resolve()  # host names: before any caller
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self.handle_connection),
            (evt.EVT_CONN_CLOSE, wake_acceptor),  # closed before its request: end it now
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_FIND, self.handle_find),
            (evt.EVT_C_MOVE, self.handle_move),
            (evt.EVT_C_GET, self.handle_get),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_ABORTED, self.handle_aborted),
        ]
        # pynetdicom's server with a deep backlog, and no slot before a whole request
        # (engine/dicom/threaded.py).
        self.server = start_guarded(
            self.ae, (self.config.host, self.config.port), handlers, self.config.acse_timeout
        )
        log.info(
            "DICOM AE %s listening on %s:%d (up to %d associations)",
            self.config.ae_title,
            self.config.host,
            self.port,
            self.config.maximum_associations,
        )
        if self.tls is not None:
            self.tls_server = start_threaded(
                self.ae, self.config.host, self.tls, handlers, self.config.acse_timeout
            )
            log.info(
                "DICOM AE %s listening for TLS on %s:%d",
                self.config.ae_title,
                self.config.host,
                self.tls_server.server_address[1],
            )

    def stop(self, grace: float) -> None:
        """Stop accepting; give open associations ``grace`` seconds, then abort them."""
        if self.server is None:
            return
        self.server.shutdown()
        if self.tls_server is not None:
            self.tls_server.shutdown()
            self.tls_server = None
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

    def handle_requested(self, event: evt.Event) -> None:
        """Access control, before pynetdicom negotiates (engine/dicom/access.py): reject
        the association, or keep its grant and drop from this association's supported
        contexts those of the services the caller may not use."""
        assoc = event.assoc
        if not assoc.is_acceptor:
            return  # our own request (a C-MOVE's sub-association): nothing to decide
        rq = assoc.requestor.primitive
        assert rq is not None  # set by pynetdicom before EVT_REQUESTED
        calling = str(rq.calling_ae_title).strip()
        ip, port = str(assoc.requestor.address), int(assoc.requestor.port)
        decision = self.access.admit(calling, str(rq.called_ae_title), ip)
        if isinstance(decision, Denial):
            self.metrics.associations_refused.inc()
            log.warning("association rejected: %s from %s:%d: %s", calling, ip, port, decision.why)
            assoc.acse.send_reject(
                RejectResult.PERMANENT, RejectSource.SERVICE_USER, decision.reason
            )
            assoc.kill()  # as pynetdicom's own rejections do: the RJ goes out, then the end
            return
        with self._grants_lock:
            self._grants[assoc] = decision
        supported = assoc.acceptor.supported_contexts
        allowed = [cx for cx in supported if decision.accepts_context(str(cx.abstract_syntax))]
        if len(allowed) != len(supported):
            assoc.acceptor.supported_contexts = allowed
        proposed = (str(cx.abstract_syntax) for cx in rq.presentation_context_definition_list)
        note_admission(decision, calling, ip, port, proposed)

    def _grant(self, assoc: Any) -> Grant:
        with self._grants_lock:
            return self._grants.get(assoc, NO_GRANT)

    def handle_echo(self, event: evt.Event) -> int:
        return status.SUCCESS

    def handle_store(self, event: evt.Event) -> int | Dataset:
        try:
            request = event.request
            assert isinstance(request, C_STORE) and request.DataSet is not None
            grant = self._grant(event.assoc)
            if not grant.allows(Service.STORE):
                uid = str(request.AffectedSOPInstanceUID)
                refused = store_refused(grant, origin_of(event), uid)
                return response(self.receiver.tally(refused))
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
            result = self.receiver.tally(
                Result(Outcome.PROCESSING_FAILURE, f"internal error: {exc!r}")
            )
        return response(result)

    def handle_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """pynetdicom's C-FIND handler: (status, identifier) per match, then the end."""
        model = FIND_MODELS.get(str(event.request.AffectedSOPClassUID))
        if self.query is None or model is None:
            yield status.DATASET_DOES_NOT_MATCH_SOP_CLASS, None
            return
        try:
            identifier = event.identifier
        except Exception as exc:
            log.warning("C-FIND identifier does not parse: %s", exc)
            yield status.DATASET_DOES_NOT_MATCH_SOP_CLASS, None
            return
        found = self.query.search(model, identifier)
        for match in found.matches:
            if event.is_cancelled:
                yield status.CANCEL, None
                return
            yield found.pending, match
        if found.comment:
            final = Dataset()
            final.Status = found.status
            final.ErrorComment = found.comment[: dimse.ERROR_COMMENT_MAX]
            yield final, None
        else:
            yield found.status, None

    def handle_move(self, event: evt.Event) -> Iterator[Any]:
        """pynetdicom's C-MOVE handler: the destination, the number of sub-operations,
        then (status, dataset) per instance; pynetdicom performs the C-STOREs.

        An identifier that selects nothing usable is answered by pynetdicom's own
        "unable to process" status (it allows no other before the destination).
        """
        model = MOVE_MODELS.get(str(event.request.AffectedSOPClassUID))
        peer = self.peers.get(str(event.move_destination or "").strip())
        if self.query is None or model is None or peer is None:
            log.warning("C-MOVE to unknown destination %r refused", event.move_destination)
            yield None, None  # pynetdicom answers 0xA801
            return
        instances = self.query.instances(model, event.identifier)
        contexts = [
            build_context(sop_class, syntax) for sop_class, syntax in plan_contexts(instances)
        ]
        log.info("C-MOVE: %d instances to %s", len(instances), peer.ae_title)
        yield peer.host, peer.port, {"contexts": contexts}
        yield len(instances)
        yield from _sub_operations(event, instances)

    def handle_get(self, event: evt.Event) -> Iterator[Any]:
        """pynetdicom's C-GET handler: the number of sub-operations, then (status,
        dataset) per instance; pynetdicom sends them back on the same association."""
        model = GET_MODELS.get(str(event.request.AffectedSOPClassUID))
        if self.query is None or model is None:
            yield 0
            return
        instances = self.query.instances(model, event.identifier)
        log.info("C-GET: %d instances", len(instances))
        yield len(instances)
        yield from _sub_operations(event, instances, self.decompress)

    def _active(self) -> int:
        """Associations we accepted that are still open (read at scrape time)."""
        return sum(1 for a in self.ae.active_associations if a.is_acceptor and a.is_established)

    def handle_accepted(self, event: evt.Event) -> None:
        self.metrics.associations_accepted.inc()
        o = origin_of(event)
        log.info("association accepted: %s from %s:%d", o.calling_ae, o.peer_ip, o.peer_port)

    def handle_rejected(self, event: evt.Event) -> None:
        self.metrics.associations_refused.inc()
        o = origin_of(event)
        log.warning("association rejected: %s from %s:%d", o.calling_ae, o.peer_ip, o.peer_port)

    def handle_aborted(self, event: evt.Event) -> None:
        o = origin_of(event)
        log.warning("association aborted: %s from %s:%d", o.calling_ae, o.peer_ip, o.peer_port)
