"""A-ASSOCIATE negotiation as the acceptor (PS3.8 sections 7.1 and 9.3.2 - 9.3.4, PS3.7 annex D).

No I/O here: ``decode_associate_rq`` turns the body of an A-ASSOCIATE-RQ PDU into an
``AssociateRequest``, ``negotiate`` decides each proposed presentation context, and the
``encode_*`` functions build the answer PDUs. It runs once per association, so it is
written for clarity and strict bounds checking rather than speed; it is our own code
rather than pynetdicom's PDU classes so that every malformed request ends in one
``ProtocolError`` with a message, never in an ``IndexError`` or ``struct.error`` from
inside a library. The tests check it byte for byte against pynetdicom and dcmtk.

What the decoder accepts: PS3.8 leaves unknown items and sub-items to be ignored, and
real peers differ in padding (UIDs padded with NUL, AE titles with spaces or NUL), so
those are tolerated. What it refuses: any length that does not fit its container, a
missing or repeated application context, a presentation context without exactly one
abstract syntax and at least one transfer syntax, even or repeated context IDs, a
maximum length (1 to 6) too small to carry a single byte of data.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum

from pydicom.uid import UID
from pynetdicom import sop_class
from pynetdicom.presentation import AllStoragePresentationContexts

from engine.dicom.pdu import PDV_ITEM_HEADER, UNLIMITED, PDUType
from engine.errors import ProtocolError

DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
# Bit 0 of the protocol version field: version 1, the only one there is (PS3.8 9.3.2).
PROTOCOL_VERSION = 0x0001

# The fixed part of an A-ASSOCIATE-RQ/AC body (after the 6-byte PDU header):
# protocol version (2), reserved (2), called AE (16), calling AE (16), reserved (32).
_FIXED = struct.Struct(">H2x16s16s32x")
_PDU_HEADER = struct.Struct(">BxL")
AE_TITLE_LENGTH = 16
AE_PADDING = " \0"
UID_PADDING = " \0"
UID_MAX_LENGTH = 64

# Items and sub-items: type (1), reserved (1), length (2), value.
_ITEM = struct.Struct(">BxH")
ITEM_HEADER = _ITEM.size
ITEM_MAX_LENGTH = 0xFFFF
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">L")
_WINDOW = struct.Struct(">HH")
# Presentation context item (RQ and AC): context ID, reserved, result/reason, reserved.
_CONTEXT = struct.Struct(">BxBx")
# Role selection sub-item tail: SCU role, SCP role.
_ROLES = struct.Struct(">BB")
# User identity RQ head: identity type, positive response requested, primary length.
_IDENTITY = struct.Struct(">BBH")
_REJECT = struct.Struct(">BxLxBBB")
REJECT_BODY_LENGTH = 4

# The smallest maximum length a requestor may announce: a PDV item header and one byte
# of data (PS3.8 annex D.1). Below it no answer can be sent at all; found by the network
# fuzzer (bench/fuzz), where 1 to 6 made every answer fail in the encoder.
SMALLEST_MAXIMUM_LENGTH = PDV_ITEM_HEADER + 1

# Presentation context IDs are odd integers 1-255 (PS3.8 9.3.2.2).
CONTEXT_ID_MAX = 255


class ItemType(IntEnum):
    """Item and sub-item types of the A-ASSOCIATE PDUs (PS3.8 9.3.2, PS3.7 annex D.3.3)."""

    APPLICATION_CONTEXT = 0x10
    PRESENTATION_CONTEXT_RQ = 0x20
    PRESENTATION_CONTEXT_AC = 0x21
    ABSTRACT_SYNTAX = 0x30
    TRANSFER_SYNTAX = 0x40
    USER_INFORMATION = 0x50
    MAXIMUM_LENGTH = 0x51
    IMPLEMENTATION_CLASS_UID = 0x52
    ASYNCHRONOUS_OPERATIONS_WINDOW = 0x53
    ROLE_SELECTION = 0x54
    IMPLEMENTATION_VERSION_NAME = 0x55
    SOP_CLASS_EXTENDED_NEGOTIATION = 0x56
    SOP_CLASS_COMMON_EXTENDED_NEGOTIATION = 0x57
    USER_IDENTITY_RQ = 0x58
    USER_IDENTITY_AC = 0x59


class UserIdentityType(IntEnum):
    """User-Identity-Type values of PS3.7 D.3.3.7; the decoder keeps unknown ones as ints."""

    USERNAME = 1
    USERNAME_AND_PASSCODE = 2
    KERBEROS = 3
    SAML = 4
    JWT = 5


# Answer to an asynchronous operations window proposal: one operation at a time each
# way, which PS3.7 D.3.3.3 says every implementation supports.
SYNCHRONOUS_WINDOW = (1, 1)
IMPLEMENTATION_VERSION_NAME_MAX = 16


@dataclass(frozen=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class UserIdentity:
    """The requestor's User Identity sub-item (PS3.7 D.3.3.7); we log it, never check it."""

    identity_type: int
    primary_field: bytes
    secondary_field: bytes
    positive_response_requested: bool


@dataclass(frozen=True)
class AssociateRequest:
    """What an A-ASSOCIATE-RQ proposes. AE titles and UIDs come without their padding."""

    called_ae: str
    calling_ae: str
    application_context: str
    contexts: tuple[ProposedContext, ...]
    max_pdu_length: int  # the requestor's maximum P-DATA-TF length; 0 = unlimited
    implementation_class_uid: str
    implementation_version_name: str | None = None
    # SOP class UID -> (SCU role, SCP role) proposed for the requestor.
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    # (maximum operations invoked, maximum operations performed), if proposed.
    async_window: tuple[int, int] | None = None
    user_identity: UserIdentity | None = None
    protocol_version: int = PROTOCOL_VERSION


class ContextResult(IntEnum):
    """Result/reason of a presentation context (PS3.8 table 9-18)."""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


@dataclass(frozen=True)
class AcceptedContext:
    """The answer to one proposed context; despite the name, rejections too.

    ``transfer_syntax`` is the chosen one, or for a rejection the first one proposed:
    PS3.8 wants a transfer syntax sub-item in every answer, its value not significant.
    """

    context_id: int
    abstract_syntax: str
    result: ContextResult
    transfer_syntax: str


@dataclass(frozen=True)
class AcceptorSettings:
    ae_title: str
    max_pdu_length: int  # what we advertise; 0 = unlimited
    implementation_class_uid: str
    implementation_version_name: str
    transfer_syntaxes: frozenset[str]  # those we can read
    accepts_abstract: Callable[[str], bool]

    def __post_init__(self) -> None:
        """Refuse settings that would make every A-ASSOCIATE-AC we send malformed."""
        if not 0 < len(self.ae_title.strip()) <= AE_TITLE_LENGTH:
            raise ValueError(f"AE title {self.ae_title!r} must have 1 to 16 characters")
        if not 0 <= self.max_pdu_length <= 0xFFFFFFFF:
            raise ValueError(f"maximum PDU length {self.max_pdu_length} out of range")
        if not 0 < len(self.implementation_class_uid) <= UID_MAX_LENGTH:
            raise ValueError(f"implementation class UID {self.implementation_class_uid!r}")
        if len(self.implementation_version_name) > IMPLEMENTATION_VERSION_NAME_MAX:
            raise ValueError(
                f"implementation version name {self.implementation_version_name!r} "
                f"has more than {IMPLEMENTATION_VERSION_NAME_MAX} characters"
            )


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ result (PS3.8 table 9-21)."""

    PERMANENT = 1
    TRANSIENT = 2


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ source; each source has its own set of reasons below."""

    SERVICE_USER = 1
    SERVICE_PROVIDER_ACSE = 2
    SERVICE_PROVIDER_PRESENTATION = 3


class RejectReason(IntEnum):
    """Reasons when the source is the service user (us, deciding as the application)."""

    NO_REASON = 1
    APPLICATION_CONTEXT_NOT_SUPPORTED = 2
    CALLING_AE_NOT_RECOGNIZED = 3
    CALLED_AE_NOT_RECOGNIZED = 7


class AcseRejectReason(IntEnum):
    """Reasons when the source is the ACSE service provider."""

    NO_REASON = 1
    PROTOCOL_VERSION_NOT_SUPPORTED = 2


class PresentationRejectReason(IntEnum):
    """Reasons when the source is the presentation service provider."""

    TEMPORARY_CONGESTION = 1
    LOCAL_LIMIT_EXCEEDED = 2


# -- decoding -----------------------------------------------------------------------------


def _items(view: memoryview, what: str) -> Iterator[tuple[int, memoryview]]:
    """(type, value) of each item in ``view``, which they must fill exactly."""
    pos = 0
    size = len(view)
    while pos < size:
        if size - pos < ITEM_HEADER:
            raise ProtocolError(f"truncated item header in {what} at offset {pos}")
        item_type, length = _ITEM.unpack_from(view, pos)
        end = pos + ITEM_HEADER + length
        if end > size:
            raise ProtocolError(
                f"item 0x{item_type:02x} in {what} claims {length} bytes, "
                f"{size - pos - ITEM_HEADER} left"
            )
        yield item_type, view[pos + ITEM_HEADER : end]
        pos = end


def _uid(value: memoryview, what: str) -> str:
    try:
        return bytes(value).decode("ascii").strip(UID_PADDING)
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not an ASCII UID") from None


def _ae_title(value: bytes) -> str:
    # Latin-1 never fails and round-trips every byte: an odd AE title is the peer's
    # business (and a matter for rejection by AE title), not a broken PDU.
    return value.decode("latin-1").strip(AE_PADDING)


def _presentation_context(value: memoryview) -> ProposedContext:
    if len(value) < _CONTEXT.size:
        raise ProtocolError(f"presentation context item of {len(value)} bytes")
    context_id, _ = _CONTEXT.unpack_from(value)
    if context_id % 2 == 0:
        raise ProtocolError(f"presentation context ID {context_id} is not odd")
    what = f"presentation context {context_id}"
    abstract: list[str] = []
    transfer: list[str] = []
    for item_type, sub in _items(value[_CONTEXT.size :], what):
        if item_type == ItemType.ABSTRACT_SYNTAX:
            abstract.append(_uid(sub, f"abstract syntax of {what}"))
        elif item_type == ItemType.TRANSFER_SYNTAX:
            transfer.append(_uid(sub, f"transfer syntax of {what}"))
    if len(abstract) != 1:
        raise ProtocolError(f"{what} has {len(abstract)} abstract syntaxes, not one")
    if not transfer:
        raise ProtocolError(f"{what} proposes no transfer syntax")
    return ProposedContext(context_id, abstract[0], tuple(transfer))


def _role(value: memoryview) -> tuple[str, tuple[bool, bool]]:
    if len(value) < _U16.size:
        raise ProtocolError("truncated SCP/SCU role selection sub-item")
    (uid_length,) = _U16.unpack_from(value)
    if len(value) != _U16.size + uid_length + _ROLES.size:
        raise ProtocolError(
            f"SCP/SCU role selection sub-item of {len(value)} bytes with a {uid_length}-byte UID"
        )
    uid = _uid(value[_U16.size : _U16.size + uid_length], "role selection SOP class")
    scu, scp = _ROLES.unpack_from(value, _U16.size + uid_length)
    return uid, (bool(scu), bool(scp))


def _user_identity(value: memoryview) -> UserIdentity:
    if len(value) < _IDENTITY.size:
        raise ProtocolError("truncated user identity sub-item")
    identity_type, positive, primary_length = _IDENTITY.unpack_from(value)
    pos = _IDENTITY.size + primary_length
    if pos > len(value):
        raise ProtocolError(f"user identity primary field of {primary_length} bytes overruns")
    primary = bytes(value[_IDENTITY.size : pos])
    secondary = b""
    # The secondary field length is always there per PS3.7, but a missing one (after
    # an identity type that has no secondary field) harms nobody.
    if pos < len(value):
        if len(value) - pos < _U16.size:
            raise ProtocolError("truncated user identity secondary field length")
        (secondary_length,) = _U16.unpack_from(value, pos)
        pos += _U16.size
        if pos + secondary_length != len(value):
            raise ProtocolError(
                f"user identity secondary field of {secondary_length} bytes "
                f"in {len(value) - pos} left"
            )
        secondary = bytes(value[pos:])
    return UserIdentity(identity_type, primary, secondary, bool(positive))


@dataclass
class _UserInformation:
    max_pdu_length: int = 0
    implementation_class_uid: str = ""
    implementation_version_name: str | None = None
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    async_window: tuple[int, int] | None = None
    user_identity: UserIdentity | None = None


def _user_information(value: memoryview) -> _UserInformation:
    info = _UserInformation()
    for item_type, sub in _items(value, "user information"):
        if item_type == ItemType.MAXIMUM_LENGTH:
            if len(sub) != _U32.size:
                raise ProtocolError(f"maximum length sub-item of {len(sub)} bytes")
            (info.max_pdu_length,) = _U32.unpack_from(sub)
            if UNLIMITED < info.max_pdu_length < SMALLEST_MAXIMUM_LENGTH:
                raise ProtocolError(
                    f"maximum length {info.max_pdu_length} leaves no room for a PDV's data"
                )
        elif item_type == ItemType.IMPLEMENTATION_CLASS_UID:
            info.implementation_class_uid = _uid(sub, "implementation class UID")
        elif item_type == ItemType.IMPLEMENTATION_VERSION_NAME:
            info.implementation_version_name = bytes(sub).decode("latin-1").strip(AE_PADDING)
        elif item_type == ItemType.ASYNCHRONOUS_OPERATIONS_WINDOW:
            if len(sub) != _WINDOW.size:
                raise ProtocolError(f"asynchronous operations window of {len(sub)} bytes")
            info.async_window = _WINDOW.unpack_from(sub)
        elif item_type == ItemType.ROLE_SELECTION:
            uid, roles = _role(sub)
            info.roles[uid] = roles
        elif item_type == ItemType.USER_IDENTITY_RQ:
            info.user_identity = _user_identity(sub)
        # Extended negotiation (0x56, 0x57) and unknown sub-items are ignored: a
        # storage SCP has nothing to say to them, and no reply means "not supported".
    return info


def decode_associate_rq(body: bytes | memoryview) -> AssociateRequest:
    """The A-ASSOCIATE-RQ whose body (PDU without its 6-byte header) is ``body``."""
    view = memoryview(body)
    if len(view) < _FIXED.size:
        raise ProtocolError(f"A-ASSOCIATE-RQ of {len(view)} bytes, shorter than its fixed part")
    version, called, calling = _FIXED.unpack_from(view)
    application_context: list[str] = []
    contexts: list[ProposedContext] = []
    seen: set[int] = set()
    info: list[_UserInformation] = []
    for item_type, value in _items(view[_FIXED.size :], "A-ASSOCIATE-RQ"):
        if item_type == ItemType.APPLICATION_CONTEXT:
            application_context.append(_uid(value, "application context name"))
        elif item_type == ItemType.PRESENTATION_CONTEXT_RQ:
            context = _presentation_context(value)
            if context.context_id in seen:
                raise ProtocolError(f"presentation context ID {context.context_id} repeated")
            seen.add(context.context_id)
            contexts.append(context)
        elif item_type == ItemType.USER_INFORMATION:
            info.append(_user_information(value))
    if len(application_context) != 1:
        raise ProtocolError(
            f"A-ASSOCIATE-RQ has {len(application_context)} application contexts, not one"
        )
    if len(info) > 1:
        raise ProtocolError(f"A-ASSOCIATE-RQ has {len(info)} user information items")
    # A missing user information item is against PS3.8, but its defaults (no limit on
    # our PDUs, an anonymous implementation) let such a peer still be served.
    user = info[0] if info else _UserInformation()
    return AssociateRequest(
        called_ae=_ae_title(called),
        calling_ae=_ae_title(calling),
        application_context=application_context[0],
        contexts=tuple(contexts),
        max_pdu_length=user.max_pdu_length,
        implementation_class_uid=user.implementation_class_uid,
        implementation_version_name=user.implementation_version_name,
        roles=user.roles,
        async_window=user.async_window,
        user_identity=user.user_identity,
        protocol_version=version,
    )


# -- negotiation --------------------------------------------------------------------------

_STORAGE_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
_KNOWN_SOP_CLASSES = frozenset(
    str(value) for value in vars(sop_class).values() if isinstance(value, sop_class.SOPClass)
)
# pydicom's UID.type: "" when it does not know the UID.
_UNKNOWN_OR_SOP_CLASS = frozenset({"", "SOP Class"})


def storage_like(abstract_syntax: str) -> bool:
    """Whether we accept this abstract syntax: Verification and anything that may be stored.

    The rule is pynetdicom's unrestricted storage service: every storage SOP class it
    knows, every private UID, and every UID it does not know as some other SOP class
    (a storage class newer than pynetdicom is far likelier than anything else). Known
    SOP classes of other services (query/retrieve, worklist, N-* management ...) are
    refused until we serve them, and so are UIDs pydicom knows as something other
    than a SOP class (a transfer syntax proposed as an abstract syntax, say).
    """
    if abstract_syntax == VERIFICATION or abstract_syntax in _STORAGE_CLASSES:
        return True
    uid = UID(abstract_syntax)
    if uid.is_private:
        return True
    if abstract_syntax in _KNOWN_SOP_CLASSES:
        return False
    return uid.type in _UNKNOWN_OR_SOP_CLASS


def _answer(
    context: ProposedContext, roles: dict[str, tuple[bool, bool]], settings: AcceptorSettings
) -> AcceptedContext:
    first = context.transfer_syntaxes[0] if context.transfer_syntaxes else ""
    if not settings.accepts_abstract(context.abstract_syntax):
        return AcceptedContext(
            context.context_id,
            context.abstract_syntax,
            ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED,
            first,
        )
    # The requestor lists its transfer syntaxes in its order of preference; a scanner
    # proposing JPEG 2000 first wants to send it, so the first one we read wins.
    chosen = next(
        (ts for ts in context.transfer_syntaxes if ts in settings.transfer_syntaxes), None
    )
    if chosen is None:
        return AcceptedContext(
            context.context_id,
            context.abstract_syntax,
            ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED,
            first,
        )
    # A role selection refusing both roles leaves nothing to do on the context; PS3.7
    # D.3.3.4 and pynetdicom's SCP_SCU_ROLES answer it with a user rejection.
    if roles.get(context.abstract_syntax) == (False, False):
        return AcceptedContext(
            context.context_id, context.abstract_syntax, ContextResult.USER_REJECTION, first
        )
    return AcceptedContext(
        context.context_id, context.abstract_syntax, ContextResult.ACCEPTANCE, chosen
    )


def negotiate(rq: AssociateRequest, settings: AcceptorSettings) -> tuple[AcceptedContext, ...]:
    """The answer to each proposed context, in the order proposed.

    Abstract syntax refused -> 3; else the first proposed transfer syntax we support
    -> 0; none supported -> 4; both roles refused by the requestor's role selection -> 1.
    """
    return tuple(_answer(context, rq.roles, settings) for context in rq.contexts)


# -- encoding -----------------------------------------------------------------------------


def _item(item_type: int, value: bytes) -> bytes:
    # Everything of variable length in our answers echoes the request, so only a
    # pathological request can overflow an item; it gets the peer's error, not ours.
    if len(value) > ITEM_MAX_LENGTH:
        raise ProtocolError(f"item 0x{item_type:02x} would need {len(value)} bytes")
    return _ITEM.pack(item_type, len(value)) + value


def _ae_field(title: str) -> bytes:
    return title.encode("latin-1", "replace")[:AE_TITLE_LENGTH].ljust(AE_TITLE_LENGTH, b" ")


def _user_information_ac(
    rq: AssociateRequest, results: tuple[AcceptedContext, ...], settings: AcceptorSettings
) -> bytes:
    subs = [
        _item(ItemType.MAXIMUM_LENGTH, _U32.pack(settings.max_pdu_length)),
        _item(ItemType.IMPLEMENTATION_CLASS_UID, settings.implementation_class_uid.encode()),
    ]
    if rq.async_window is not None:
        subs.append(
            _item(ItemType.ASYNCHRONOUS_OPERATIONS_WINDOW, _WINDOW.pack(*SYNCHRONOUS_WINDOW))
        )
    # Role selection (PS3.7 D.3.3.4): the acceptor may keep or clear each proposed
    # role, never set one the requestor did not propose. We keep both as proposed,
    # like pynetdicom's unrestricted storage: the requestor as SCU stores to us, and
    # a requestor that also offers the SCP role (a C-GET SCU) loses nothing by it.
    # Only SOP classes with an accepted context get a reply; the rest are moot.
    accepted = {r.abstract_syntax for r in results if r.result is ContextResult.ACCEPTANCE}
    for uid, (scu, scp) in rq.roles.items():
        if uid in accepted:
            encoded = uid.encode("ascii")
            value = _U16.pack(len(encoded)) + encoded + _ROLES.pack(scu, scp)
            subs.append(_item(ItemType.ROLE_SELECTION, value))
    if settings.implementation_version_name:
        subs.append(
            _item(
                ItemType.IMPLEMENTATION_VERSION_NAME,
                settings.implementation_version_name.encode("ascii"),
            )
        )
    # PS3.7 D.3.3.7: a server response only when asked for. We do not check
    # identities, so the response is empty (nothing to prove for a username).
    if rq.user_identity is not None and rq.user_identity.positive_response_requested:
        subs.append(_item(ItemType.USER_IDENTITY_AC, _U16.pack(0)))
    return _item(ItemType.USER_INFORMATION, b"".join(subs))


def encode_associate_ac(
    rq: AssociateRequest, results: tuple[AcceptedContext, ...], settings: AcceptorSettings
) -> bytes:
    """The whole A-ASSOCIATE-AC PDU answering ``rq`` with ``results`` (from ``negotiate``).

    The called and calling AE titles are echoed as PS3.8 9.3.3 asks (not tested by
    the receiver); the presentation contexts keep the order of the request.
    """
    items = [_item(ItemType.APPLICATION_CONTEXT, rq.application_context.encode("ascii"))]
    for result in results:
        syntax = _item(ItemType.TRANSFER_SYNTAX, result.transfer_syntax.encode("ascii"))
        items.append(
            _item(
                ItemType.PRESENTATION_CONTEXT_AC,
                _CONTEXT.pack(result.context_id, result.result) + syntax,
            )
        )
    items.append(_user_information_ac(rq, results, settings))
    fixed = _FIXED.pack(PROTOCOL_VERSION, _ae_field(rq.called_ae), _ae_field(rq.calling_ae))
    body = fixed + b"".join(items)
    return _PDU_HEADER.pack(PDUType.ASSOCIATE_AC, len(body)) + body


def encode_associate_rj(result: RejectResult, source: RejectSource, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU; ``reason`` belongs to ``source``'s set of reasons."""
    return _REJECT.pack(PDUType.ASSOCIATE_RJ, REJECT_BODY_LENGTH, result, source, reason)
