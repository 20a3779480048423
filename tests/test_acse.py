"""A-ASSOCIATE negotiation against requests and answers of pynetdicom and dcmtk."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import (
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE, build_role
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import AllStoragePresentationContexts, build_context

from engine.dicom import acse, pdu
from engine.dicom.acse import (
    AcceptorSettings,
    AssociateRequest,
    ContextResult,
    ProposedContext,
    RejectResult,
    RejectSource,
    UserIdentity,
    decode_associate_rq,
    encode_associate_ac,
    encode_associate_rj,
    negotiate,
    storage_like,
)
from engine.errors import ProtocolError
from tests.helpers import ct_dataset, dcmtk_env

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
PRIVATE_CLASS = "1.3.6.1.4.1.9590.100.1.2.999"
UNKNOWN_STANDARD_CLASS = "1.2.840.10008.5.1.4.1.1.999"
UNKNOWN_SYNTAX = "1.2.3.4.5.6.7.8.9"
# Presentation context IDs are the odd numbers 1-255: at most 128 contexts.
MAX_CONTEXTS = 128

SETTINGS = AcceptorSettings(
    ae_title="ENGINE",
    max_pdu_length=262144,
    implementation_class_uid="1.2.826.0.1.3680043.8.498.7301.1",
    implementation_version_name="INGEST_010",
    transfer_syntaxes=frozenset(str(uid) for uid in AllTransferSyntaxes),
    accepts_abstract=storage_like,
)
bounded = settings(max_examples=250, deadline=None)


# -- requests built with pynetdicom ------------------------------------------------------


@dataclass
class Proposal:
    contexts: list[tuple[str, list[str]]]
    calling_ae: str = "SCANNER"
    called_ae: str = "ENGINE"
    max_length: int = 16384
    version_name: str | None = "SCAN_1"
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    window: tuple[int, int] | None = None
    identity: UserIdentity | None = None
    extended: bool = False


def associate_rq(p: Proposal) -> bytes:
    """A whole A-ASSOCIATE-RQ PDU as pynetdicom encodes it."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = acse.DICOM_APPLICATION_CONTEXT
    primitive.calling_ae_title = p.calling_ae
    primitive.called_ae_title = p.called_ae
    contexts = []
    for i, (abstract, syntaxes) in enumerate(p.contexts):
        context = build_context(abstract, syntaxes)
        context.context_id = 2 * i + 1
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = p.max_length
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.3.4.5"
    info: list[Any] = [maximum, implementation]
    if p.version_name is not None:
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = p.version_name
        info.append(version)
    for uid, (scu, scp) in p.roles.items():
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = uid
        role.scu_role = scu
        role.scp_role = scp
        info.append(role)
    if p.window is not None:
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked, window.maximum_number_operations_performed = (
            p.window
        )
        info.append(window)
    if p.identity is not None:
        identity = UserIdentityNegotiation()
        identity.user_identity_type = p.identity.identity_type
        identity.primary_field = p.identity.primary_field
        identity.secondary_field = p.identity.secondary_field
        identity.positive_response_requested = p.identity.positive_response_requested
        info.append(identity)
    if p.extended:
        extended = SOPClassExtendedNegotiation()
        extended.sop_class_uid = CT
        extended.service_class_application_information = b"\x02\x00"
        info.append(extended)
    primitive.user_information = info
    encoded: bytes = A_ASSOCIATE_RQ(primitive).encode()
    return encoded


def body_of(encoded: bytes) -> memoryview:
    ((pdu_type, body),) = pdu.Framer(1 << 20).feed(encoded)
    assert pdu_type == pdu.PDUType.ASSOCIATE_RQ
    return body


def storage_proposal(**kwargs: Any) -> Proposal:
    """Like storescu: every storage class it can fit, three transfer syntaxes each."""
    syntaxes: list[str] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless]
    contexts = [(str(cx.abstract_syntax), syntaxes) for cx in AllStoragePresentationContexts]
    return Proposal(contexts=contexts[:MAX_CONTEXTS], **kwargs)


def decode_ac(encoded: bytes) -> A_ASSOCIATE_AC:
    ac = A_ASSOCIATE_AC()
    ac.decode(encoded)
    assert ac.pdu_length == len(encoded) - pdu.HEADER
    assert ac.encode() == encoded  # pynetdicom reads every byte the way we wrote it
    return ac


def user_items(ac: A_ASSOCIATE_AC) -> dict[type, list[Any]]:
    found: dict[type, list[Any]] = {}
    assert ac.user_information is not None
    for item in ac.user_information.to_primitive():
        found.setdefault(type(item), []).append(item)
    return found


# -- decoding ----------------------------------------------------------------------------


def test_decode_a_full_storage_request() -> None:
    proposal = storage_proposal(
        roles={CT: (True, True), MR: (True, False)},
        window=(5, 3),
        identity=UserIdentity(2, b"radiographer", b"secret", True),
        extended=True,
    )
    rq = decode_associate_rq(body_of(associate_rq(proposal)))
    assert (rq.called_ae, rq.calling_ae) == ("ENGINE", "SCANNER")
    assert rq.application_context == acse.DICOM_APPLICATION_CONTEXT
    assert rq.protocol_version == acse.PROTOCOL_VERSION
    assert len(rq.contexts) == MAX_CONTEXTS
    assert rq.contexts == tuple(
        ProposedContext(2 * i + 1, abstract, tuple(syntaxes))
        for i, (abstract, syntaxes) in enumerate(proposal.contexts)
    )
    assert rq.max_pdu_length == proposal.max_length
    assert (rq.implementation_class_uid, rq.implementation_version_name) == ("1.2.3.4.5", "SCAN_1")
    assert rq.roles == {CT: (True, True), MR: (True, False)}
    assert rq.async_window == (5, 3)
    assert rq.user_identity == UserIdentity(2, b"radiographer", b"secret", True)


def test_decode_a_minimal_request() -> None:
    proposal = Proposal(contexts=[(VERIFICATION, [ImplicitVRLittleEndian])], version_name=None)
    rq = decode_associate_rq(associate_rq(proposal)[pdu.HEADER :])
    assert rq.contexts == (ProposedContext(1, VERIFICATION, (ImplicitVRLittleEndian,)),)
    assert rq.implementation_version_name is None
    assert (rq.roles, rq.async_window, rq.user_identity) == ({}, None, None)


def test_decode_username_identity_without_secondary_field() -> None:
    identity = UserIdentity(1, b"tech", b"", False)
    rq = decode_associate_rq(body_of(associate_rq(storage_proposal(identity=identity))))
    assert rq.user_identity == identity


@dataclass
class Item:
    """A hand-built item, for requests pynetdicom refuses to encode."""

    item_type: int
    value: bytes

    def encode(self) -> bytes:
        return struct.pack(">BxH", self.item_type, len(self.value)) + self.value


def raw_rq(*items: bytes) -> bytes:
    fixed = struct.pack(">H2x16s16s32x", 1, b"ENGINE".ljust(16), b"SCANNER".ljust(16))
    return fixed + b"".join(items)


def context_item(context_id: int, *subs: bytes) -> bytes:
    return Item(0x20, bytes([context_id, 0, 0, 0]) + b"".join(subs)).encode()


APP = Item(0x10, acse.DICOM_APPLICATION_CONTEXT.encode()).encode()
ABSTRACT = Item(0x30, CT.encode()).encode()
SYNTAX = Item(0x40, ExplicitVRLittleEndian.encode()).encode()
USER = Item(0x50, Item(0x51, struct.pack(">L", 16384)).encode()).encode()


def test_hand_built_request_decodes() -> None:
    rq = decode_associate_rq(raw_rq(APP, context_item(1, ABSTRACT, SYNTAX), USER))
    assert rq.contexts == (ProposedContext(1, CT, (ExplicitVRLittleEndian,)),)
    assert rq.implementation_class_uid == ""


def test_padded_uids_and_titles_are_stripped() -> None:
    # Some implementations pad UIDs to an even length with NUL, and AE titles with NUL.
    fixed = struct.pack(">H2x16s16s32x", 1, b" ENGINE".ljust(16, b"\0"), b"SCANNER\0".ljust(16))
    padded = context_item(
        1, Item(0x30, CT.encode() + b"\0").encode(), Item(0x40, b"1.2.840.10008.1.2\0").encode()
    )
    rq = decode_associate_rq(fixed + APP + padded + USER)
    assert rq.contexts == (ProposedContext(1, CT, (ImplicitVRLittleEndian,)),)
    assert (rq.called_ae, rq.calling_ae) == ("ENGINE", "SCANNER")


def test_unknown_items_are_ignored() -> None:
    unknown = Item(0x7F, b"whatever").encode()
    user = Item(0x50, Item(0x51, struct.pack(">L", 0)).encode() + unknown).encode()
    rq = decode_associate_rq(raw_rq(APP, unknown, context_item(1, ABSTRACT, unknown, SYNTAX), user))
    assert (len(rq.contexts), rq.max_pdu_length) == (1, 0)


def test_missing_user_information_means_defaults() -> None:
    rq = decode_associate_rq(raw_rq(APP, context_item(1, ABSTRACT, SYNTAX)))
    assert (rq.max_pdu_length, rq.implementation_class_uid) == (0, "")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(raw_rq()[:-1], id="short fixed part"),
        pytest.param(raw_rq(context_item(1, ABSTRACT, SYNTAX), USER), id="no application context"),
        pytest.param(raw_rq(APP, APP, context_item(1, ABSTRACT, SYNTAX)), id="two app contexts"),
        pytest.param(raw_rq(APP, context_item(2, ABSTRACT, SYNTAX)), id="even context ID"),
        pytest.param(raw_rq(APP, context_item(0, ABSTRACT, SYNTAX)), id="context ID 0"),
        pytest.param(
            raw_rq(APP, context_item(1, ABSTRACT, SYNTAX), context_item(1, ABSTRACT, SYNTAX)),
            id="repeated context ID",
        ),
        pytest.param(raw_rq(APP, context_item(1, SYNTAX)), id="no abstract syntax"),
        pytest.param(raw_rq(APP, context_item(1, ABSTRACT, ABSTRACT, SYNTAX)), id="two abstract"),
        pytest.param(raw_rq(APP, context_item(1, ABSTRACT)), id="no transfer syntax"),
        pytest.param(raw_rq(APP, Item(0x20, b"\x01").encode()), id="short context item"),
        pytest.param(raw_rq(APP, USER, USER), id="two user information items"),
        pytest.param(raw_rq(APP)[:-1], id="truncated item"),
        pytest.param(raw_rq(APP, b"\x20\x00"), id="truncated item header"),
        pytest.param(raw_rq(APP, b"\x20\x00\xff\xff\x01"), id="item overrun"),
        pytest.param(
            raw_rq(APP, context_item(1, Item(0x30, b"1.2.\xff").encode(), SYNTAX)),
            id="non-ASCII UID",
        ),
        pytest.param(
            raw_rq(APP, Item(0x50, Item(0x51, b"\x00\x40").encode()).encode()),
            id="short maximum length",
        ),
        # Found by the network fuzzer: no answer fits in 1 to 6 bytes (bench/fuzz).
        pytest.param(
            raw_rq(APP, Item(0x50, Item(0x51, b"\x00\x00\x00\x01").encode()).encode()),
            id="maximum length 1",
        ),
        pytest.param(
            raw_rq(APP, Item(0x50, Item(0x51, b"\x00\x00\x00\x06").encode()).encode()),
            id="maximum length 6",
        ),
        pytest.param(
            raw_rq(APP, Item(0x50, Item(0x53, b"\x00\x01").encode()).encode()),
            id="short async window",
        ),
        pytest.param(
            raw_rq(
                APP, Item(0x50, Item(0x54, b"\x00\x05" + b"1.2" + b"\x01\x01").encode()).encode()
            ),
            id="role UID length overrun",
        ),
        pytest.param(
            raw_rq(APP, Item(0x50, Item(0x54, b"\x00").encode()).encode()), id="short role"
        ),
        pytest.param(
            raw_rq(APP, Item(0x50, Item(0x58, b"\x01\x00\x00\x09ab").encode()).encode()),
            id="identity primary overrun",
        ),
        pytest.param(
            raw_rq(APP, Item(0x50, Item(0x58, b"\x02\x00\x00\x01a\x00\x05ab").encode()).encode()),
            id="identity secondary overrun",
        ),
        pytest.param(
            raw_rq(APP, Item(0x50, Item(0x58, b"\x02\x00\x00\x01a\x00").encode()).encode()),
            id="identity secondary length truncated",
        ),
        pytest.param(raw_rq(APP, Item(0x50, Item(0x58, b"\x01").encode()).encode()), id="identity"),
    ],
)
def test_malformed_requests_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_associate_rq(body)


@pytest.mark.parametrize("maximum", [0, acse.SMALLEST_MAXIMUM_LENGTH, 0xFFFFFFFF])
def test_usable_maximum_lengths_are_accepted(maximum: int) -> None:
    """0 is "no limit"; 7 carries one byte of data per PDV, as slow as that is."""
    user = Item(0x50, Item(0x51, maximum.to_bytes(4, "big")).encode()).encode()
    rq = decode_associate_rq(raw_rq(APP, context_item(1, ABSTRACT, SYNTAX), user))
    assert rq.max_pdu_length == maximum


@bounded
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_protocol_error(body: bytes) -> None:
    with suppress(ProtocolError):
        decode_associate_rq(body)


VALID_RQ = associate_rq(
    Proposal(
        contexts=[
            (CT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
            (VERIFICATION, [ImplicitVRLittleEndian]),
        ],
        roles={CT: (True, True)},
        window=(2, 2),
        identity=UserIdentity(2, b"user", b"pass", True),
    )
)[pdu.HEADER :]


@bounded
@given(
    st.lists(st.tuples(st.integers(0, len(VALID_RQ) - 1), st.integers(0, 255)), max_size=6),
    st.integers(0, len(VALID_RQ)),
)
def test_damaged_requests_raise_only_protocol_error(
    damage: list[tuple[int, int]], keep: int
) -> None:
    body = bytearray(VALID_RQ)
    for at, value in damage:
        body[at] = value
    try:
        rq = decode_associate_rq(bytes(body[:keep]))
    except ProtocolError:
        return
    # Whatever decodes can be negotiated and answered.
    encode_associate_ac(rq, negotiate(rq, SETTINGS), SETTINGS)


# -- negotiation -------------------------------------------------------------------------


def request(*contexts: tuple[str, tuple[str, ...]], **kwargs: Any) -> AssociateRequest:
    return AssociateRequest(
        called_ae="ENGINE",
        calling_ae="SCANNER",
        application_context=acse.DICOM_APPLICATION_CONTEXT,
        contexts=tuple(
            ProposedContext(2 * i + 1, abstract, syntaxes)
            for i, (abstract, syntaxes) in enumerate(contexts)
        ),
        max_pdu_length=16384,
        implementation_class_uid="1.2.3.4.5",
        **kwargs,
    )


def test_negotiation_rules() -> None:
    rq = request(
        (CT, (UNKNOWN_SYNTAX, JPEG2000Lossless, ExplicitVRLittleEndian)),
        (CT, (ImplicitVRLittleEndian, JPEG2000Lossless)),
        (MR, (UNKNOWN_SYNTAX,)),
        (PATIENT_ROOT_FIND, (ImplicitVRLittleEndian,)),
        (PRIVATE_CLASS, (ExplicitVRLittleEndian,)),
        (VERIFICATION, (ImplicitVRLittleEndian,)),
        (UNKNOWN_STANDARD_CLASS, (DeflatedExplicitVRLittleEndian,)),
    )
    assert [(r.context_id, r.result, r.transfer_syntax) for r in negotiate(rq, SETTINGS)] == [
        (1, ContextResult.ACCEPTANCE, JPEG2000Lossless),  # first one we read wins
        (3, ContextResult.ACCEPTANCE, ImplicitVRLittleEndian),
        (5, ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED, UNKNOWN_SYNTAX),
        (7, ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, ImplicitVRLittleEndian),
        (9, ContextResult.ACCEPTANCE, ExplicitVRLittleEndian),
        (11, ContextResult.ACCEPTANCE, ImplicitVRLittleEndian),
        (13, ContextResult.ACCEPTANCE, DeflatedExplicitVRLittleEndian),
    ]


def test_a_context_refusing_both_roles_is_rejected_by_the_user() -> None:
    rq = request((CT, (ExplicitVRLittleEndian,)), roles={CT: (False, False)})
    (result,) = negotiate(rq, SETTINGS)
    assert result.result is ContextResult.USER_REJECTION


def test_the_settings_decide_which_abstract_syntaxes() -> None:
    only_ct = AcceptorSettings(
        "ENGINE", 0, "1.2.3", "", frozenset([ExplicitVRLittleEndian]), lambda uid: uid == CT
    )
    rq = request((CT, (ExplicitVRLittleEndian,)), (MR, (ExplicitVRLittleEndian,)))
    assert [r.result for r in negotiate(rq, only_ct)] == [
        ContextResult.ACCEPTANCE,
        ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED,
    ]


@pytest.mark.parametrize(
    ("uid", "accepted"),
    [
        (VERIFICATION, True),
        (CT, True),
        (MR, True),
        ("1.2.840.10008.5.1.4.1.1.1.1", True),  # digital X-ray
        (PRIVATE_CLASS, True),
        (UNKNOWN_STANDARD_CLASS, True),
        (PATIENT_ROOT_FIND, False),
        ("1.2.840.10008.5.1.4.1.2.2.3", False),  # study root C-GET
        (MODALITY_WORKLIST_FIND, False),
        (STORAGE_COMMITMENT, False),
        ("1.2.840.10008.3.1.2.3.3", False),  # modality performed procedure step (N-*)
        (ExplicitVRLittleEndian, False),  # a transfer syntax is no abstract syntax
    ],
)
def test_storage_like(uid: str, accepted: bool) -> None:
    assert storage_like(uid) is accepted


def test_storage_like_accepts_every_storage_class_pynetdicom_knows() -> None:
    assert all(storage_like(str(cx.abstract_syntax)) for cx in AllStoragePresentationContexts)


# -- the answers, read by pynetdicom -----------------------------------------------------


def test_accept_answers_what_was_proposed() -> None:
    proposal = storage_proposal(
        roles={CT: (True, True), MR: (True, False), PATIENT_ROOT_FIND: (True, False)},
        window=(5, 3),
        identity=UserIdentity(2, b"radiographer", b"secret", True),
    )
    proposal.contexts[-1] = (PATIENT_ROOT_FIND, [ImplicitVRLittleEndian])
    proposal.contexts[-2] = (CT, [UNKNOWN_SYNTAX])
    rq = decode_associate_rq(body_of(associate_rq(proposal)))
    results = negotiate(rq, SETTINGS)
    ac = decode_ac(encode_associate_ac(rq, results, SETTINGS))

    assert (ac.reserved_aet, ac.reserved_aec) == ("ENGINE", "SCANNER")
    assert ac.application_context_name == acse.DICOM_APPLICATION_CONTEXT
    answered = [(cx.context_id, cx.result, cx.transfer_syntax) for cx in ac.presentation_context]
    assert answered == [(r.context_id, r.result, r.transfer_syntax) for r in results]
    assert len(answered) == MAX_CONTEXTS
    assert answered[-1] == (
        255,
        ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED,
        ImplicitVRLittleEndian,
    )
    assert answered[-2] == (253, ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED, UNKNOWN_SYNTAX)
    assert answered[0][1:] == (ContextResult.ACCEPTANCE, ExplicitVRLittleEndian)

    items = user_items(ac)
    (maximum,) = items[MaximumLengthNotification]
    assert maximum.maximum_length_received == SETTINGS.max_pdu_length
    (implementation,) = items[ImplementationClassUIDNotification]
    assert implementation.implementation_class_uid == SETTINGS.implementation_class_uid
    (version,) = items[ImplementationVersionNameNotification]
    assert version.implementation_version_name == SETTINGS.implementation_version_name
    # Replies for the proposed roles whose SOP class was accepted, as proposed.
    roles = {
        r.sop_class_uid: (r.scu_role, r.scp_role) for r in items[SCP_SCU_RoleSelectionNegotiation]
    }
    assert roles == {CT: (True, True), MR: (True, False)}
    (window,) = items[AsynchronousOperationsWindowNegotiation]
    assert (
        window.maximum_number_operations_invoked,
        window.maximum_number_operations_performed,
    ) == (1, 1)
    (identity,) = items[UserIdentityNegotiation]
    assert identity.server_response == b""


def test_accept_without_options_has_no_optional_replies() -> None:
    rq = decode_associate_rq(
        body_of(associate_rq(storage_proposal(identity=UserIdentity(1, b"tech", b"", False))))
    )
    items = user_items(decode_ac(encode_associate_ac(rq, negotiate(rq, SETTINGS), SETTINGS)))
    assert set(items) == {
        MaximumLengthNotification,
        ImplementationClassUIDNotification,
        ImplementationVersionNameNotification,
    }


@pytest.mark.parametrize(
    ("result", "source", "reason"),
    [
        (
            RejectResult.PERMANENT,
            RejectSource.SERVICE_USER,
            acse.RejectReason.CALLED_AE_NOT_RECOGNIZED,
        ),
        (
            RejectResult.PERMANENT,
            RejectSource.SERVICE_USER,
            acse.RejectReason.APPLICATION_CONTEXT_NOT_SUPPORTED,
        ),
        (
            RejectResult.PERMANENT,
            RejectSource.SERVICE_USER,
            acse.RejectReason.CALLING_AE_NOT_RECOGNIZED,
        ),
        (RejectResult.PERMANENT, RejectSource.SERVICE_USER, acse.RejectReason.NO_REASON),
        (
            RejectResult.PERMANENT,
            RejectSource.SERVICE_PROVIDER_ACSE,
            acse.AcseRejectReason.PROTOCOL_VERSION_NOT_SUPPORTED,
        ),
        (
            RejectResult.TRANSIENT,
            RejectSource.SERVICE_PROVIDER_PRESENTATION,
            acse.PresentationRejectReason.LOCAL_LIMIT_EXCEEDED,
        ),
        (
            RejectResult.TRANSIENT,
            RejectSource.SERVICE_PROVIDER_PRESENTATION,
            acse.PresentationRejectReason.TEMPORARY_CONGESTION,
        ),
    ],
)
def test_reject_matches_pynetdicom(result: RejectResult, source: RejectSource, reason: int) -> None:
    ours = encode_associate_rj(result, source, reason)
    theirs = A_ASSOCIATE_RJ()
    theirs.decode(ours)
    assert (theirs.result, theirs.source, theirs.reason_diagnostic) == (result, source, reason)
    assert theirs.encode() == ours
    assert theirs.reason_str  # pynetdicom names the reason: it is valid for the source


def test_settings_refuse_values_that_would_break_every_answer() -> None:
    for bad in (
        {"ae_title": ""},
        {"ae_title": "X" * 17},
        {"implementation_version_name": "V" * 17},
    ):
        with pytest.raises(ValueError):
            AcceptorSettings(**{**SETTINGS.__dict__, **bad})


# -- real peers --------------------------------------------------------------------------


@contextmanager
def one_shot_acceptor(answer: bool) -> Iterator[tuple[int, list[bytes]]]:
    """A listener on an ephemeral port that takes one association.

    It keeps the A-ASSOCIATE-RQ body; if ``answer``, it accepts with our own
    negotiation, then releases if asked to, or aborts after the first P-DATA-TF.
    """
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        conn.settimeout(30)
        framer = pdu.Framer(1 << 20)
        with conn:
            while chunk := conn.recv(65536):
                for pdu_type, body in framer.feed(chunk):
                    if pdu_type == pdu.PDUType.ASSOCIATE_RQ:
                        received.append(bytes(body))
                        if not answer:
                            return
                        rq = decode_associate_rq(body)
                        conn.sendall(encode_associate_ac(rq, negotiate(rq, SETTINGS), SETTINGS))
                    elif pdu_type == pdu.PDUType.RELEASE_RQ:
                        conn.sendall(pdu.RELEASE_RP_PDU)
                    elif pdu_type == pdu.PDUType.P_DATA_TF:
                        conn.sendall(pdu.encode_abort(pdu.AbortSource.SERVICE_USER))
                        return
                    else:
                        return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], received
    finally:
        thread.join(timeout=30)
        server.close()


def run_dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), env=dcmtk_env(), capture_output=True, text=True, timeout=60, check=False
    )


needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed")


@pytest.mark.peers
@needs_dcmtk
def test_decode_storescu_request(tmp_path: Path) -> None:
    image = tmp_path / "ct.dcm"
    ct_dataset(generate_uid(), generate_uid(), 1).save_as(image, enforce_file_format=True)
    with one_shot_acceptor(answer=False) as (port, received):
        run_dcmtk(
            "storescu", "-aet", "CT_SCANNER", "-aec", "ENGINE", "127.0.0.1", str(port), str(image)
        )
    (body,) = received
    rq = decode_associate_rq(body)
    assert (rq.calling_ae, rq.called_ae) == ("CT_SCANNER", "ENGINE")
    assert len(rq.contexts) > 100
    assert CT in {cx.abstract_syntax for cx in rq.contexts}
    assert rq.max_pdu_length > 0
    assert rq.implementation_class_uid.startswith("1.2.276.0.7230010.3")  # OFFIS
    results = negotiate(rq, SETTINGS)
    assert all(r.result is ContextResult.ACCEPTANCE for r in results if r.abstract_syntax == CT)


@pytest.mark.peers
@needs_dcmtk
def test_decode_echoscu_request() -> None:
    with one_shot_acceptor(answer=False) as (port, received):
        run_dcmtk("echoscu", "-aet", "PINGER", "-aec", "ENGINE", "127.0.0.1", str(port))
    (body,) = received
    rq = decode_associate_rq(body)
    assert (rq.calling_ae, rq.called_ae) == ("PINGER", "ENGINE")
    assert [cx.abstract_syntax for cx in rq.contexts] == [VERIFICATION]
    ((result, syntax),) = [(r.result, r.transfer_syntax) for r in negotiate(rq, SETTINGS)]
    assert (result, syntax) == (ContextResult.ACCEPTANCE, ImplicitVRLittleEndian)


@pytest.mark.peers
@needs_dcmtk
def test_dcmtk_accepts_our_answer() -> None:
    with one_shot_acceptor(answer=True) as (port, _):
        done = run_dcmtk(
            "echoscu", "-v", "-aet", "PINGER", "-aec", "ENGINE", "127.0.0.1", str(port)
        )
    assert "Association Accepted" in done.stdout + done.stderr, done.stdout + done.stderr


def test_pynetdicom_accepts_our_answer_with_roles() -> None:
    ae = AE(ae_title="GETTER")
    ae.add_requested_context(CT, [JPEG2000Lossless, ExplicitVRLittleEndian])
    ae.add_requested_context(MR, [ExplicitVRLittleEndian])
    ae.add_requested_context(PATIENT_ROOT_FIND)
    roles: list[Any] = [
        build_role(CT, scu_role=True, scp_role=True),
        build_role(MR, scp_role=True),
    ]
    with one_shot_acceptor(answer=True) as (port, _):
        assoc = ae.associate("127.0.0.1", port, ae_title="ENGINE", ext_neg=roles)
        try:
            assert assoc.is_established
            accepted = {
                cx.abstract_syntax: (cx.transfer_syntax[0], cx.as_scu, cx.as_scp)
                for cx in assoc.accepted_contexts
            }
            # CT: both roles; MR: the requestor is only SCP, so it receives from us.
            assert accepted == {
                CT: (JPEG2000Lossless, True, True),
                MR: (ExplicitVRLittleEndian, False, True),
            }
            assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [PATIENT_ROOT_FIND]
            assert assoc.acceptor.maximum_length == SETTINGS.max_pdu_length
        finally:
            assoc.release()
    assert assoc.is_released
