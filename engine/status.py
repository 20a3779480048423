"""Named DIMSE status codes (PS3.4 annex B.2.3, PS3.7 annex C) and Outcome -> status.

Never write a status as a number anywhere else.
"""

from __future__ import annotations

from engine.model import Outcome

SUCCESS = 0x0000

# PS3.7 C.4: general failures.
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
INVALID_OBJECT_INSTANCE = 0x0117
MISSING_ATTRIBUTE = 0x0120
UNRECOGNIZED_OPERATION = 0x0211
# "Refused: Not Authorized": the caller may not use this service (README, "Access control").
NOT_AUTHORIZED = 0x0124

# PS3.4 B.2.3: Storage service class.
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
# 0xC000-0xCFFF is "Cannot understand"; the low bits are ours to name the reason.
CANNOT_UNDERSTAND = 0xC000
CANNOT_UNDERSTAND_TRANSFER_SYNTAX = 0xC001
CANNOT_UNDERSTAND_PIXEL_DATA = 0xC002

# PS3.4 C.4.1.1.4 (table C.4-1): Query/Retrieve C-FIND. 0xA700 and 0xA900 are the
# values above, with their C-FIND meanings.
PENDING = 0xFF00  # a match follows
PENDING_UNSUPPORTED_KEYS = 0xFF01  # a match follows; some optional keys were not supported
CANCEL = 0xFE00  # matching stopped by a C-CANCEL
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = DATASET_DOES_NOT_MATCH_SOP_CLASS
# 0xC000-0xCFFF is "Unable to process"; the low bits are ours to name the reason.
UNABLE_TO_PROCESS = 0xC000
INVALID_MATCHING_VALUE = 0xC001  # a matching value that cannot be understood

# PS3.4 C.4.2.1.5 (table C.4-2): Query/Retrieve C-MOVE (and C-GET).
UNABLE_TO_PERFORM_SUBOPERATIONS = 0xA702  # refused: out of resources; nothing was sent
MOVE_DESTINATION_UNKNOWN = 0xA801
SUBOPERATIONS_WITH_FAILURES = 0xB000  # warning: one or more sub-operations failed

_FOR_OUTCOME = {
    Outcome.STORED: SUCCESS,
    Outcome.ALREADY_STORED: SUCCESS,
    Outcome.KEPT_EXISTING: SUCCESS,
    Outcome.OVERWRITTEN: SUCCESS,
    Outcome.DUPLICATE_REJECTED: DUPLICATE_SOP_INSTANCE,
    Outcome.CANNOT_UNDERSTAND: CANNOT_UNDERSTAND,
    Outcome.MISSING_ATTRIBUTE: MISSING_ATTRIBUTE,
    Outcome.INVALID_UID: INVALID_OBJECT_INSTANCE,
    Outcome.INSTANCE_MISMATCH: INVALID_OBJECT_INSTANCE,
    Outcome.SOP_CLASS_MISMATCH: DATASET_DOES_NOT_MATCH_SOP_CLASS,
    Outcome.UNSUPPORTED_SYNTAX: CANNOT_UNDERSTAND_TRANSFER_SYNTAX,
    Outcome.CORRUPT_PIXEL_DATA: CANNOT_UNDERSTAND_PIXEL_DATA,
    Outcome.OUT_OF_RESOURCES: OUT_OF_RESOURCES,
    Outcome.PROCESSING_FAILURE: PROCESSING_FAILURE,
    Outcome.NOT_AUTHORIZED: NOT_AUTHORIZED,
}


def for_outcome(outcome: Outcome) -> int:
    """The C-STORE-RSP status for an outcome."""
    return _FOR_OUTCOME[outcome]
