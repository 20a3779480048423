"""The campaign's inputs: input ``number`` of seed ``seed`` is always the same bytes.

Every ``PREMATURE_EVERY``-th input is a premature close of the recorded exchange, at
offsets that visit every byte of it once per ``len(exchange) + 1`` such inputs (a fixed
stride coprime with that count, so a short run still spreads its cuts over the whole
exchange). The others draw a family by ``FAMILY_WEIGHTS``, then a variant.
"""

from __future__ import annotations

import math
import random

from pydicom import config as pydicom_config

from bench.fuzz import dataset_layer, dimse_layer, upper_layer
from bench.fuzz.model import Case, Ending, Family
from bench.fuzz.seeds import Draft, Generator, Seeds, random_split

PREMATURE_EVERY = 6
# Relative draw weights of the other families. The silent ones (never-ends, truncated)
# cost a timeout each, so they are drawn less.
FAMILY_WEIGHTS: dict[Family, int] = {
    Family.VALID: 2,
    Family.GARBAGE: 6,
    Family.TRUNCATED: 5,
    Family.ABSURD_LENGTH: 7,
    Family.ASSOCIATE_RQ: 12,
    Family.WRONG_PDU: 12,
    Family.P_DATA: 9,
    Family.COMMAND: 14,
    Family.DATASET: 14,
    Family.NEVER_ENDS: 2,
    Family.BYTE_FLIP: 17,
}
GENERATORS: dict[Family, Generator] = {
    Family.VALID: upper_layer.valid,
    Family.GARBAGE: upper_layer.garbage,
    Family.TRUNCATED: upper_layer.truncated,
    Family.ABSURD_LENGTH: upper_layer.absurd_length,
    Family.ASSOCIATE_RQ: upper_layer.associate_rq,
    Family.WRONG_PDU: upper_layer.wrong_pdu,
    Family.P_DATA: dimse_layer.p_data,
    Family.COMMAND: dimse_layer.command,
    Family.DATASET: dataset_layer.dataset,
    Family.NEVER_ENDS: upper_layer.never_ends,
    Family.BYTE_FLIP: upper_layer.byte_flip,
}
# Share of inputs that, after the engine's last word, wait for the engine to close the
# connection (a proper peer closes at once; these check the engine's own timer).
LINGER_SHARE = 0.15
# Share of inputs whose payload is split into several writes (framing across reads).
SPLIT_SHARE = 0.3


def _stride(period: int) -> int:
    """A step coprime with ``period`` near its golden section: cuts spread evenly."""
    step = max(1, round(period * 0.618))
    while math.gcd(step, period) != 1:
        step += 1
    return step


def cut_offset(seeds: Seeds, number: int) -> int:
    period = len(seeds.exchange.data) + 1
    return (number // PREMATURE_EVERY * _stride(period)) % period


def make_case(seeds: Seeds, number: int) -> Case:
    rng = random.Random(f"{seeds.seed}/{number}")
    draft: Draft
    if number % PREMATURE_EVERY == PREMATURE_EVERY - 1:
        family = Family.PREMATURE_CLOSE
        draft = upper_layer.premature_close(rng, seeds, cut_offset(seeds, number))
    else:
        family = rng.choices(list(FAMILY_WEIGHTS), weights=list(FAMILY_WEIGHTS.values()))[0]
        with pydicom_config.disable_value_validation():  # broken values are the point
            draft = GENERATORS[family](rng, seeds, number)
    chunks: tuple[int, ...] = ()
    if len(draft.payload) > 1 and rng.random() < SPLIT_SHARE:
        chunks = tuple(random_split(rng, len(draft.payload), 5))
    linger = draft.ending is Ending.WAIT and rng.random() < LINGER_SHARE
    return Case(
        number=number,
        family=family,
        variant=draft.variant,
        preamble=draft.preamble,
        payload=draft.payload,
        ending=draft.ending,
        chunks=chunks,
        pauses=draft.pauses,
        linger=linger,
        note=draft.note,
    )


def control_case(seeds: Seeds) -> Case:
    """Input 0: the recorded exchange, unmodified, sent before the campaign starts."""
    draft = upper_layer.valid(random.Random(0), seeds, 0)
    return Case(0, Family.VALID, draft.variant, draft.preamble, draft.payload, pauses=draft.pauses)
