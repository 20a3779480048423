"""DIMSE services, whatever transport carried the message: C-ECHO and C-STORE.

The native transport hands a complete message (command and dataset) to
``Services.handle`` and sends back what it returns. Nothing here knows about
PDUs or sockets; query/retrieve will add its handlers beside these.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from engine import status
from engine.dicom import dimse
from engine.dicom.dimse import CommandField
from engine.model import Origin, Outcome, Received, Result
from engine.stages.receive import Receiver

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


class Services:
    def __init__(self, receiver: Receiver, store_timeout: float) -> None:
        self.receiver = receiver
        self.store_timeout = store_timeout

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
        if request.dataset is None or not command.affected_sop_instance_uid:
            log.warning(
                "C-STORE without a dataset or SOP Instance UID from %s", request.origin.calling_ae
            )
            return Result(Outcome.CANNOT_UNDERSTAND, "C-STORE without a dataset or instance UID")
        received = Received(
            origin=request.origin,
            sop_class_uid=command.affected_sop_class_uid or request.abstract_syntax,
            sop_instance_uid=command.affected_sop_instance_uid,
            transfer_syntax=request.transfer_syntax,
            data=request.dataset,
            received_at=time.time(),
            started=request.completed_at,
        )
        try:
            result = await asyncio.wait_for(self.receiver.submit(received), self.store_timeout)
        except TimeoutError:
            log.error(
                "no answer for %s within %.0f s; answering out of resources",
                received.sop_instance_uid,
                self.store_timeout,
            )
            return Result(Outcome.OUT_OF_RESOURCES, "the engine is overloaded; try again later")
        except Exception as exc:  # the protocol edge: a bug never leaves a scanner hanging
            log.exception("pipeline failed for %s", received.sop_instance_uid)
            return Result(Outcome.PROCESSING_FAILURE, f"internal error: {exc!r}")
        self.receiver.latencies.append(time.monotonic() - received.started)
        return result
