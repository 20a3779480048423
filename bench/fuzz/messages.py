"""Valid DICOM messages as raw bytes: what a hand-made peer sends, and what the fuzzer mutates.

Two sources, on purpose:

- ``associate_rq``, ``store_exchange`` and ``dimse_pdus`` encode with pynetdicom's own
  PDU and DIMSE classes: the bytes a real pynetdicom SCU puts on the wire, independent
  of the engine's encoders (a bug shared by encoder and decoder would hide otherwise).
  ``store_exchange`` is the recorded valid C-STORE association the byte-flip and
  premature-close inputs start from.
- ``item``, ``pdu``, ``rq_body``, ``context_rq`` and ``user_information`` build an
  A-ASSOCIATE-RQ item by item, so that an input can break exactly one item.

``store_pdus`` (a C-STORE-RQ with our DIMSE encoder) is shared with
``tests/test_native_interop.py``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import build_context
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from engine.dicom import acse, dimse, pdu

CALLING_AE = "RAWPEER"
CALLED_AE = "ENGINE"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.9.7433.1"
MAX_PDU = 16384  # what the raw peer says it receives

# The presentation contexts a raw peer proposes: odd IDs, one transfer syntax each, so
# the accepted syntax is known without reading the A-ASSOCIATE-AC.
CT_CONTEXT = 1
VERIFICATION_CONTEXT = 3
FIND_CONTEXT = 5
MOVE_CONTEXT = 7
GET_CONTEXT = 9
CT_ONLY: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (CT_CONTEXT, CTImageStorage, (ExplicitVRLittleEndian,)),
)
ALL_CONTEXTS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    *CT_ONLY,
    (VERIFICATION_CONTEXT, Verification, (ImplicitVRLittleEndian,)),
    (FIND_CONTEXT, StudyRootQueryRetrieveInformationModelFind, (ImplicitVRLittleEndian,)),
    (MOVE_CONTEXT, StudyRootQueryRetrieveInformationModelMove, (ImplicitVRLittleEndian,)),
    (GET_CONTEXT, StudyRootQueryRetrieveInformationModelGet, (ImplicitVRLittleEndian,)),
)

_PDU_HEADER = struct.Struct(">BxL")
_ITEM_HEADER = struct.Struct(">BxH")
_U32 = struct.Struct(">L")
_FIXED = struct.Struct(">H2x16s16s32x")
_CONTEXT = struct.Struct(">BxBx")


# -- the A-ASSOCIATE-RQ ----------------------------------------------------------------


def associate_rq(
    max_pdu: int = MAX_PDU,
    called_ae: str = CALLED_AE,
    calling_ae: str = CALLING_AE,
    contexts: Sequence[tuple[int, str, Sequence[str]]] = CT_ONLY,
) -> bytes:
    """An A-ASSOCIATE-RQ encoded by pynetdicom; by default CT Image Storage in explicit
    VR little endian as context 1."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = acse.DICOM_APPLICATION_CONTEXT
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    proposed = []
    for context_id, abstract_syntax, syntaxes in contexts:
        context = build_context(abstract_syntax, list(syntaxes))
        context.context_id = context_id
        proposed.append(context)
    primitive.presentation_context_definition_list = proposed
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    primitive.user_information = [maximum, implementation]
    encoded: bytes = A_ASSOCIATE_RQ(primitive).encode()
    return encoded


def item(item_type: int, value: bytes, length: int | None = None) -> bytes:
    """An item or sub-item (PS3.8 9.3.2); ``length`` overrides the true one (to lie)."""
    return _ITEM_HEADER.pack(item_type, len(value) if length is None else length) + value


def pdu_bytes(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU of any type byte; ``length`` overrides the true one (to lie)."""
    return _PDU_HEADER.pack(pdu_type, len(body) if length is None else length) + body


def context_rq(context_id: int, abstract_syntax: str, syntaxes: Sequence[str]) -> bytes:
    """A presentation context item of an A-ASSOCIATE-RQ."""
    subs = item(acse.ItemType.ABSTRACT_SYNTAX, abstract_syntax.encode()) + b"".join(
        item(acse.ItemType.TRANSFER_SYNTAX, syntax.encode()) for syntax in syntaxes
    )
    return item(acse.ItemType.PRESENTATION_CONTEXT_RQ, _CONTEXT.pack(context_id, 0) + subs)


def user_information(max_pdu: int = MAX_PDU, extra: Sequence[bytes] = ()) -> bytes:
    subs = [
        item(acse.ItemType.MAXIMUM_LENGTH, _U32.pack(max_pdu)),
        item(acse.ItemType.IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_CLASS_UID.encode()),
        *extra,
    ]
    return item(acse.ItemType.USER_INFORMATION, b"".join(subs))


def rq_items(
    max_pdu: int = MAX_PDU, contexts: Sequence[tuple[int, str, Sequence[str]]] = ALL_CONTEXTS
) -> list[bytes]:
    """The items of a valid A-ASSOCIATE-RQ body, in order, each ready to be broken."""
    return [
        item(acse.ItemType.APPLICATION_CONTEXT, acse.DICOM_APPLICATION_CONTEXT.encode()),
        *(context_rq(*context) for context in contexts),
        user_information(max_pdu),
    ]


def rq_body(
    items: Sequence[bytes],
    called_ae: bytes = CALLED_AE.encode(),
    calling_ae: bytes = CALLING_AE.encode(),
    version: int = acse.PROTOCOL_VERSION,
) -> bytes:
    """The body of an A-ASSOCIATE-RQ PDU (without its 6-byte header)."""
    fixed = _FIXED.pack(version, called_ae.ljust(16, b" "), calling_ae.ljust(16, b" "))
    return fixed + b"".join(items)


# -- datasets and DIMSE messages -----------------------------------------------------------


def small_ct(tag: str, number: int, size: int = 16, study_uid: str | None = None) -> Dataset:
    """A small but complete CT image; its UIDs are a function of (``tag``, ``number``)."""
    rng = np.random.default_rng(abs(hash_text(f"{tag}/{number}")))
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[tag, "instance", str(number)])
    ds.PatientID = f"FUZZ-{tag}"[:64]
    ds.PatientName = "Fuzz^Peer"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid or generate_uid(entropy_srcs=[tag, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[tag, "series", str(number // 100)])
    ds.StudyDate = "20260101"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "FUZZ"
    ds.StudyID = "1"
    ds.Modality = "CT"
    ds.SeriesNumber = 1 + number // 100
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = rng.integers(-1000, 2000, (size, size), dtype=np.int16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def hash_text(text: str) -> int:
    """A stable 63-bit hash (``hash()`` of a str changes from run to run)."""
    value = 0xCBF29CE484222325
    for byte in text.encode():
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value >> 1


def dataset_bytes(ds: Dataset, implicit: bool = False) -> bytes:
    """``ds`` encoded little endian, explicit VR unless ``implicit``."""
    data = encode(ds, implicit, True)
    assert data is not None
    return bytes(data)


def store_pdus(
    ds: Dataset, message_id: int = 1, max_pdu: int = MAX_PDU, context_id: int = CT_CONTEXT
) -> list[bytes]:
    """A C-STORE-RQ of ``ds`` as P-DATA-TF PDUs (our DIMSE encoder): the command, then
    the dataset fragments."""
    command = dimse.encode_request(
        dimse.CommandField.C_STORE_RQ,
        message_id,
        affected_sop_class_uid=CTImageStorage,
        affected_sop_instance_uid=str(ds.SOPInstanceUID),
        has_dataset=True,
    )
    return pdu.encode_pdata(context_id, True, command, 0) + pdu.encode_pdata(
        context_id, False, dataset_bytes(ds), max_pdu
    )


def dimse_pdus(message: DIMSEMessage, context_id: int, max_pdu: int = MAX_PDU) -> list[bytes]:
    """A DIMSE message as pynetdicom sends it: its P-DATA-TF PDUs."""
    return [P_DATA_TF(p).encode() for p in message.encode_msg(context_id, max_pdu)]


def echo_pdus(message_id: int = 1) -> list[bytes]:
    """A C-ECHO-RQ as pynetdicom's SCU encodes it, on the Verification context."""
    primitive = C_ECHO()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = Verification
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return dimse_pdus(message, VERIFICATION_CONTEXT)


def pynetdicom_store_pdus(ds: Dataset, message_id: int = 1, max_pdu: int = MAX_PDU) -> list[bytes]:
    """A C-STORE-RQ of ``ds`` as pynetdicom's SCU encodes it (priority medium)."""
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = UID(CTImageStorage)
    primitive.AffectedSOPInstanceUID = UID(str(ds.SOPInstanceUID))
    primitive.Priority = 0
    primitive.DataSet = BytesIO(dataset_bytes(ds))
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return dimse_pdus(message, CT_CONTEXT, max_pdu)


@dataclass(frozen=True)
class Exchange:
    """A whole valid association as a requestor sends it, message by message: the
    A-ASSOCIATE-RQ, each DIMSE request (its PDUs), the A-RELEASE-RQ. A requestor waits
    for the answer to each message before it sends the next (PS3.8: no P-DATA before
    the A-ASSOCIATE-AC; an asynchronous window of one operation)."""

    messages: tuple[tuple[bytes, ...], ...]

    @property
    def pdus(self) -> tuple[bytes, ...]:
        return tuple(part for message in self.messages for part in message)

    @property
    def data(self) -> bytes:
        return b"".join(self.pdus)

    @property
    def pauses(self) -> tuple[int, ...]:
        """The offsets in ``data`` after which the requestor waits for an answer."""
        ends, pos = [], 0
        for message in self.messages[:-1]:
            pos += sum(len(part) for part in message)
            ends.append(pos)
        return tuple(ends)


def store_exchange(ds: Dataset, max_pdu: int = 1024) -> Exchange:
    """The recorded valid C-STORE exchange: pynetdicom's bytes for one C-ECHO and one
    C-STORE of ``ds`` (its dataset in PDUs of at most ``max_pdu``), then the release."""
    return Exchange(
        (
            (associate_rq(contexts=ALL_CONTEXTS),),
            tuple(echo_pdus(1)),
            tuple(pynetdicom_store_pdus(ds, 2, max_pdu)),
            (pdu.RELEASE_RQ_PDU,),
        )
    )
