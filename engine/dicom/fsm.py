"""The association state machine of the acceptor, as a table (PS3.8 section 9.2).

Rule: everything that changes an association's state is decided here. The table
maps (state, event) to (action, next state); the transport adapter
(``association.py``) performs the action. Pairs the table does not list are
protocol errors, answered as PS3.8 says for the state: an A-ABORT in the states
where an association exists or is being made, nothing in Sta13.

Only the acceptor's states appear: this engine never requests associations on
this transport, and it never initiates a release.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    STA1 = "idle"
    STA2 = "transport open, awaiting A-ASSOCIATE-RQ"
    STA3 = "awaiting the local A-ASSOCIATE response"
    STA6 = "association established, ready for data transfer"
    STA8 = "awaiting the local A-RELEASE response"
    STA13 = "awaiting the transport to close"


class Event(enum.Enum):
    EVT5 = "transport connection indication"
    EVT3 = "A-ASSOCIATE-AC PDU received"
    EVT4 = "A-ASSOCIATE-RJ PDU received"
    EVT6 = "A-ASSOCIATE-RQ PDU received"
    EVT7 = "local A-ASSOCIATE response (accept)"
    EVT8 = "local A-ASSOCIATE response (reject)"
    EVT9 = "local P-DATA request"
    EVT10 = "P-DATA-TF PDU received"
    EVT12 = "A-RELEASE-RQ PDU received"
    EVT13 = "A-RELEASE-RP PDU received"
    EVT14 = "local A-RELEASE response"
    EVT15 = "local A-ABORT request"
    EVT16 = "A-ABORT PDU received"
    EVT17 = "transport connection closed"
    EVT18 = "ARTIM timer expired"
    EVT19 = "unrecognized or invalid PDU received"


class Action(enum.Enum):
    AE5 = "accept the connection, start ARTIM"
    AE6 = "stop ARTIM, judge the A-ASSOCIATE-RQ"
    AE7 = "send A-ASSOCIATE-AC"
    AE8 = "send A-ASSOCIATE-RJ, start ARTIM"
    DT1 = "send P-DATA-TF"
    DT2 = "deliver P-DATA-TF to DIMSE"
    AR2 = "release indication to the local user"
    AR4 = "send A-RELEASE-RP, start ARTIM"
    AR5 = "stop ARTIM"
    AA1 = "send A-ABORT, start ARTIM"
    AA2 = "stop ARTIM, close the transport"
    AA3 = "abort indication, close the transport"
    AA4 = "provider abort indication"
    AA5 = "stop ARTIM"
    AA6 = "ignore the PDU"
    AA7 = "send A-ABORT"
    AA8 = "send A-ABORT, provider abort indication, start ARTIM"


S, E, A = State, Event, Action

TABLE: dict[tuple[State, Event], tuple[Action, State]] = {
    (S.STA1, E.EVT5): (A.AE5, S.STA2),
    # Sta2: connected, nothing negotiated yet.
    (S.STA2, E.EVT6): (A.AE6, S.STA3),
    (S.STA2, E.EVT16): (A.AA2, S.STA1),
    (S.STA2, E.EVT17): (A.AA5, S.STA1),
    (S.STA2, E.EVT18): (A.AA2, S.STA1),
    # Sta3: the request is being judged.
    (S.STA3, E.EVT7): (A.AE7, S.STA6),
    (S.STA3, E.EVT8): (A.AE8, S.STA13),
    (S.STA3, E.EVT15): (A.AA1, S.STA13),
    (S.STA3, E.EVT16): (A.AA3, S.STA1),
    (S.STA3, E.EVT17): (A.AA4, S.STA1),
    # Sta6: data transfer.
    (S.STA6, E.EVT9): (A.DT1, S.STA6),
    (S.STA6, E.EVT10): (A.DT2, S.STA6),
    (S.STA6, E.EVT12): (A.AR2, S.STA8),
    (S.STA6, E.EVT15): (A.AA1, S.STA13),
    (S.STA6, E.EVT16): (A.AA3, S.STA1),
    (S.STA6, E.EVT17): (A.AA4, S.STA1),
    # Sta8: the peer asked to release; answers still owed go out first.
    (S.STA8, E.EVT9): (A.DT1, S.STA8),
    (S.STA8, E.EVT14): (A.AR4, S.STA13),
    (S.STA8, E.EVT15): (A.AA1, S.STA13),
    (S.STA8, E.EVT16): (A.AA3, S.STA1),
    (S.STA8, E.EVT17): (A.AA4, S.STA1),
    # Sta13: we said our last word; the peer should close.
    (S.STA13, E.EVT16): (A.AA2, S.STA1),
    (S.STA13, E.EVT17): (A.AR5, S.STA1),
    (S.STA13, E.EVT18): (A.AA2, S.STA1),
    (S.STA13, E.EVT15): (A.AA7, S.STA13),
    (S.STA13, E.EVT6): (A.AA7, S.STA13),
}

# What PS3.8 prescribes for an event a state does not expect.
_UNEXPECTED = {
    S.STA1: (A.AA2, S.STA1),
    S.STA2: (A.AA1, S.STA13),
    S.STA3: (A.AA8, S.STA13),
    S.STA6: (A.AA8, S.STA13),
    S.STA8: (A.AA8, S.STA13),
    S.STA13: (A.AA6, S.STA13),
}

# Local events in a state that cannot take them (an answer ready after the peer
# aborted) are dropped: the peer is gone, there is no one to tell.
_LOCAL = frozenset({E.EVT7, E.EVT8, E.EVT9, E.EVT14, E.EVT15})


def transition(state: State, event: Event) -> tuple[Action, State]:
    """The action to take and the state to enter."""
    found = TABLE.get((state, event))
    if found is not None:
        return found
    if event in _LOCAL:
        return A.AA6, state
    if state is S.STA13 and event is E.EVT19:
        return A.AA7, S.STA13
    return _UNEXPECTED[state]
