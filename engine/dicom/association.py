"""One association on the native transport: an ``asyncio.Protocol`` over the state machine.

Bytes come in through ``data_received``, are cut into PDUs by the ``Framer``
(memoryviews of the received chunks, no copy), become events of the state machine
(``fsm.py``), and the machine's actions are carried out here: send a PDU, start or
stop the ARTIM timer, hand a complete DIMSE message to the services, close.

P-DATA fragments of a C-STORE dataset go to a spool (``storage/spool.py``) as they
arrive: written to a temp file and hashed (by the loop itself, or by a spool thread
while the next PDUs come in). Past ``receive_buffer`` bytes not yet written, reading
from the peer pauses until a spool thread catches up. Other datasets (and C-STOREs
whose pixels the pipeline must decode) are kept as views and joined once, when the
last fragment arrives. A request
runs as a task owned by the server; its response goes out when the pipeline has
resolved the item. Timers:

- ARTIM (``acse_timeout``): a connection that says nothing, or a peer that does not
  close after our last word, is dropped.
- idle (``network_timeout``): an association silent for that long while nothing is
  owed to it is aborted.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from engine import status
from engine.dicom import acse, dimse, pdu
from engine.dicom.access import NO_GRANT, Grant, note_admission
from engine.dicom.fsm import TABLE, Action, Event, State, transition
from engine.dicom.services import Request
from engine.errors import ProtocolError
from engine.model import Origin
from engine.storage.spool import SpoolFile

if TYPE_CHECKING:
    from engine.dicom.server import NativeServer

log = logging.getLogger(__name__)

# Received dataset bytes handed to the spool at once: fewer hand-offs to its threads
# (each one wakes a thread), still written while the rest of the dataset arrives.
SPOOL_BATCH = 256 * 1024
# Requests one association may have in flight before we stop reading from it.
MAX_OUTSTANDING = 4

_PDU_EVENTS = {
    pdu.PDUType.ASSOCIATE_RQ: Event.EVT6,
    pdu.PDUType.ASSOCIATE_AC: Event.EVT3,
    pdu.PDUType.ASSOCIATE_RJ: Event.EVT4,
    pdu.PDUType.P_DATA_TF: Event.EVT10,
    pdu.PDUType.RELEASE_RQ: Event.EVT12,
    pdu.PDUType.RELEASE_RP: Event.EVT13,
    pdu.PDUType.ABORT: Event.EVT16,
}


class Association(asyncio.Protocol):
    def __init__(self, server: NativeServer) -> None:
        self.server = server
        self.state = State.STA1
        self.framer = pdu.Framer(server.max_pdu_body)
        self.transport: asyncio.Transport | None = None
        self.origin = Origin("", 0, "", "")
        self.contexts: dict[int, acse.AcceptedContext] = {}
        self.peer_max_pdu = 0
        self._artim: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._last_activity = time.monotonic()
        self._command_parts: list[memoryview] = []
        self._command: dimse.Command | None = None
        self._command_context = 0
        self._data_parts: list[memoryview] = []
        self._data_size = 0  # bytes in _data_parts
        self._spool: SpoolFile | None = None
        self._spool_paused = False
        self.outstanding = 0
        self._release_pending = False
        self._accepted = False  # counted in the server's active associations
        # C-STOREs we sent on this association (a C-GET's), by Message ID.
        self._awaiting: dict[int, asyncio.Future[dimse.Command]] = {}
        self._message_id = 0
        self.roles: dict[str, tuple[bool, bool]] = {}
        self.grant = NO_GRANT  # what the caller may do, once admitted (access.py)
        self._abort_reason = pdu.AbortReason.NOT_SPECIFIED
        self._framing_lost = False
        self._actions: dict[Action, Callable[[Any], None]] = {
            Action.AE5: self._ae5,
            Action.AE6: self._ae6,
            Action.AE7: self._ae7,
            Action.AE8: self._ae8,
            Action.DT1: self._dt1,
            Action.DT2: self._dt2,
            Action.AR2: self._ar2,
            Action.AR4: self._ar4,
            Action.AR5: self._stop_artim,
            Action.AA1: self._aa1,
            Action.AA2: self._aa2,
            Action.AA3: self._aa3,
            Action.AA4: self._aa4,
            Action.AA5: self._stop_artim,
            Action.AA6: _ignore,
            Action.AA7: self._aa7,
            Action.AA8: self._aa8,
        }

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername") or ("", 0)
        self.origin = Origin(str(peer[0]), int(peer[1]), "", "")
        self.server.opened(self)
        self._event(Event.EVT5)

    def data_received(self, data: bytes) -> None:
        self._last_activity = time.monotonic()
        if self._framing_lost:
            return  # no PDU boundaries any more: one A-ABORT was enough; ARTIM ends it
        try:
            pdus = self.framer.feed(data)
        except ProtocolError as exc:
            self._framing_lost = True
            self._protocol_error(str(exc), pdu.AbortReason.INVALID_PDU_PARAMETER)
            return
        for pdu_type, body in pdus:
            if self.state is State.STA1:
                return
            event = _PDU_EVENTS[pdu.PDUType(pdu_type)]
            if event is not Event.EVT10 or self.state is not State.STA6:  # not the hot path
                self._note_unexpected(pdu_type, event)
            self._event(event, body)
        if self._spool is not None and self._data_size >= SPOOL_BATCH:
            self._spool_parts()

    def eof_received(self) -> bool:
        if self.framer.pending:
            log.warning("%s closed the connection in the middle of a PDU", self._who())
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self.state is not State.STA1:
            self._event(Event.EVT17)
        self.transport = None
        self._data_parts.clear()
        self._data_size = 0
        self._command_parts.clear()
        if self._spool is not None:
            self._spool.discard()  # the dataset will never be complete
            self._spool = None
        self.server.closed(self)
        if self._accepted:
            self._accepted = False
            self.server.metrics.associations_active.dec()
        for waiting in self._awaiting.values():
            if not waiting.done():
                waiting.set_exception(ConnectionError("the association ended"))
        self._awaiting.clear()

    # -- the state machine --------------------------------------------------------------

    def _event(self, event: Event, argument: Any = None) -> None:
        action, self.state = transition(self.state, event)
        self._actions[action](argument)

    def abort(self) -> None:
        """A local A-ABORT (shutdown, idle timeout)."""
        self._event(Event.EVT15)

    def drop(self) -> None:
        """Close at once, without a word: one connection too many without an association."""
        if self.transport is not None:
            self.transport.abort()

    def describe(self) -> str:
        return self._who()

    def _note_unexpected(self, pdu_type: int, event: Event) -> None:
        """Log a PDU the state does not expect (the table aborts it) and name the reason."""
        if (self.state, event) in TABLE or self.state is State.STA13:
            return
        name = pdu.PDUType(pdu_type).name
        log.warning("unexpected %s PDU from %s (%s); aborting", name, self._who(), self.state.value)
        self._abort_reason = pdu.AbortReason.UNEXPECTED_PDU

    def _protocol_error(self, message: str, reason: pdu.AbortReason) -> None:
        log.warning("protocol error from %s: %s; aborting", self._who(), message)
        self._abort_reason = reason
        self._event(Event.EVT19)

    # -- actions ------------------------------------------------------------------------

    def _ae5(self, _: Any) -> None:
        self._start_artim()

    def _ae6(self, body: memoryview) -> None:
        self._stop_artim()
        try:
            request = acse.decode_associate_rq(body)
        except ProtocolError as exc:
            self._protocol_error(
                f"bad A-ASSOCIATE-RQ: {exc}", pdu.AbortReason.INVALID_PDU_PARAMETER
            )
            return
        self.origin = Origin(
            self.origin.peer_ip, self.origin.peer_port, request.calling_ae, request.called_ae
        )
        admission = self.server.admission(request, self.origin.peer_ip)
        if not isinstance(admission, Grant):
            self._event(Event.EVT8, admission)
            return
        self.grant = admission
        results = acse.negotiate(request, self.server.settings_for(admission))
        note_admission(
            admission,
            request.calling_ae,
            self.origin.peer_ip,
            self.origin.peer_port,
            (context.abstract_syntax for context in request.contexts),
        )
        self.contexts = {
            r.context_id: r for r in results if r.result is acse.ContextResult.ACCEPTANCE
        }
        self.peer_max_pdu = request.max_pdu_length
        self.roles = dict(request.roles)
        self._event(Event.EVT7, acse.encode_associate_ac(request, results, self.server.settings))

    def _ae7(self, ac: bytes) -> None:
        self._write(ac)
        self._arm_idle()
        self._accepted = True
        self.server.admitted(self)
        self.server.metrics.associations_accepted.inc()
        self.server.metrics.associations_active.inc()
        log.info(
            "association accepted: %s from %s:%d (%d of the proposed contexts)",
            self.origin.calling_ae,
            self.origin.peer_ip,
            self.origin.peer_port,
            len(self.contexts),
        )

    def _ae8(self, rj: tuple[bytes, str]) -> None:
        pdu_bytes, why = rj
        self.server.metrics.associations_refused.inc()
        log.warning(
            "association rejected: %s from %s:%d: %s",
            self.origin.calling_ae,
            self.origin.peer_ip,
            self.origin.peer_port,
            why,
        )
        self._write(pdu_bytes)
        self._start_artim()

    def _dt1(self, pdus: list[bytes]) -> None:
        if self.transport is not None:
            self.transport.writelines(pdus)

    def _dt2(self, body: memoryview) -> None:
        try:
            for pdv in pdu.parse_pdata(body):
                self._take(pdv)
        except ProtocolError as exc:
            self._protocol_error(str(exc), pdu.AbortReason.INVALID_PDU_PARAMETER)

    def _ar2(self, _: Any) -> None:
        if self.outstanding:
            self._release_pending = True  # the answers still owed go out first
        else:
            self._event(Event.EVT14)

    def _ar4(self, _: Any) -> None:
        self._write(pdu.RELEASE_RP_PDU)
        self._start_artim()

    def _aa1(self, _: Any) -> None:
        self._write(pdu.encode_abort(pdu.AbortSource.SERVICE_USER, pdu.AbortReason.NOT_SPECIFIED))
        self._start_artim()

    def _aa2(self, _: Any) -> None:
        self._stop_artim()
        self._close()

    def _aa3(self, _: Any) -> None:
        log.warning("association aborted by %s", self._who())
        self._close()

    def _aa4(self, _: Any) -> None:
        if self.outstanding or self._command is not None:
            log.warning("connection with %s lost during a transfer", self._who())

    def _aa7(self, _: Any) -> None:
        self._write(pdu.encode_abort(pdu.AbortSource.SERVICE_PROVIDER, self._abort_reason))

    def _aa8(self, _: Any) -> None:
        self._write(pdu.encode_abort(pdu.AbortSource.SERVICE_PROVIDER, self._abort_reason))
        self._start_artim()

    # -- DIMSE message assembly -------------------------------------------------------

    def _take(self, pdv: pdu.PDV) -> None:
        context = self.contexts.get(pdv.context_id)
        if context is None:
            raise ProtocolError(f"presentation context {pdv.context_id} was not accepted")
        if pdv.is_command:
            if self._command is not None:
                raise ProtocolError("a command fragment arrived while a dataset was expected")
            self._command_parts.append(pdv.data)
            if sum(len(part) for part in self._command_parts) > dimse.MAX_COMMAND_SET_LENGTH:
                raise ProtocolError("command set larger than any DIMSE command")
            if not pdv.is_last:
                return
            command = dimse.decode_command(b"".join(self._command_parts))
            if command.is_response:
                self._command_parts.clear()
                self._answered(command)
                return
            self._command_parts.clear()
            if command.has_dataset:
                self._command, self._command_context = command, pdv.context_id
                self._spool = self.server.services.open_spool(
                    self.origin, command, context.abstract_syntax, context.transfer_syntax
                )
            else:
                self._dispatch(command, None, context)
            return
        if self._command is None or pdv.context_id != self._command_context:
            raise ProtocolError("a dataset fragment arrived without its command")
        self._data_parts.append(pdv.data)
        self._data_size += len(pdv.data)
        if pdv.is_last:
            command, self._command = self._command, None
            spool, self._spool = self._spool, None
            if spool is None:
                dataset = b"".join(self._data_parts)  # the one copy of the dataset
                self._data_parts.clear()
                self._data_size = 0
                self._dispatch(command, dataset, context)
            else:
                parts, self._data_parts, self._data_size = self._data_parts, [], 0
                self._dispatch(command, None, context, spool, parts)

    def _spool_parts(self) -> None:
        """Hand the fragments of this read to the spool; pause reading if it lags."""
        spool = self._spool
        assert spool is not None
        spool.add(self._data_parts)
        self._data_parts = []
        self._data_size = 0
        limit = self.server.receive_buffer
        if spool.pending > limit and self.transport is not None and not self._spool_paused:
            self._spool_paused = True
            self.transport.pause_reading()
            spool.low_water = limit // 2
            spool.on_drained = self._spool_drained
            if spool.pending <= spool.low_water:  # the thread caught up meanwhile
                spool.on_drained = None
                self._spool_drained()

    def _spool_drained(self) -> None:
        if not self._spool_paused:
            return
        self._spool_paused = False
        if self.transport is not None and self.outstanding < MAX_OUTSTANDING:
            self.transport.resume_reading()

    def _dispatch(
        self,
        command: dimse.Command,
        dataset: bytes | None,
        context: acse.AcceptedContext,
        spool: SpoolFile | None = None,
        last_parts: list[memoryview] | None = None,
    ) -> None:
        request = Request(
            origin=self.origin,
            abstract_syntax=context.abstract_syntax,
            transfer_syntax=context.transfer_syntax,
            command=command,
            dataset=dataset,
            completed_at=time.monotonic(),
            channel=self,
            grant=self.grant,
            spooled=spool.finish(last_parts) if spool is not None else None,
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s: 0x%04X %s (%d bytes)",
                self._who(),
                command.command_field,
                command.affected_sop_instance_uid,
                len(dataset or b""),
            )
        self.outstanding += 1
        if self.outstanding >= MAX_OUTSTANDING and self.transport is not None:
            self.transport.pause_reading()
        self.server.spawn(self._serve(request, context.context_id))

    async def _serve(self, request: Request, context_id: int) -> None:
        """Send each response the services give (one, or a C-FIND's matches and its end)."""
        try:
            async for command, dataset in self.server.services.respond(request):
                if self.transport is None or self.state not in (State.STA6, State.STA8):
                    return  # the peer left or aborted: nobody to answer
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "%s: answering 0x%04X %s",
                        self._who(),
                        request.command.command_field,
                        request.command.affected_sop_instance_uid or request.command.message_id,
                    )
                pdus = pdu.encode_pdata(context_id, True, command, self.peer_max_pdu)
                if dataset is not None:
                    pdus += pdu.encode_pdata(context_id, False, dataset, self.peer_max_pdu)
                self._event(Event.EVT9, pdus)
        except Exception:
            # Services answer their own errors, so this is a bug and the request will never
            # be answered: abort, rather than leave the peer (and a release it may have
            # asked for) waiting for the idle timeout.
            log.exception("a DIMSE service failed; aborting the association")
            if self.transport is not None and self.state in (State.STA6, State.STA8):
                self.abort()
            return
        finally:
            self.outstanding -= 1
        if self.transport is None or self.state not in (State.STA6, State.STA8):
            return
        if self.outstanding < MAX_OUTSTANDING and not self._spool_paused:
            self.transport.resume_reading()
        if self._release_pending and not self.outstanding and self.state is State.STA8:
            self._release_pending = False
            self._event(Event.EVT14)

    # -- C-STORE sub-operations of a C-GET (StoreChannel) -------------------------------

    def context_for(
        self, sop_class_uid: str, transfer_syntaxes: Sequence[str]
    ) -> tuple[int, str] | None:
        """An accepted context of this SOP class in one of the syntaxes, preferring the
        first, on which the requestor took the SCP role (PS3.7 D.3.3.4), or None."""
        if not self.roles.get(sop_class_uid, (True, False))[1]:
            return None
        for syntax in transfer_syntaxes:
            for context in self.contexts.values():
                if context.abstract_syntax == sop_class_uid and context.transfer_syntax == syntax:
                    return context.context_id, syntax
        return None

    async def c_store(
        self, context_id: int, sop_class_uid: str, sop_instance_uid: str, dataset: bytes
    ) -> int:
        """Send a C-STORE-RQ to the requestor; the status of its answer (or a failure)."""
        if self.transport is None or self.state not in (State.STA6, State.STA8):
            return status.UNABLE_TO_PERFORM_SUBOPERATIONS
        self._message_id = self._message_id % dimse.MAX_MESSAGE_ID + 1
        message_id = self._message_id
        command = dimse.encode_request(
            dimse.CommandField.C_STORE_RQ,
            message_id,
            affected_sop_class_uid=sop_class_uid,
            affected_sop_instance_uid=sop_instance_uid,
            has_dataset=True,
        )
        waiting: asyncio.Future[dimse.Command] = asyncio.get_running_loop().create_future()
        self._awaiting[message_id] = waiting
        pdus = pdu.encode_pdata(context_id, True, command, self.peer_max_pdu)
        pdus += pdu.encode_pdata(context_id, False, dataset, self.peer_max_pdu)
        self._event(Event.EVT9, pdus)
        try:
            answer = await asyncio.wait_for(waiting, self.server.dimse_timeout)
        except (TimeoutError, ConnectionError) as exc:
            log.warning("%s: no answer to C-STORE %s: %r", self._who(), sop_instance_uid, exc)
            return status.UNABLE_TO_PERFORM_SUBOPERATIONS
        finally:
            self._awaiting.pop(message_id, None)
        return answer.status if answer.status is not None else status.PROCESSING_FAILURE

    def _answered(self, command: dimse.Command) -> None:
        """A response arrived: the answer to a C-STORE we sent, or a protocol error."""
        if command.has_dataset:
            raise ProtocolError("a response with a data set was not expected")
        waiting = self._awaiting.get(command.message_id_being_responded_to or 0)
        if waiting is None or waiting.done():
            log.warning("%s: a response to no request of ours; ignored", self._who())
            return
        waiting.set_result(command)

    # -- timers and I/O -----------------------------------------------------------------

    def _start_artim(self) -> None:
        self._stop_artim()
        loop = asyncio.get_running_loop()
        self._artim = loop.call_later(self.server.acse_timeout, self._event, Event.EVT18)

    def _stop_artim(self, _: Any = None) -> None:
        if self._artim is not None:
            self._artim.cancel()
            self._artim = None

    def _arm_idle(self) -> None:
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self.server.network_timeout, self._check_idle)

    def _check_idle(self) -> None:
        self._idle = None
        if self.state not in (State.STA6, State.STA8):
            return
        silent = time.monotonic() - self._last_activity
        if silent >= self.server.network_timeout and not self.outstanding:
            log.warning("%s silent for %.0f s; aborting the association", self._who(), silent)
            self.abort()
            return
        self._arm_idle()

    def _cancel_timers(self) -> None:
        self._stop_artim()
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _who(self) -> str:
        o = self.origin
        return f"{o.calling_ae or '?'} ({o.peer_ip}:{o.peer_port})"


def _ignore(_: Any) -> None:
    return None
