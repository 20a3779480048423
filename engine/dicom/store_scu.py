"""The C-STORE SCU that performs the sub-operations of a C-MOVE (PS3.4 C.4.2.3, PS3.7 9.1.1).

Why a module of its own: the C-MOVE SCP decides *what* to send (a query on the index);
this module only knows *how* to push Part 10 files to another AE and to count what
happened, so that the SCP can turn the counts into its pending and final responses.

It is blocking code on pynetdicom's requestor API: ``send`` is meant to run in a worker
thread (``asyncio.to_thread``), one call per C-MOVE. Network trouble never raises: it
ends up in ``Progress.failed``. Only programming errors (a bad AE title, one half of the
Move Originator pair without the other) raise.

Rules:

- One association for the whole move. Its presentation contexts (``plan_contexts``): one
  per (SOP class, stored transfer syntax) pair, plus Explicit and Implicit VR Little
  Endian for every SOP class, each as a context of its own so that the destination
  accepts or refuses each syntax separately.
- Per instance (``route``): if the destination accepted the stored transfer syntax, the
  file is sent as it is, by path, never decoded (``STORE_SEND_CHUNKED_DATASET``). An
  instance stored in Explicit or Implicit VR Little Endian may also go in the other one
  (pydicom re-encodes the dataset it reads). A compressed instance whose syntax was
  refused is decompressed by ``decompress`` (given by the caller: a process pool) into
  an uncompressed syntax the destination accepted; without one, or when its pixel data
  cannot be decoded, that sub-operation fails and the others go on.
- The file is read for each sub-operation, never kept: a move may be a whole archive.
- Outcome of each sub-operation: success is ``completed``; the warning statuses of
  PS3.4 B.2.3 are ``warning``; anything else, no response, a file that cannot be read
  or does not match its index row is ``failed``, its UID in ``failed_uids``. When the
  association ends before the last instance (abort, DIMSE timeout, our own abort after
  a read error mid-message), every instance not yet sent fails.
- ``cancelled()`` is asked before each sub-operation; when true we stop, release, and
  return with ``remaining`` > 0, for the SCP's Cancel response.
- ``on_progress`` gets a copy of the counts after each sub-operation, and once more when
  the instances left fail all at once (association lost or never established).
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.transport import AddressInformation, AssociationSocket

from engine import status
from engine.dicom import dimse

log = logging.getLogger(__name__)

# Send a file given by path as its stored bytes, without decoding it with pydicom.
# pynetdicom reads this module-level switch in ``send_c_store``; it then requires an
# accepted context in exactly the stored syntax, which is the only case we send by path.
# Set once, here, never changed back (engine/dicom/scp.py does the same for its switch).
_config.STORE_SEND_CHUNKED_DATASET = True

# PS3.8 9.3.2.2: presentation context IDs are the odd numbers 1-255.
MAX_CONTEXTS = 128

# PS3.4 B.2.3 (table B.2-1): the Storage Service Class warnings a destination may answer.
# engine/status.py names what the engine answers as an SCP; these are what we receive.
COERCION_OF_DATA_ELEMENTS = 0xB000
ELEMENTS_DISCARDED = 0xB006
DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
STORE_WARNINGS = frozenset(
    {COERCION_OF_DATA_ELEMENTS, ELEMENTS_DISCARDED, DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING}
)

# The native syntaxes pydicom converts between by re-encoding, in order of preference.
UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))


@dataclass(frozen=True)
class Destination:
    """The C-MOVE destination: a configured remote AE."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Instance:
    """One instance to send, as indexed: ``path`` is the absolute path of its Part 10 file."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path


@dataclass
class Progress:
    """The sub-operation counts of the C-MOVE responses (PS3.4 C.4.2.1.5-8), and who failed."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    def copy(self) -> Progress:
        return dataclasses.replace(self, failed_uids=list(self.failed_uids))

    def count(self, sop_instance_uid: str, code: int) -> None:
        """One sub-operation ended with this C-STORE-RSP status."""
        self.remaining -= 1
        if code == status.SUCCESS:
            self.completed += 1
        elif code in STORE_WARNINGS:
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(sop_instance_uid)


class Route(Enum):
    """How an instance goes out on the negotiated association, or why it cannot."""

    AS_STORED = "the file's bytes, in the stored transfer syntax"
    REENCODED = "re-encoded into the other uncompressed syntax"
    NO_CONTEXT = "the destination accepted no presentation context for its SOP class"
    DECOMPRESSED = "decompressed, in an uncompressed syntax the destination accepted"
    NEEDS_DECOMPRESSION = (
        "the destination refused its compressed transfer syntax and no decompressor was given"
    )


class _ClosingSocket(AssociationSocket):
    """pynetdicom's socket wrapper, made to close its socket when ``shutdown()`` fails.

    pynetdicom 3.0.4 (and its main branch, May 2025's fix included) calls ``close()`` only
    after a successful ``shutdown()``, which raises ENOTCONN on a socket that never
    connected (nobody listening) or was reset, then drops the socket: it is closed by
    the garbage collector, with a ResourceWarning (an error under the test suite's
    ``-W error``). tests/burst.py works around it from outside; the refused connection
    can only be fixed here, where the socket is made.
    """

    def _shutdown_socket(self) -> None:
        sock = self.socket
        super()._shutdown_socket()
        if sock is not None:
            sock.close()  # idempotent


class _AE(AE):
    """An AE whose associations use ``_ClosingSocket``."""

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[ssl.SSLContext, str] | None,
    ) -> AssociationSocket:
        sock = _ClosingSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


class _Result(Enum):
    COMPLETED = "completed"
    WARNING = "warning"
    FAILED = "failed"
    LOST = "failed, and the association ended with it"


def _wake_on_close(event: evt.Event) -> None:
    """EVT_CONN_CLOSE: unblock a C-STORE waiting for its response.

    pynetdicom waits for a response on ``dimse.msg_queue`` until the DIMSE timeout even
    when the peer aborts or drops the connection meanwhile (it only notices after).
    An empty item is what the queue yields on a timeout, so ``send_c_store`` then
    takes its no-response path at once. Harmless otherwise: nothing reads the queue
    of a closed association.
    """
    event.assoc.dimse.msg_queue.put((None, None))


def plan_contexts(instances: Sequence[Instance]) -> list[tuple[str, str]]:
    """The (abstract syntax, transfer syntax) pairs to propose, at most ``MAX_CONTEXTS``.

    Order is priority: every stored pair first (the pairs with more instances first),
    then Explicit VR Little Endian for every SOP class, then Implicit VR Little Endian
    (classes with more instances first). Past 128 the tail is dropped: the uncompressed
    fallbacks go first, Implicit before Explicit, since one uncompressed syntax is enough
    for an uncompressed instance; only with more than 128 stored pairs do the rarest
    pairs lose their context, and their instances fail (or go re-encoded, if
    uncompressed and their class has an uncompressed context).
    """
    pairs = Counter((i.sop_class_uid, i.transfer_syntax) for i in instances)
    classes = Counter(i.sop_class_uid for i in instances)
    stored = [pair for pair, _ in pairs.most_common()]
    fallbacks = [(sop_class, ts) for ts in UNCOMPRESSED for sop_class, _ in classes.most_common()]
    plan = list(dict.fromkeys([*stored, *fallbacks]))
    if len(plan) > MAX_CONTEXTS:
        log.warning(
            "C-STORE: %d presentation contexts needed (%d stored pairs), proposing the first %d",
            len(plan),
            len(stored),
            MAX_CONTEXTS,
        )
    return plan[:MAX_CONTEXTS]


def route(
    instance: Instance, accepted: set[tuple[str, str]], can_decompress: bool = False
) -> Route:
    """How ``instance`` can be sent given the accepted (abstract, transfer syntax) pairs."""
    if (instance.sop_class_uid, instance.transfer_syntax) in accepted:
        return Route.AS_STORED
    uncompressed = {ts for sop_class, ts in accepted if sop_class == instance.sop_class_uid}
    uncompressed &= set(UNCOMPRESSED)
    if instance.transfer_syntax in UNCOMPRESSED and uncompressed:
        return Route.REENCODED
    if not any(sop_class == instance.sop_class_uid for sop_class, _ in accepted):
        return Route.NO_CONTEXT
    if uncompressed and can_decompress:
        return Route.DECOMPRESSED
    return Route.NEEDS_DECOMPRESSION


def send(
    destination: Destination,
    instances: Sequence[Instance],
    *,
    calling_ae: str,
    move_originator_ae: str | None = None,
    move_originator_message_id: int | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    timeout: float = 30.0,
    decompress: Callable[[Instance], Dataset] | None = None,
) -> Progress:
    """C-STORE ``instances`` to ``destination`` on one association; the final counts.

    ``move_originator_ae`` and ``move_originator_message_id`` (the C-MOVE requestor and
    its request's Message ID) go together into every C-STORE-RQ, or neither does.
    ``timeout`` bounds the TCP connection, the association negotiation, each response
    and any silence on the association.
    """
    if (move_originator_ae is None) != (move_originator_message_id is None):
        raise ValueError("move_originator_ae and move_originator_message_id go together")
    progress = Progress(remaining=len(instances))
    if not instances or cancelled():
        return progress

    ae = _AE(ae_title=calling_ae)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    contexts = [build_context(abstract, syntax) for abstract, syntax in plan_contexts(instances)]
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        contexts=contexts,
        evt_handlers=[(evt.EVT_CONN_CLOSE, _wake_on_close)],
    )
    if not assoc.is_established:
        log.warning(
            "C-STORE to %s: no association (%s); %d instance(s) failed",
            destination,
            _why_not_established(assoc),
            len(instances),
        )
        _fail_all(progress, instances, on_progress)
        return progress

    try:
        accepted = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
        }
        for index, instance in enumerate(instances):
            if cancelled():
                log.info(
                    "C-STORE to %s: cancelled with %d instance(s) remaining",
                    destination,
                    progress.remaining,
                )
                break
            if not assoc.is_established:  # the peer released or aborted in between
                _lost(destination, progress, instances[index:], on_progress)
                break
            message_id = index % dimse.MAX_MESSAGE_ID + 1
            result = _store(
                assoc,
                destination,
                instance,
                accepted,
                message_id,
                move_originator_ae,
                move_originator_message_id,
                decompress,
            )
            _count(progress, instance, result)
            if on_progress is not None:
                on_progress(progress.copy())
            if result is _Result.LOST:
                _lost(destination, progress, instances[index + 1 :], on_progress)
                break
    finally:
        if assoc.is_established:
            assoc.release()

    log.info(
        "C-STORE to %s: %d completed, %d warning, %d failed, %d remaining",
        destination,
        progress.completed,
        progress.warning,
        progress.failed,
        progress.remaining,
    )
    return progress


def _store(
    assoc: Association,
    destination: Destination,
    instance: Instance,
    accepted: set[tuple[str, str]],
    message_id: int,
    originator_ae: str | None,
    originator_id: int | None,
    decompress: Callable[[Instance], Dataset] | None = None,
) -> _Result:
    """One sub-operation; failures are logged here, with their reason."""
    uid = instance.sop_instance_uid
    how = route(instance, accepted, decompress is not None)
    if how is Route.DECOMPRESSED:
        assert decompress is not None
        try:
            if (mismatch := _mismatch(instance)) is not None:
                log.warning("C-STORE %s to %s failed: %s", uid, destination, mismatch)
                return _Result.FAILED
            decompressed = decompress(instance)
        except Exception as exc:  # a decoder's failure is the data's, not ours
            log.warning("C-STORE %s to %s failed: cannot decompress: %s", uid, destination, exc)
            return _Result.FAILED
        return _send(
            assoc, destination, uid, decompressed, message_id, originator_ae, originator_id
        )
    if how not in (Route.AS_STORED, Route.REENCODED):
        log.warning("C-STORE %s to %s failed: %s", uid, destination, how.value)
        return _Result.FAILED

    payload: Path | Dataset = instance.path
    try:
        mismatch = _mismatch(instance)
        if how is Route.REENCODED and mismatch is None:
            payload = dcmread(instance.path)
    # A damaged file raises whatever pydicom's parser trips on (InvalidDicomError,
    # EOFError, struct.error, KeyError, ...): it is data, not a bug of ours.
    except Exception as exc:
        log.warning(
            "C-STORE %s to %s failed: cannot read %s: %s", uid, destination, instance.path, exc
        )
        return _Result.FAILED
    if mismatch is not None:
        log.warning("C-STORE %s to %s failed: %s %s", uid, destination, instance.path, mismatch)
        return _Result.FAILED

    return _send(assoc, destination, uid, payload, message_id, originator_ae, originator_id)


def _send(
    assoc: Association,
    destination: Destination,
    uid: str,
    payload: Path | Dataset,
    message_id: int,
    originator_ae: str | None,
    originator_id: int | None,
) -> _Result:
    """Send one C-STORE-RQ and judge its response."""
    try:
        rsp = assoc.send_c_store(
            payload, msg_id=message_id, originator_aet=originator_ae, originator_id=originator_id
        )
    except (ValueError, AttributeError) as exc:
        # Raised before anything is sent (no context after all, cannot encode).
        log.warning("C-STORE %s to %s failed: %s", uid, destination, exc)
        return _Result.FAILED
    except OSError as exc:
        # The file went away while its fragments were being sent: the peer holds half a
        # message, so the association cannot go on.
        log.warning("C-STORE %s to %s failed mid-message, aborting: %s", uid, destination, exc)
        assoc.abort()
        return _Result.LOST
    except RuntimeError:
        # Not established any more: the peer ended it since our last look.
        if assoc.is_established:
            raise
        log.warning("C-STORE %s to %s failed: association ended", uid, destination)
        return _Result.LOST

    if "Status" not in rsp:
        # No response in time, an invalid one, or the peer aborted: pynetdicom has
        # aborted or is closing the association; wait for its thread to finish so that
        # nothing is sent on it any more.
        log.warning("C-STORE %s to %s failed: no valid response", uid, destination)
        assoc.join(assoc.acse_timeout)
        return _Result.LOST
    code = int(rsp.Status)
    if code == status.SUCCESS:
        return _Result.COMPLETED
    comment = rsp.get("ErrorComment", "")
    if code in STORE_WARNINGS:
        log.info("C-STORE %s to %s: warning 0x%04X %s", uid, destination, code, comment)
        return _Result.WARNING
    log.warning("C-STORE %s to %s failed: status 0x%04X %s", uid, destination, code, comment)
    return _Result.FAILED


def _mismatch(instance: Instance) -> str | None:
    """Why the file's meta information contradicts its index row, or None if it agrees."""
    meta = read_file_meta_info(instance.path)
    found = {
        "SOP Instance UID": (meta.get("MediaStorageSOPInstanceUID"), instance.sop_instance_uid),
        "SOP Class UID": (meta.get("MediaStorageSOPClassUID"), instance.sop_class_uid),
        "Transfer Syntax UID": (meta.get("TransferSyntaxUID"), instance.transfer_syntax),
    }
    for name, (in_file, indexed) in found.items():
        if in_file is None or str(in_file) != indexed:
            return f"has {name} {in_file}, the index says {indexed}"
    return None


def _count(progress: Progress, instance: Instance, result: _Result) -> None:
    progress.remaining -= 1
    if result is _Result.COMPLETED:
        progress.completed += 1
    elif result is _Result.WARNING:
        progress.warning += 1
    else:
        progress.failed += 1
        progress.failed_uids.append(instance.sop_instance_uid)


def _fail_all(
    progress: Progress,
    instances: Sequence[Instance],
    on_progress: Callable[[Progress], None] | None,
) -> None:
    for instance in instances:
        _count(progress, instance, _Result.FAILED)
    if on_progress is not None:
        on_progress(progress.copy())


def _lost(
    destination: Destination,
    progress: Progress,
    rest: Sequence[Instance],
    on_progress: Callable[[Progress], None] | None,
) -> None:
    """The association ended early: the instances not sent fail."""
    if rest:
        log.warning(
            "C-STORE to %s: association ended; %d instance(s) not sent failed",
            destination,
            len(rest),
        )
        _fail_all(progress, rest, on_progress)


def _why_not_established(assoc: Association) -> str:
    if assoc.is_rejected:
        return "rejected"
    if assoc.is_aborted:
        return "aborted"
    return "no connection or no answer in time"
