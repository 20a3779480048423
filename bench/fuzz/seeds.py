"""What every generator starts from: valid messages built once per campaign seed.

A generator is a function ``(rng, seeds, number) -> Draft``: it draws one variant of what
its family breaks, with ``rng`` seeded by (campaign seed, input number), so an input is
rebuilt exactly from those two numbers (``python -m bench fuzz --only N``).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from bench.fuzz import messages as m
from bench.fuzz.model import Ending, Step
from engine.config import DicomConfig
from engine.dicom import pdu
from engine.dicom.acse import DICOM_APPLICATION_CONTEXT, ItemType

# The engine's default maximum P-DATA-TF length and the bound on association PDUs
# (engine/dicom/pdu.py): lengths just over them are the interesting ones.
ENGINE_MAX_PDU = DicomConfig().maximum_pdu_size
CONTROL_PDU_MAX = pdu.CONTROL_PDU_MAX_LENGTH


@dataclass(frozen=True)
class Draft:
    """A generator's answer; ``cases.make_case`` adds the number, family and timing."""

    variant: str
    preamble: tuple[Step, ...]
    payload: bytes
    ending: Ending = Ending.WAIT
    note: str = ""
    pauses: tuple[int, ...] = ()  # see ``Case.pauses``


Generator = Callable[[random.Random, "Seeds", int], Draft]


@dataclass(frozen=True)
class Seeds:
    seed: int
    tag: str  # prefix of every UID the fuzzer's datasets get
    exchange: m.Exchange  # the recorded valid C-STORE association
    rq: bytes  # a valid A-ASSOCIATE-RQ proposing ``messages.ALL_CONTEXTS``
    rejected_rq: bytes  # one the engine rejects (unknown application context)
    store: tuple[bytes, ...]  # a valid C-STORE-RQ, command and data PDUs (our encoder)
    echo: tuple[bytes, ...]  # a valid C-ECHO-RQ

    @classmethod
    def build(cls, seed: int) -> Seeds:
        tag = f"fuzz{seed}"
        exchange = m.store_exchange(m.small_ct(tag, 0))
        bad_context = m.item(ItemType.APPLICATION_CONTEXT, b"1.2.3.4.5")
        items = [bad_context, *m.rq_items()[1:]]
        return cls(
            seed=seed,
            tag=tag,
            exchange=exchange,
            rq=m.associate_rq(contexts=m.ALL_CONTEXTS),
            rejected_rq=m.pdu_bytes(pdu.PDUType.ASSOCIATE_RQ, m.rq_body(items)),
            store=tuple(m.store_pdus(m.small_ct(tag, 1))),
            echo=tuple(m.echo_pdus()),
        )

    def dataset(self, number: int) -> Dataset:
        """A fresh valid CT image for input ``number`` (its own SOP Instance UID)."""
        return m.small_ct(self.tag, number)

    @property
    def associated(self) -> tuple[Step, ...]:
        """The preamble of an established association (every context accepted)."""
        return (Step(self.rq, pdu.PDUType.ASSOCIATE_AC),)


def pdata(context_id: int, control: int, data: bytes, length: int | None = None) -> bytes:
    """One P-DATA-TF PDU with one PDV; ``length`` overrides the PDV item length."""
    item_length = len(data) + pdu.PDV_MIN_ITEM_LENGTH if length is None else length
    body = struct.pack(">LBB", item_length, context_id, control) + data
    return m.pdu_bytes(pdu.PDUType.P_DATA_TF, body)


def fragments(context_id: int, command: bool, data: bytes, sizes: Sequence[int]) -> bytes:
    """``data`` as P-DATA-TF PDUs cut at ``sizes`` (the rest in a last one), last flagged."""
    out, pos = [], 0
    base = pdu.MCH_COMMAND if command else 0
    for size in sizes:
        if pos + size >= len(data):
            break
        out.append(pdata(context_id, base, data[pos : pos + size]))
        pos += size
    out.append(pdata(context_id, base | pdu.MCH_LAST, data[pos:]))
    return b"".join(out)


def random_split(rng: random.Random, size: int, most: int = 4) -> list[int]:
    """Up to ``most`` - 1 random cut sizes for ``size`` bytes."""
    cuts = (
        sorted(rng.sample(range(1, size), min(size - 1, rng.randrange(most)))) if size > 1 else []
    )
    return [b - a for a, b in zip([0, *cuts], cuts, strict=False)]


def application_context() -> bytes:
    return m.item(ItemType.APPLICATION_CONTEXT, DICOM_APPLICATION_CONTEXT.encode())
