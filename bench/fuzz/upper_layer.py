"""Inputs that break the upper layer (PS3.8): PDU framing, the A-ASSOCIATE-RQ, the state
machine, and the recorded exchange flipped or cut.

Every associated input ends with an A-RELEASE-RQ, so an engine that shrugs the breakage
off answers A-RELEASE-RP at once instead of waiting for its idle timeout.
"""

from __future__ import annotations

import random
import struct

from bench.fuzz import messages as m
from bench.fuzz.model import Ending, Step
from bench.fuzz.seeds import (
    CONTROL_PDU_MAX,
    ENGINE_MAX_PDU,
    Draft,
    Seeds,
    application_context,
    pdata,
)
from engine.dicom import acse, pdu
from engine.dicom.acse import ItemType

T = pdu.PDUType
RELEASE = pdu.RELEASE_RQ_PDU
KNOWN_TYPES = frozenset(int(t) for t in T)
UNKNOWN_TYPES = (0x00, 0x08, 0x09, 0x10, 0x16, 0x47, 0x7F, 0x80, 0xFF)
# Lengths that have broken framers: 0, tiny, sign bit, all ones, one past each bound.
ABSURD_LENGTHS = (
    0, 1, 3, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, ENGINE_MAX_PDU, ENGINE_MAX_PDU + 1,
    CONTROL_PDU_MAX, CONTROL_PDU_MAX + 1,
)  # fmt: skip
HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: fuzz\r\n\r\n"
# The first bytes of a TLS 1.2 ClientHello: a client speaking TLS to a plain port.
TLS_HELLO = bytes.fromhex("160301020001000200fc03") + bytes(32)


def _coin(rng: random.Random, p: float = 0.5) -> bool:
    return rng.random() < p


def valid(rng: random.Random, seeds: Seeds, number: int) -> Draft:
    """The control input: the recorded exchange as it was recorded."""
    return Draft("recorded exchange", (), seeds.exchange.data, pauses=seeds.exchange.pauses)


def garbage(rng: random.Random, seeds: Seeds, number: int) -> Draft:
    kind = rng.choice(["random bytes", "random after a PDU type", "zeros", "HTTP", "TLS"])
    if kind == "random bytes":
        data = rng.randbytes(rng.randint(1, 4096))
    elif kind == "random after a PDU type":
        data = bytes([rng.randint(1, 7)]) + rng.randbytes(rng.randint(1, 512))
    elif kind == "zeros":
        data = bytes(rng.randint(1, 2048))
    elif kind == "HTTP":
        data = HTTP_REQUEST
    else:
        data = TLS_HELLO
    ending = Ending.FIN if _coin(rng, 0.2) else Ending.WAIT
    return Draft(kind, (), data, ending, f"{len(data)} bytes")


def truncated(rng: random.Random, seeds: Seeds, number: int) -> Draft:
    """A valid PDU cut short, then silence (the engine's timer must end it) or a close."""
    ending = Ending.FIN if _coin(rng, 0.4) else Ending.WAIT
    preamble: tuple[Step, ...]
    if _coin(rng, 0.4):
        whole, name, preamble = seeds.rq, "A-ASSOCIATE-RQ", ()
    else:
        name, whole = rng.choice(
            [
                ("C-ECHO P-DATA", seeds.echo[0]),
                ("C-STORE command P-DATA", seeds.store[0]),
                ("C-STORE data P-DATA", seeds.store[-1]),
                ("A-RELEASE-RQ", RELEASE),
                ("A-ABORT", pdu.encode_abort(pdu.AbortSource.SERVICE_USER)),
            ]
        )
        preamble = seeds.associated
    cut = rng.randrange(1, len(whole))
    state = "Sta2" if not preamble else "Sta6"
    return Draft(
        f"{name} cut, then {ending}", preamble, whole[:cut], ending, f"{state} {cut}/{len(whole)}"
    )


def absurd_length(rng: random.Random, seeds: Seeds, number: int) -> Draft:
    pdu_type = rng.choice([T.P_DATA_TF] * 4 + [T.ASSOCIATE_RQ, T.ASSOCIATE_AC, T.ASSOCIATE_RJ,
                           T.RELEASE_RQ, T.RELEASE_RP, T.ABORT])  # fmt: skip
    length = rng.choice(ABSURD_LENGTHS)
    associated = pdu_type is not T.ASSOCIATE_RQ and _coin(rng, 0.7)
    body_kind = rng.choice(["no body", "random body", "valid body"])
    if body_kind == "no body":
        body = b""
    elif body_kind == "random body":
        body = rng.randbytes(rng.randint(1, 64))
    else:
        body = {T.ASSOCIATE_RQ: seeds.rq, T.ASSOCIATE_AC: seeds.rq, T.P_DATA_TF: seeds.echo[0]}.get(
            pdu_type, bytes(4)
        )[pdu.HEADER if pdu_type in (T.ASSOCIATE_RQ, T.ASSOCIATE_AC, T.P_DATA_TF) else 0 :]
    data = m.pdu_bytes(pdu_type, body, length)
    if len(body) >= length:
        data += RELEASE  # a short length: the rest reads as further PDUs
    state = "Sta6" if associated else "Sta2"
    ending = Ending.FIN if _coin(rng, 0.3) else Ending.WAIT
    return Draft(
        f"{T(pdu_type).name} length 0x{length:X} in {state}",
        seeds.associated if associated else (),
        data,
        ending,
        f"{body_kind}, {len(body)} bytes sent",
    )


# -- A-ASSOCIATE-RQ with one thing broken ------------------------------------------------

_U32 = struct.Struct(">L")
_SUB = struct.Struct(">BxH")


def _broken_rq(rng: random.Random) -> tuple[str, bytes]:
    """(what is broken, the body of an A-ASSOCIATE-RQ PDU)."""
    items = m.rq_items()
    contexts = m.ALL_CONTEXTS
    called, calling, version = m.CALLED_AE.encode(), m.CALLING_AE.encode(), acse.PROTOCOL_VERSION
    kind = rng.choice(
        [
            "item length past the PDU", "item length short", "item length zero",
            "no application context", "two application contexts", "unknown application context",
            "no presentation context", "context without abstract syntax",
            "context with two abstract syntaxes", "context without transfer syntax",
            "even context ID", "context ID 0", "duplicate context ID", "200 contexts",
            "context item of 2 bytes", "non-ASCII abstract syntax", "UID of 200 characters",
            "empty abstract syntax", "sub-item length past its item", "maximum length 0",
            "maximum length 1..6", "maximum length 0xFFFFFFFF",
            "maximum length sub-item of 2 bytes", "no user information", "no maximum length",
            "user identity lengths past the item",
            "role selection UID length past the item", "async window of 2 bytes",
            "unknown sub-item", "empty implementation class UID",
            "implementation version name of 100 bytes", "extended negotiation broken",
            "protocol version 0", "protocol version 0xFFFF", "called AE empty",
            "called AE not ASCII", "fixed part truncated", "trailing bytes", "unknown item",
            "random item bytes",
        ]
    )  # fmt: skip
    i = rng.randrange(len(items))
    if kind == "item length past the PDU":
        value = items[i][acse.ITEM_HEADER :]
        items[i] = items[i][:2] + struct.pack(">H", rng.randint(len(value) + 1, 0xFFFF)) + value
    elif kind == "item length short":
        value = items[i][acse.ITEM_HEADER :]
        items[i] = items[i][:2] + struct.pack(">H", rng.randrange(len(value))) + value
    elif kind == "item length zero":
        items[i] = items[i][:2] + b"\x00\x00" + items[i][acse.ITEM_HEADER :]
    elif kind == "no application context":
        items = items[1:]
    elif kind == "two application contexts":
        items.insert(rng.randrange(1, len(items)), application_context())
    elif kind == "unknown application context":
        items[0] = m.item(ItemType.APPLICATION_CONTEXT, rng.choice([b"1.2.3", b"", b"\xff\xfe"]))
    elif kind == "no presentation context":
        items = [items[0], items[-1]]
    elif kind.startswith("context with") or kind.startswith("context without"):
        syntax = m.item(ItemType.ABSTRACT_SYNTAX, contexts[0][1].encode())
        transfer = m.item(ItemType.TRANSFER_SYNTAX, contexts[0][2][0].encode())
        subs = {
            "context without abstract syntax": transfer,
            "context with two abstract syntaxes": syntax + syntax + transfer,
            "context without transfer syntax": syntax,
        }[kind]
        items[1] = m.item(ItemType.PRESENTATION_CONTEXT_RQ, bytes([1, 0, 0, 0]) + subs)
    elif kind in ("even context ID", "context ID 0", "duplicate context ID"):
        new_id = {"even context ID": 2, "context ID 0": 0, "duplicate context ID": 3}[kind]
        items[1] = m.context_rq(new_id, *contexts[0][1:])
    elif kind == "200 contexts":
        extra = [m.context_rq(1 + 2 * (n % 128), *contexts[0][1:]) for n in range(200)]
        items = [items[0], *extra, items[-1]]
    elif kind == "context item of 2 bytes":
        items[1] = m.item(ItemType.PRESENTATION_CONTEXT_RQ, b"\x01\x00")
    elif kind in ("non-ASCII abstract syntax", "UID of 200 characters", "empty abstract syntax"):
        uid = {"non-ASCII abstract syntax": "1.2.\u00e9", "UID of 200 characters": "1." * 100,
               "empty abstract syntax": ""}[kind]  # fmt: skip
        items[1] = m.item(
            ItemType.PRESENTATION_CONTEXT_RQ,
            bytes([1, 0, 0, 0])
            + m.item(ItemType.ABSTRACT_SYNTAX, uid.encode("utf-8"))
            + m.item(ItemType.TRANSFER_SYNTAX, contexts[0][2][0].encode()),
        )
    elif kind == "sub-item length past its item":
        syntax = contexts[0][2][0].encode()
        lie = m.item(ItemType.TRANSFER_SYNTAX, syntax, rng.randint(len(syntax) + 1, 0xFFFF))
        subs = m.item(ItemType.ABSTRACT_SYNTAX, contexts[0][1].encode()) + lie
        items[1] = m.item(ItemType.PRESENTATION_CONTEXT_RQ, bytes([1, 0, 0, 0]) + subs)
    elif kind.startswith("maximum length") and "sub-item" not in kind:
        maximum = {"maximum length 0": 0, "maximum length 1..6": rng.randint(1, 6),
                   "maximum length 0xFFFFFFFF": 0xFFFFFFFF}[kind]  # fmt: skip
        items[-1] = m.user_information(maximum)
    else:
        return _broken_rq_more(rng, kind, items, called, calling, version)
    return kind, m.rq_body(items, called, calling, version)


def _broken_rq_more(
    rng: random.Random, kind: str, items: list[bytes], called: bytes, calling: bytes, version: int
) -> tuple[str, bytes]:
    implementation = m.item(ItemType.IMPLEMENTATION_CLASS_UID, m.IMPLEMENTATION_CLASS_UID.encode())
    maximum = m.item(ItemType.MAXIMUM_LENGTH, _U32.pack(m.MAX_PDU))
    user: bytes | None = None
    if kind == "maximum length sub-item of 2 bytes":
        user = m.item(ItemType.MAXIMUM_LENGTH, b"\x40\x00") + implementation
    elif kind == "no user information":
        items = items[:-1]
    elif kind == "no maximum length":
        user = implementation
    elif kind == "user identity lengths past the item":
        lie = struct.pack(">BBH", 2, 1, 0xFFF0) + b"user" + struct.pack(">H", 0x7FFF) + b"pw"
        user = maximum + implementation + m.item(ItemType.USER_IDENTITY_RQ, lie)
    elif kind == "role selection UID length past the item":
        uid = m.ALL_CONTEXTS[0][1].encode()
        value = struct.pack(">H", len(uid) + rng.randint(1, 300)) + uid + b"\x01\x01"
        user = maximum + implementation + m.item(ItemType.ROLE_SELECTION, value)
    elif kind == "async window of 2 bytes":
        user = maximum + implementation + m.item(ItemType.ASYNCHRONOUS_OPERATIONS_WINDOW, b"\x00")
    elif kind == "unknown sub-item":
        user = maximum + implementation + m.item(rng.choice([0x00, 0x5A, 0xFF]), rng.randbytes(9))
    elif kind == "empty implementation class UID":
        user = maximum + m.item(ItemType.IMPLEMENTATION_CLASS_UID, b"")
    elif kind == "implementation version name of 100 bytes":
        user = maximum + implementation + m.item(ItemType.IMPLEMENTATION_VERSION_NAME, b"V" * 100)
    elif kind == "extended negotiation broken":
        value = struct.pack(">H", 0x7FFF) + b"1.2.3"
        user = maximum + implementation + m.item(ItemType.SOP_CLASS_EXTENDED_NEGOTIATION, value)
    elif kind == "protocol version 0":
        version = 0
    elif kind == "protocol version 0xFFFF":
        version = 0xFFFF
    elif kind == "called AE empty":
        called = b""
    elif kind == "called AE not ASCII":
        called = bytes(rng.randint(0x80, 0xFF) for _ in range(16))
    elif kind == "fixed part truncated":
        return kind, m.rq_body(items, called, calling, version)[: rng.randrange(68)]
    elif kind == "trailing bytes":
        return kind, m.rq_body(items, called, calling, version) + rng.randbytes(rng.randint(1, 3))
    elif kind == "unknown item":
        items.insert(rng.randrange(len(items) + 1), m.item(rng.choice([0x00, 0x11, 0x99]), b"xy"))
    else:  # random item bytes
        i = rng.randrange(len(items))
        raw = bytearray(items[i])
        raw[rng.randrange(len(raw))] = rng.randrange(256)
        items[i] = bytes(raw)
    if user is not None:
        items[-1] = m.item(ItemType.USER_INFORMATION, user)
    return kind, m.rq_body(items, called, calling, version)


def associate_rq(rng: random.Random, seeds: Seeds, number: int) -> Draft:
    """A broken A-ASSOCIATE-RQ, then (if it was accepted anyway) a C-ECHO and a release."""
    kind, body = _broken_rq(rng)
    rq = m.pdu_bytes(T.ASSOCIATE_RQ, body)
    echo = b"".join(seeds.echo)
    pauses = (len(rq), len(rq) + len(echo))
    return Draft(kind, (), rq + echo + RELEASE, note=f"body of {len(body)} bytes", pauses=pauses)


# -- every PDU type in every state --------------------------------------------------------

STATES = ("Sta2", "Sta6", "Sta8", "Sta13 after release", "Sta13 after rejection")


def wrong_pdu(rng: random.Random, seeds: Seeds, number: int) -> Draft:
    state = rng.choice(STATES)
    pdu_type = rng.choice([*T, rng.choice(UNKNOWN_TYPES)])
    random_body = _coin(rng, 0.3) or pdu_type not in KNOWN_TYPES
    if state == "Sta2" and pdu_type == T.ASSOCIATE_RQ:
        random_body = True  # a valid one is no wrong PDU there
    if random_body:
        body = rng.randbytes(rng.randint(0, 40))
    elif pdu_type in (T.ASSOCIATE_RQ, T.ASSOCIATE_AC):
        body = seeds.rq[pdu.HEADER :]
    elif pdu_type == T.ASSOCIATE_RJ:
        body = acse.encode_associate_rj(
            acse.RejectResult.PERMANENT, acse.RejectSource.SERVICE_USER, 1
        )[pdu.HEADER :]
    elif pdu_type == T.P_DATA_TF:
        body = seeds.echo[0][pdu.HEADER :]
    elif pdu_type == T.ABORT:
        body = pdu.encode_abort(pdu.AbortSource.SERVICE_USER)[pdu.HEADER :]
    else:
        body = bytes(4)
    wrong = m.pdu_bytes(pdu_type, body)
    preamble: tuple[Step, ...] = ()
    data = wrong
    if state == "Sta6":
        preamble, data = seeds.associated, wrong + RELEASE
    elif state == "Sta8":  # a release pending while a C-STORE is still being answered
        preamble, data = seeds.associated, b"".join(seeds.store) + RELEASE + wrong
    elif state == "Sta13 after release":
        preamble = (*seeds.associated, Step(RELEASE, T.RELEASE_RP))
    elif state == "Sta13 after rejection":
        preamble = (Step(seeds.rejected_rq, T.ASSOCIATE_RJ),)
    name = T(pdu_type).name if pdu_type in KNOWN_TYPES else f"type 0x{pdu_type:02X}"
    return Draft(f"{name} in {state}", preamble, data, note="random body" if random_body else "")


# -- silence -------------------------------------------------------------------------------


def never_ends(rng: random.Random, seeds: Seeds, number: int) -> Draft:
    """Something that never completes: only the engine's timers can end the connection."""
    kind = rng.choice(
        [
            "silent peer", "half a PDU header", "silent after association",
            "dataset never last", "command never last", "P-DATA shorter than its length",
        ]
    )  # fmt: skip
    preamble = seeds.associated
    data = b""
    if kind == "silent peer":
        preamble = ()
    elif kind == "half a PDU header":
        preamble, data = (), seeds.rq[:3]
    elif kind == "dataset never last":
        command, *rest = seeds.store
        chunks = [pdata(m.CT_CONTEXT, 0, rng.randbytes(rng.randint(1, 900))) for _ in rest]
        data = command + b"".join(chunks)
    elif kind == "command never last":
        data = pdata(m.CT_CONTEXT, pdu.MCH_COMMAND, seeds.store[0][12:40])
    elif kind == "P-DATA shorter than its length":
        claimed = rng.randint(100, ENGINE_MAX_PDU)
        data = m.pdu_bytes(T.P_DATA_TF, rng.randbytes(rng.randint(0, 80)), claimed)
    ending = Ending.FIN if _coin(rng, 0.2) else Ending.WAIT
    return Draft(kind, preamble, data, ending)


# -- the recorded exchange, flipped or cut ----------------------------------------------------


def byte_flip(rng: random.Random, seeds: Seeds, number: int) -> Draft:
    """Seeded mutations of the recorded exchange; PDU headers are hit more often. The
    peer still pauses where the requestor waits for an answer (those offsets move with
    the insertions and deletions)."""
    data = bytearray(seeds.exchange.data)
    pauses = list(seeds.exchange.pauses)
    starts = pdu_starts(seeds.exchange)
    ops = []
    for _ in range(1 + min(int(rng.expovariate(0.5)), 7)):
        op = rng.choice(["flip", "set", "header", "header", "insert", "delete", "duplicate"])
        at = rng.randrange(len(data))
        if op == "flip":
            data[at] ^= 1 << rng.randrange(8)
        elif op == "set":
            data[at] = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif op == "header":  # one byte of a PDU header: type or length
            at = min(rng.choice(starts) + rng.randrange(pdu.HEADER), len(data) - 1)
            data[at] = rng.randrange(256)
        elif op == "delete":
            size = min(rng.randint(1, 8), len(data) - 1 - at)
            del data[at : at + size]
            pauses = [p - min(size, p - at) if p > at else p for p in pauses]
        else:
            added = rng.randbytes(rng.randint(1, 8)) if op == "insert" else data[at : at + 64]
            data[at:at] = added
            pauses = [p + len(added) if p > at else p for p in pauses]
        ops.append(f"{op}@{at}")
    kinds = sorted({op.split("@")[0] for op in ops})
    return Draft(
        f"{len(ops)} mutation(s): {'+'.join(kinds)}",
        (),
        bytes(data),
        note=" ".join(ops),
        pauses=tuple(p for p in pauses if 0 < p < len(data)),
    )


def pdu_starts(exchange: m.Exchange) -> list[int]:
    starts, pos = [], 0
    for part in exchange.pdus:
        starts.append(pos)
        pos += len(part)
    return starts


EXCHANGE_MESSAGES = ("A-ASSOCIATE-RQ", "C-ECHO-RQ", "C-STORE-RQ", "A-RELEASE-RQ")


def cut_name(exchange: m.Exchange, offset: int) -> str:
    """Where in the exchange a cut at ``offset`` falls: which message, in which PDU part."""
    pos = 0
    for name, message in zip(EXCHANGE_MESSAGES, exchange.messages, strict=True):
        for part in message:
            if offset < pos + len(part):
                if offset == pos:
                    return f"before a PDU of the {name}"
                where = "header" if offset - pos < pdu.HEADER else "body"
                return f"in a PDU {where} of the {name}"
            pos += len(part)
    return "after the last PDU"


def premature_close(rng: random.Random, seeds: Seeds, offset: int) -> Draft:
    """The recorded exchange up to ``offset``, then a FIN or a reset."""
    ending = Ending.FIN if _coin(rng, 0.7) else Ending.RESET
    exchange = seeds.exchange
    return Draft(
        f"cut {cut_name(exchange, offset)}, then {ending}",
        (),
        exchange.data[:offset],
        ending,
        f"offset {offset} of {len(exchange.data)}",
        tuple(p for p in exchange.pauses if p < offset),
    )
