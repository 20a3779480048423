"""DIMSE services, whatever transport carried the message: C-ECHO and C-STORE.

The native transport hands a complete message (command and dataset) to
``Services.handle`` and sends back what it returns. Nothing here knows about
PDUs or sockets; query/retrieve will add its handlers beside these.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from engine import status
from engine.dicom import dimse
from engine.dicom.access import NO_GRANT, Grant, Service, store_refused
from engine.dicom.dimse import CommandField
from engine.model import Origin, Outcome, Received, Result
from engine.stages.receive import Receiver
from engine.storage.area import is_out_of_space
from engine.storage.spool import Spooled, Spooler, SpoolFile

if TYPE_CHECKING:
    from engine.dicom.qr import QueryService

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Request:
    """One complete DIMSE request as the transport delivers it."""

    origin: Origin
    abstract_syntax: str
    transfer_syntax: str
    command: dimse.Command
    dataset: bytes | None
    completed_at: float  # monotonic: when the last fragment arrived
    # The dataset written to a temp file as it arrived (then ``dataset`` is None).
    spooled: asyncio.Future[Spooled] | None = None
    # C-STORE sub-operations on this same association (a C-GET's), when the transport
    # can send them: (SOP class, instance, syntaxes it may use) -> a context, then
    # (context ID, dataset bytes in its syntax) -> the C-STORE-RSP status.
    channel: StoreChannel | None = None
    # What the caller may do (access.py); None (no grant given) allows nothing.
    grant: Grant | None = None


class StoreChannel(Protocol):
    """What a transport offers a C-GET: C-STOREs back to the requestor."""

    def context_for(
        self, sop_class_uid: str, transfer_syntaxes: Sequence[str]
    ) -> tuple[int, str] | None:
        """The accepted (context ID, transfer syntax) to send this SOP class in, preferring
        the syntaxes in the order given, or None."""

    async def c_store(
        self, context_id: int, sop_class_uid: str, sop_instance_uid: str, dataset: bytes
    ) -> int:
        """Send one C-STORE-RQ and return the status of its response."""


class Services:
    def __init__(
        self,
        receiver: Receiver,
        store_timeout: float,
        spooler: Spooler | None = None,
        spools: Callable[[str], bool] = lambda transfer_syntax: False,
        query: QueryService | None = None,
    ) -> None:
        """``spools`` says whether a C-STORE dataset in this syntax goes to ``spooler``
        as it arrives (not when the pipeline must decode its pixels). ``query`` answers
        C-FIND and C-CANCEL."""
        self.receiver = receiver
        self.store_timeout = store_timeout
        self.spooler = spooler
        self.spools = spools
        self.query = query

    def open_spool(
        self, origin: Origin, command: dimse.Command, abstract_syntax: str, transfer_syntax: str
    ) -> SpoolFile | None:
        """A spool for the dataset that follows this command, or None to collect it in memory."""
        if (
            self.spooler is None
            or command.command_field != CommandField.C_STORE_RQ
            or not command.affected_sop_instance_uid
            or not self.spools(transfer_syntax)
        ):
            return None
        return self.spooler.open(
            command.affected_sop_class_uid or abstract_syntax,
            command.affected_sop_instance_uid,
            transfer_syntax,
            origin.calling_ae,
        )

    async def respond(self, request: Request) -> AsyncIterator[tuple[bytes, bytes | None]]:
        """Every response to ``request``: (command set, dataset or None), in order."""
        field = request.command.command_field
        if self.query is not None and field == CommandField.C_FIND_RQ:
            async for message in self.query.find(request):
                yield message
            return
        if self.query is not None and field == CommandField.C_MOVE_RQ:
            async for message in self.query.move(request):
                yield message
            return
        if self.query is not None and field == CommandField.C_GET_RQ:
            async for message in self.query.get(request):
                yield message
            return
        if self.query is not None and field == CommandField.C_CANCEL_RQ:
            self.query.cancel(request)
            return
        response = await self.handle(request)
        if response is not None:
            yield response, None

    async def handle(self, request: Request) -> bytes | None:
        """The encoded response command set (none carries a dataset yet), or None.

        C-CANCEL has no response; there is nothing of ours yet that it could cancel.
        """
        command = request.command
        field = command.command_field
        message_id = command.message_id or 0
        if field == CommandField.C_ECHO_RQ:
            return dimse.encode_response(
                CommandField.C_ECHO_RSP,
                message_id,
                status.SUCCESS,
                affected_sop_class_uid=command.affected_sop_class_uid,
            )
        if field == CommandField.C_STORE_RQ:
            result = await self.store(request)
            code = status.for_outcome(result.outcome)
            comment = None if result.outcome.is_success else result.message
            return dimse.encode_response(
                CommandField.C_STORE_RSP,
                message_id,
                code,
                affected_sop_class_uid=command.affected_sop_class_uid,
                affected_sop_instance_uid=command.affected_sop_instance_uid,
                error_comment=comment or None,
            )
        if field == CommandField.C_CANCEL_RQ:
            return None
        log.warning("unsupported DIMSE command 0x%04X from %s", field, request.origin.calling_ae)
        return dimse.encode_response(
            field | dimse.RESPONSE_BIT,
            message_id,
            status.UNRECOGNIZED_OPERATION,
            affected_sop_class_uid=command.affected_sop_class_uid,
            error_comment="operation not supported by this engine",
        )

    async def store(self, request: Request) -> Result:
        command = request.command
        grant = request.grant or NO_GRANT
        if not grant.allows(Service.STORE):
            if request.spooled is not None:  # written while it arrived: not ours to keep
                with contextlib.suppress(OSError):
                    (await request.spooled).discard()
            refused = store_refused(grant, request.origin, command.affected_sop_instance_uid or "")
            return self.receiver.tally(refused)
        spooled: Spooled | None = None
        if request.spooled is not None:
            try:
                spooled = await request.spooled
            except OSError as exc:
                log.error("cannot write %s to disk: %s", command.affected_sop_instance_uid, exc)
                outcome = (
                    Outcome.OUT_OF_RESOURCES if is_out_of_space(exc) else Outcome.PROCESSING_FAILURE
                )
                return self.receiver.tally(
                    Result(outcome, f"cannot write the file: {exc.strerror or exc}")
                )
        elif request.dataset is None or not command.affected_sop_instance_uid:
            log.warning(
                "C-STORE without a dataset or SOP Instance UID from %s", request.origin.calling_ae
            )
            return self.receiver.tally(
                Result(Outcome.CANNOT_UNDERSTAND, "C-STORE without a dataset or instance UID")
            )
        assert command.affected_sop_instance_uid is not None
        received = Received(
            origin=request.origin,
            sop_class_uid=command.affected_sop_class_uid or request.abstract_syntax,
            sop_instance_uid=command.affected_sop_instance_uid,
            transfer_syntax=request.transfer_syntax,
            data=request.dataset or b"",
            received_at=time.time(),
            started=request.completed_at,
            spooled=spooled,
        )
        try:
            async with asyncio.timeout(self.store_timeout):  # no extra task, unlike wait_for
                result = await self.receiver.submit(received)
        except TimeoutError:
            return self.receiver.gave_up(received)
        except Exception as exc:  # the protocol edge: a bug never leaves a scanner hanging
            log.exception("pipeline failed for %s", received.sop_instance_uid)
            return self.receiver.tally(
                Result(Outcome.PROCESSING_FAILURE, f"internal error: {exc!r}")
            )
        self.receiver.answered(received)
        return result
