"""Inputs that break what P-DATA carries, on an established association: the PDV items,
the DIMSE command set (PS3.7 annex E), and the C-STORE dataset (PS3.5 section 7).

Each is followed by an A-RELEASE-RQ: an engine that answers the broken message with a
status (the "bad input gets a clear answer" promise) then releases at once.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from bench.fuzz import messages as m
from bench.fuzz.model import Ending
from bench.fuzz.seeds import Draft, Seeds, fragments, pdata, random_split
from engine.dicom import dimse, pdu
from engine.dicom.dimse import CommandField

RELEASE = pdu.RELEASE_RQ_PDU
LAST_COMMAND = pdu.MCH_COMMAND | pdu.MCH_LAST
_ELEMENT = struct.Struct("<HHL")  # implicit VR little endian: group, element, length
_US = struct.Struct("<H")
_UL = struct.Struct("<L")
MAX_COMMAND = dimse.MAX_COMMAND_SET_LENGTH


# -- P-DATA: the PDV items ---------------------------------------------------------------------


def p_data(rng: random.Random, seeds: Seeds, number: int) -> Draft:
    echo_command = _echo_command(1)
    kind = rng.choice(
        [
            "PDV item length 0 or 1", "PDV item length past the PDU", "bytes after the last PDV",
            "P-DATA without PDV", "context not proposed", "dataset fragment without command",
            "command fragment while a dataset is expected", "reserved control bits set",
            "command set over 64 KB", "C-ECHO in 1-byte fragments",
            "command and dataset in one PDU", "C-STORE on the Verification context",
            "C-ECHO on the CT context",
            "dataset on another context than its command", "8 C-ECHOs without waiting",
            "6 C-STOREs without waiting", "6 C-STOREs without waiting, then a reset",
        ]
    )  # fmt: skip
    first_store_pdu, *store_data = seeds.store
    if kind == "PDV item length 0 or 1":
        data = pdata(m.VERIFICATION_CONTEXT, LAST_COMMAND, echo_command, rng.randint(0, 1))
    elif kind == "PDV item length past the PDU":
        claimed = len(echo_command) + 2 + rng.randint(1, 100_000)
        data = pdata(m.VERIFICATION_CONTEXT, LAST_COMMAND, echo_command, claimed)
    elif kind == "bytes after the last PDV":
        whole = pdata(m.VERIFICATION_CONTEXT, LAST_COMMAND, echo_command)
        tail = rng.randbytes(rng.randint(1, 5))
        data = m.pdu_bytes(pdu.PDUType.P_DATA_TF, whole[pdu.HEADER :] + tail)
    elif kind == "P-DATA without PDV":
        data = m.pdu_bytes(pdu.PDUType.P_DATA_TF, b"")
    elif kind == "context not proposed":
        data = pdata(rng.choice([0, 2, 11, 127, 255]), LAST_COMMAND, echo_command)
    elif kind == "dataset fragment without command":
        data = store_data[-1]
    elif kind == "command fragment while a dataset is expected":
        data = first_store_pdu + seeds.echo[0]
    elif kind == "reserved control bits set":
        data = pdata(m.VERIFICATION_CONTEXT, LAST_COMMAND | rng.choice([0x04, 0x80, 0xFC]),
                     echo_command)  # fmt: skip
    elif kind == "command set over 64 KB":
        chunk = rng.randbytes(16000)
        data = b"".join(pdata(m.VERIFICATION_CONTEXT, pdu.MCH_COMMAND, chunk) for _ in range(5))
    elif kind == "C-ECHO in 1-byte fragments":
        data = fragments(m.VERIFICATION_CONTEXT, True, echo_command, [1] * len(echo_command))
    elif kind == "command and dataset in one PDU":
        ds = seeds.dataset(number)
        command = store_command(str(ds.SOPInstanceUID))
        items = b"".join(
            struct.pack(">LBB", len(part) + 2, m.CT_CONTEXT, control) + part
            for part, control in ((command, LAST_COMMAND), (m.dataset_bytes(ds), pdu.MCH_LAST))
        )
        data = m.pdu_bytes(pdu.PDUType.P_DATA_TF, items)
    elif kind == "C-STORE on the Verification context":
        data = b"".join(_retag(part, m.VERIFICATION_CONTEXT) for part in seeds.store)
    elif kind == "C-ECHO on the CT context":
        data = _retag(seeds.echo[0], m.CT_CONTEXT)
    elif kind == "8 C-ECHOs without waiting":
        data = b"".join(b"".join(m.echo_pdus(n)) for n in range(1, 9))
    elif kind.startswith("6 C-STOREs without waiting"):
        # More than the engine takes at once (it stops reading past 4 outstanding).
        datasets = [seeds.dataset(number * 8 + n) for n in range(6)]
        data = b"".join(b"".join(m.store_pdus(ds, n + 1)) for n, ds in enumerate(datasets))
        if kind.endswith("reset"):
            return Draft(kind, seeds.associated, data, Ending.RESET)
    else:
        data = first_store_pdu + b"".join(
            _retag(part, m.VERIFICATION_CONTEXT) for part in store_data
        )
    return Draft(kind, seeds.associated, data + RELEASE)


def _retag(pdata_pdu: bytes, context_id: int) -> bytes:
    """A one-PDV P-DATA-TF PDU moved to another presentation context."""
    raw = bytearray(pdata_pdu)
    raw[pdu.HEADER + pdu.PDV_LENGTH_FIELD] = context_id
    return bytes(raw)


# -- DIMSE command sets ----------------------------------------------------------------------


def _echo_command(message_id: int) -> bytes:
    return dimse.encode_request(
        CommandField.C_ECHO_RQ, message_id, affected_sop_class_uid=Verification
    )


def store_command(instance_uid: str, message_id: int = 1) -> bytes:
    return dimse.encode_request(
        CommandField.C_STORE_RQ,
        message_id,
        affected_sop_class_uid=CTImageStorage,
        affected_sop_instance_uid=instance_uid,
        has_dataset=True,
    )


def elements_of(command_set: bytes) -> list[tuple[int, bytes]]:
    """(element number, value) of each element of a group 0000 command set, group length
    left out."""
    out, pos = [], 0
    while pos < len(command_set):
        _, element, length = _ELEMENT.unpack_from(command_set, pos)
        start = pos + _ELEMENT.size
        if element != dimse.COMMAND_GROUP_LENGTH:
            out.append((element, command_set[start : start + length]))
        pos = start + length
    return out


def encode_elements(
    elements: list[tuple[int, bytes]], group: int = 0, group_length: int | None = -1
) -> bytes:
    """Elements back to a command set: with the true group length (-1), a given one, or
    none (None); ``group`` other than 0 breaks every tag."""
    body = b"".join(_ELEMENT.pack(group, e, len(v)) + v for e, v in elements)
    if group_length is None:
        return body
    value = len(body) if group_length == -1 else group_length
    return _ELEMENT.pack(group, dimse.COMMAND_GROUP_LENGTH, _UL.size) + _UL.pack(value) + body


@dataclass(frozen=True)
class _Message:
    name: str
    context_id: int
    command: bytes
    dataset: bytes | None


def _base_message(rng: random.Random, seeds: Seeds, number: int) -> _Message:
    """One valid request of each kind the engine serves; C-MOVE to a node it does not know."""
    kind = rng.choice(["C-ECHO", "C-STORE", "C-FIND", "C-MOVE", "C-GET", "C-CANCEL"])
    if kind == "C-ECHO":
        return _Message(kind, m.VERIFICATION_CONTEXT, _echo_command(number % 0xFFFF + 1), None)
    if kind == "C-STORE":
        ds = seeds.dataset(number)
        uid = str(ds.SOPInstanceUID)
        return _Message(kind, m.CT_CONTEXT, store_command(uid), m.dataset_bytes(ds))
    if kind == "C-CANCEL":
        command = dimse.encode_request(CommandField.C_CANCEL_RQ, rng.randint(1, 5))
        return _Message(kind, m.FIND_CONTEXT, command, None)
    field, sop_class, context = {
        "C-FIND": (CommandField.C_FIND_RQ, StudyRootQueryRetrieveInformationModelFind,
                   m.FIND_CONTEXT),
        "C-MOVE": (CommandField.C_MOVE_RQ, StudyRootQueryRetrieveInformationModelMove,
                   m.MOVE_CONTEXT),
        "C-GET": (CommandField.C_GET_RQ, StudyRootQueryRetrieveInformationModelGet, m.GET_CONTEXT),
    }[kind]  # fmt: skip
    command = dimse.encode_request(
        field,
        1,
        affected_sop_class_uid=sop_class,
        has_dataset=True,
        move_destination="NOWHERE" if kind == "C-MOVE" else None,
    )
    return _Message(kind, context, command, _identifier(rng, seeds))


def _identifier(rng: random.Random, seeds: Seeds) -> bytes:
    """A STUDY-level identifier in implicit VR: valid, or with one value broken."""
    ds = Dataset()
    ds.QueryRetrieveLevel = rng.choice(["STUDY", "SERIES", "IMAGE", "PATIENT", "NONSENSE", ""])
    ds.StudyInstanceUID = seeds.dataset(0).StudyInstanceUID
    ds.PatientName = rng.choice(["", "*", "Fuzz*", "\\", "A" * 200])
    ds.StudyDate = rng.choice(["", "20260101-", "-", "2026-01-01", "99999999"])
    ds.ModalitiesInStudy = ""
    data = m.dataset_bytes(ds, implicit=True)
    if _coin(rng, 0.3):
        raw = bytearray(data)
        raw[rng.randrange(len(raw))] = rng.randrange(256)
        data = bytes(raw)
    return data


def _coin(rng: random.Random, p: float = 0.5) -> bool:
    return rng.random() < p


COMMAND_MUTATIONS = (
    "drop an element", "US of the wrong size", "element length past the end",
    "wrong group length", "group length not first", "group length of 2 bytes", "no group length",
    "tag outside group 0000", "duplicate element", "non-ASCII UID", "unknown command field",
    "response command field", "N- command field", "data set type flipped", "empty command set",
    "command set cut", "trailing bytes", "UID of 200 characters", "empty UID",
    "move destination not ASCII", "message ID 0 or 0xFFFF", "priority out of range",
)  # fmt: skip


def command(rng: random.Random, seeds: Seeds, number: int) -> Draft:
    message = _base_message(rng, seeds, number)
    kind = rng.choice(COMMAND_MUTATIONS)
    elements = elements_of(message.command)
    dataset = message.dataset
    group = 0
    group_length: int | None = -1
    raw: bytes | None = None
    i = rng.randrange(len(elements))
    if kind == "drop an element":
        del elements[i]
    elif kind == "US of the wrong size":
        us = [j for j, (e, v) in enumerate(elements) if len(v) == _US.size] or [i]
        j = rng.choice(us)
        elements[j] = (elements[j][0], rng.randbytes(rng.choice([0, 1, 3, 4])))
    elif kind == "element length past the end":
        encoded = encode_elements(elements, group_length=None)
        offsets = _element_offsets(encoded)
        at = rng.choice(offsets) + 4
        raw = (
            encoded[:at]
            + _UL.pack(rng.choice([len(encoded), 0xFFFF, 0xFFFFFFFF]))
            + encoded[at + 4 :]
        )
    elif kind == "wrong group length":
        group_length = rng.choice(
            [0, 1, 0xFFFFFFFF, len(encode_elements(elements, group_length=None)) + 2]
        )
    elif kind == "group length not first":
        body = encode_elements(elements, group_length=None)
        raw = body + _ELEMENT.pack(0, dimse.COMMAND_GROUP_LENGTH, 4) + _UL.pack(len(body))
    elif kind == "group length of 2 bytes":
        body = encode_elements(elements, group_length=None)
        raw = _ELEMENT.pack(0, dimse.COMMAND_GROUP_LENGTH, 2) + _US.pack(len(body)) + body
    elif kind == "no group length":
        group_length = None
    elif kind == "tag outside group 0000":
        group = rng.choice([0x0002, 0x0008, 0xFFFE])
    elif kind == "duplicate element":
        elements.insert(i, elements[i])
    elif kind in ("non-ASCII UID", "UID of 200 characters", "empty UID"):
        value = {"non-ASCII UID": b"1.2.\xe9\xff", "UID of 200 characters": b"1." * 100,
                 "empty UID": b""}[kind]  # fmt: skip
        target = (
            dimse.AFFECTED_SOP_INSTANCE_UID
            if message.name == "C-STORE"
            else dimse.AFFECTED_SOP_CLASS_UID
        )
        elements = [(e, value if e == target else v) for e, v in elements]
    elif kind in ("unknown command field", "response command field", "N- command field"):
        field = {
            "unknown command field": rng.choice([0x0000, 0x0002, 0x0FFE, 0x7FFF, 0xFFFF]),
            "response command field": rng.choice([0x8001, 0x8030, 0x8020, 0x8FFF]),
            "N- command field": rng.choice([0x0100, 0x0110, 0x0120, 0x0130, 0x0140, 0x0150]),
        }[kind]
        elements = [(e, _US.pack(field) if e == dimse.COMMAND_FIELD else v) for e, v in elements]
    elif kind == "data set type flipped":
        present = dataset is not None
        flag = dimse.NO_DATASET if present else rng.choice([0x0000, 0x0001, 0xFEFE])
        elements = [
            (e, _US.pack(flag) if e == dimse.COMMAND_DATA_SET_TYPE else v) for e, v in elements
        ]
    elif kind == "empty command set":
        raw = b""
    elif kind == "command set cut":
        encoded = encode_elements(elements)
        raw = encoded[: rng.randrange(1, len(encoded))]
    elif kind == "trailing bytes":
        raw = encode_elements(elements) + rng.randbytes(rng.randint(1, 7))
    elif kind == "move destination not ASCII":
        elements.append((dimse.MOVE_DESTINATION, rng.choice([b"\xff\xfe" * 4, b"", b"X" * 17])))
    elif kind == "message ID 0 or 0xFFFF":
        value = _US.pack(rng.choice([0, 0xFFFF]))
        elements = [(e, value if e == dimse.MESSAGE_ID else v) for e, v in elements]
    else:  # priority out of range
        elements.append((dimse.PRIORITY, _US.pack(rng.choice([3, 0x7FFF, 0xFFFF]))))
    if raw is None:
        elements.sort(key=lambda ev: ev[0])  # stable: a duplicate stays next to its twin
        raw = encode_elements(elements, group, group_length)
    sizes = random_split(rng, len(raw)) if raw else []
    data = fragments(message.context_id, True, raw, sizes)
    if dataset is not None:
        data += fragments(message.context_id, False, dataset, random_split(rng, len(dataset)))
    return Draft(f"{message.name}: {kind}", seeds.associated, data + RELEASE)


def _element_offsets(encoded: bytes) -> list[int]:
    offsets, pos = [], 0
    while pos + _ELEMENT.size <= len(encoded):
        offsets.append(pos)
        pos += _ELEMENT.size + _ELEMENT.unpack_from(encoded, pos)[2]
    return offsets
