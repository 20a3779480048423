"""Access control: who may open an association, and which services each caller may use.

The rules of ``[dicom]`` and ``[[dicom.peers]]``, applied alike by both transports
(native: ``server.py`` and ``association.py``; pynetdicom: ``scp.py``):

1. **Called AE title.** With ``require_called_ae_title``, an association addressed to
   another AE title is rejected: A-ASSOCIATE-RJ rejected-permanent, service-user,
   reason 7 "called-AE-title-not-recognized" (PS3.8 9.3.4).
2. **Calling AE title.** A caller is a *declared peer* when its calling AE title is
   the ``ae_title`` of a ``[[dicom.peers]]`` table and, with ``check_calling_host``,
   it calls from an address of that table's ``host``. Any other caller is *unknown*
   (a declared title from another address included) and gets the services of the
   ``allow_unknown_*`` switches; with none of them, it is rejected: rejected-permanent,
   service-user, reason 3 "calling-AE-title-not-recognized".
3. **Services.** A declared peer may always echo, and store, query and retrieve as
   its table says. Presentation contexts of Verification and of the query/retrieve
   SOP classes the caller may not use are refused at negotiation (result 3,
   abstract syntax not supported): nothing is sent in vain, and the SCU reports the
   SOP class as refused. Storage contexts are always accepted, because they also
   carry the C-STORE sub-operations a C-GET sends back to its requestor; a C-STORE
   from a caller that may not store is answered 0x0124 "Refused: Not Authorized"
   and its data is discarded.

Every refusal is one log line naming the caller's AE title and address. AE titles
are compared exactly (case included), leading and trailing spaces aside, as C-MOVE
destinations and ``[[forward]]`` rules are. Host names are resolved once, at start
(``AccessControl.resolve``): a peer whose address changes needs a restart.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from engine.config import DicomConfig, PeerConfig
from engine.dicom.acse import VERIFICATION, RejectReason
from engine.model import Origin, Outcome, Result

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Service(StrEnum):
    """What a caller may ask of the engine."""

    ECHO = "echo"  # C-ECHO
    STORE = "store"  # C-STORE
    QUERY = "query"  # C-FIND
    RETRIEVE = "retrieve"  # C-MOVE, C-GET


# The DIMSE requests of each service, for the log.
_REQUESTS = {
    Service.ECHO: "C-ECHO",
    Service.STORE: "C-STORE",
    Service.QUERY: "C-FIND",
    Service.RETRIEVE: "C-MOVE/C-GET",
}

# SOP classes whose presentation contexts serve one service only: refused at
# negotiation when the caller may not use it. Storage classes are not here (see 3.).
NEGOTIATED: Mapping[str, Service] = MappingProxyType(
    {
        VERIFICATION: Service.ECHO,
        str(PatientRootQueryRetrieveInformationModelFind): Service.QUERY,
        str(StudyRootQueryRetrieveInformationModelFind): Service.QUERY,
        str(PatientRootQueryRetrieveInformationModelMove): Service.RETRIEVE,
        str(StudyRootQueryRetrieveInformationModelMove): Service.RETRIEVE,
        str(PatientRootQueryRetrieveInformationModelGet): Service.RETRIEVE,
        str(StudyRootQueryRetrieveInformationModelGet): Service.RETRIEVE,
    }
)

# What the error comment of a refused C-STORE says (the log line names the caller).
STORE_REFUSED_COMMENT = "not authorized to store on this node"


@dataclass(frozen=True, slots=True)
class Grant:
    """What an accepted association may do."""

    services: frozenset[Service]
    # The declared peer's AE title; "" for an unknown caller.
    peer: str = ""
    # Why a caller using a declared AE title is served as unknown (its address), or "".
    note: str = ""

    def allows(self, service: Service) -> bool:
        return service in self.services

    def accepts_context(self, abstract_syntax: str) -> bool:
        """Whether a presentation context of this SOP class may be accepted."""
        service = NEGOTIATED.get(abstract_syntax)
        return service is None or service in self.services

    def refused(self, abstract_syntaxes: Iterable[str]) -> list[Service]:
        """The services whose proposed contexts this grant refuses, in a stable order."""
        wanted = {NEGOTIATED[uid] for uid in abstract_syntaxes if uid in NEGOTIATED}
        return [service for service in Service if service in wanted - self.services]

    def __str__(self) -> str:
        who = f"declared peer {self.peer!r}" if self.peer else "unknown caller"
        return f"{who} ({_names(self.services) or 'nothing'})"


# What an association gets before it is admitted: nothing.
NO_GRANT = Grant(frozenset())


@dataclass(frozen=True, slots=True)
class Denial:
    """An association to reject: the A-ASSOCIATE-RJ reason (service-user, permanent)
    and what the log says."""

    reason: RejectReason
    why: str


def _names(services: frozenset[Service]) -> str:
    return ", ".join(s.value for s in Service if s in services)


def address(text: str) -> IPAddress | None:
    """The IP address in ``text`` (IPv4-mapped IPv6 as IPv4, scope dropped), or None."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _literal(host: str) -> frozenset[IPAddress]:
    ip = address(host)
    return frozenset() if ip is None else frozenset({ip})


def _services(peer: PeerConfig) -> frozenset[Service]:
    granted = {Service.ECHO}
    granted |= {Service.STORE} if peer.store else set()
    granted |= {Service.QUERY} if peer.query else set()
    granted |= {Service.RETRIEVE} if peer.retrieve else set()
    return frozenset(granted)


class AccessControl:
    """The access rules of one running engine; ``admit`` decides each association.

    Build it anywhere; call ``resolve`` once, off the event loop, before the listener
    accepts: until then a peer declared by host name matches no address.
    """

    def __init__(self, config: DicomConfig) -> None:
        self.ae_title = config.ae_title.strip()
        self.require_called_ae_title = config.require_called_ae_title
        self.check_calling_host = config.check_calling_host
        self.peers = {peer.ae_title.strip(): peer for peer in config.peers}
        self.grants = {name: Grant(_services(peer), name) for name, peer in self.peers.items()}
        self.addresses = {name: _literal(peer.host) for name, peer in self.peers.items()}
        unknown = (
            (Service.ECHO, config.allow_unknown_echo),
            (Service.STORE, config.allow_unknown_store),
            (Service.QUERY, config.allow_unknown_query),
            (Service.RETRIEVE, config.allow_unknown_retrieve),
        )
        self.unknown = frozenset(service for service, allowed in unknown if allowed)

    def resolve(self) -> None:
        """Look up the host names of the peers (blocking) and log the rules in force.

        A name that does not resolve is logged and matches no address: that peer's
        calls are treated as unknown until a restart finds it. The engine still
        starts, so a DNS failure never stops the scanners that are reachable.
        """
        if self.check_calling_host:
            for name, peer in self.peers.items():
                if self.addresses[name]:
                    continue  # an IP address
                try:
                    infos = socket.getaddrinfo(peer.host, None, type=socket.SOCK_STREAM)
                except OSError as exc:
                    log.warning(
                        "peer %s: host %r does not resolve (%s); its calls are not"
                        " recognized until a restart resolves it",
                        name,
                        peer.host,
                        exc,
                    )
                    continue
                found = {address(str(info[4][0])) for info in infos}
                self.addresses[name] = frozenset(ip for ip in found if ip is not None)
        log.info("access control: %s", self.describe())

    def describe(self) -> str:
        """The rules in force, in one line."""
        peers = "; ".join(
            f"{name} at {self.peers[name].host}: {_names(grant.services)}"
            for name, grant in self.grants.items()
        )
        unknown = _names(self.unknown) or "refused"
        return (
            f"{len(self.peers)} declared peer(s) [{peers}]; unknown callers: {unknown};"
            f" calling host {'checked' if self.check_calling_host else 'not checked'};"
            f" called AE title {'checked' if self.require_called_ae_title else 'not checked'}"
        )

    def admit(self, calling_ae: str, called_ae: str, peer_ip: str) -> Grant | Denial:
        """What a caller may do, or why its association is rejected."""
        called, calling = called_ae.strip(), calling_ae.strip()
        if self.require_called_ae_title and called != self.ae_title:
            return Denial(
                RejectReason.CALLED_AE_NOT_RECOGNIZED,
                f"called AE title {called!r} is not {self.ae_title!r}",
            )
        note = ""
        grant = self.grants.get(calling)
        if grant is not None:
            if not self.check_calling_host or address(peer_ip) in self.addresses[calling]:
                return grant
            note = (
                f"calling AE title {calling!r} is declared at {self.peers[calling].host},"
                f" not {peer_ip}"
            )
        if self.unknown:
            return Grant(self.unknown, "", note)
        return Denial(
            RejectReason.CALLING_AE_NOT_RECOGNIZED,
            note or f"calling AE title {calling!r} is not a declared peer",
        )


def note_admission(
    grant: Grant, calling_ae: str, peer_ip: str, peer_port: int, proposed: Iterable[str]
) -> None:
    """Log what access control did to an admitted association: a declared AE title
    calling from elsewhere, and the proposed contexts refused (one line each)."""
    who = f"{calling_ae or '?'} from {peer_ip}:{peer_port}"
    if grant.note:
        log.warning("%s: %s; served as an %s", who, grant.note, grant)
    refused = grant.refused(proposed)
    if refused:
        log.warning(
            "%s, %s, may not %s: its %s presentation contexts are refused",
            who,
            grant,
            " or ".join(s.value for s in refused),
            ", ".join(_REQUESTS[s] for s in refused),
        )


def store_refused(grant: Grant, origin: Origin, sop_instance_uid: str) -> Result:
    """Log a C-STORE refused to a caller that may not store; the answer to give."""
    log.warning(
        "C-STORE refused (not authorized): %s from %s:%d, %s, may not store; %s discarded",
        origin.calling_ae or "?",
        origin.peer_ip,
        origin.peer_port,
        grant,
        sop_instance_uid or "the instance",
    )
    return Result(Outcome.NOT_AUTHORIZED, STORE_REFUSED_COMMENT)
