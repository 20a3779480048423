"""pynetdicom's threaded server, kept from being locked by connections that never associate.

pynetdicom 3 as it comes, measured with 20 association slots:

- It listens with socketserver's backlog of 5. In a burst the kernel drops the other
  connection attempts and their clients retry after 1 s, 3 s, 7 s: 300 connections from
  32 threads took 9.8 s to open (1 s median, 5 s worst; 0.04 s on the native transport).
- It counts a connection against ``maximum_associations`` from its accept to the end of
  its acceptor thread, and that thread waits ``acse_timeout`` for the A-ASSOCIATE-RQ even
  when the connection has already closed (garbage, a truncated PDU, a port scan): nothing
  wakes it. 60 such connections held 60 slots for the whole 10 s of a 10 s
  ``acse_timeout``; with the default 30 s, a few hundred a minute lock every scanner out.
- Its accepted sockets have no timeout: a peer that sends the start of an A-ASSOCIATE-RQ
  and then nothing blocks the reading thread for as long as it keeps the connection
  open. Its slot is never freed, and the engine cannot even stop.
- It deep-copies the supported presentation contexts for every connection: 53 ms of CPU
  for our 170 storage classes in 39 transfer syntaxes, under the GIL, so a burst of
  connections is accepted at about 60 a second and a C-ECHO behind it waits seconds.

Here, as on the native transport (``connections.py``):

- the backlog is ``BACKLOG``;
- a connection goes to pynetdicom only once its whole A-ASSOCIATE-RQ is here (or its
  first bytes show it is something else, which pynetdicom aborts at once), waited for in
  the connection's own thread for at most ``acse_timeout`` (the ARTIM timer of PS3.8
  state Sta2). A connection that is silent, stalls in the middle of its request or closes
  before its end never takes a slot, is closed at ARTIM or at once, and past
  ``UNASSOCIATED_LIMIT`` of them the oldest is dropped;
- once handed over, its socket times out after ``network_timeout``;
- a connection that closes before pynetdicom has read its A-ASSOCIATE-RQ ends its
  acceptor thread at once (``wake_acceptor``, an ``EVT_CONN_CLOSE`` handler);
- each association gets a new list of the same context objects (``SharedContexts``):
  negotiation only reads them, and our handlers replace the list, never an item.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from engine.dicom import pdu
from engine.dicom.connections import Unassociated

log = logging.getLogger(__name__)

# Connections the kernel queues before they are accepted (socketserver's default: 5).
# Deeper than the native transport's: this accept loop shares the GIL with every
# association thread, so a burst waits here longer.
BACKLOG = 1024
MILLISECONDS = 1000
PDU_HEADER = struct.Struct(">BxL")  # PS3.8 9.3.1: PDU type, reserved, PDU length
_READABLE = select.POLLIN | select.POLLRDHUP
_ENDED = select.POLLRDHUP | select.POLLHUP | select.POLLERR


class SharedContexts(list[Any]):
    """The server's supported contexts; pynetdicom's per-connection ``deepcopy`` of them
    becomes a copy of the list."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's server: a deep backlog, and no association before a whole request."""

    request_queue_size = BACKLOG
    request_timeout: float = 30.0  # ARTIM: set to acse_timeout by ``start_guarded``

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.contexts = SharedContexts(self.contexts)
        self._lock = threading.Lock()
        self._waiting: Unassociated[socket.socket] = Unassociated()
        self._closing = False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The connection's own thread: wait for the request, then hand it over."""
        if isinstance(request, socket.socket):
            if not self._await_request(request):
                self.shutdown_request(request)
                return
            request.settimeout(self.ae.network_timeout)
        super().process_request_thread(request, client_address)

    def _await_request(self, sock: socket.socket) -> bool:
        """Whether to hand the connection to pynetdicom (not: silent, stalled, closed,
        or dropped to make room), registered among the unassociated meanwhile."""
        with self._lock:
            if self._closing:
                return False
            dropped = self._waiting.add(sock)
            if dropped is not None:
                log.warning(
                    "dropping %s: more than %d connections without an association",
                    _peer(dropped),
                    self._waiting.limit,
                )
                _end(dropped)  # its thread sees the end at once and closes it
        try:
            return _first_pdu_arrives(sock, time.monotonic() + self.request_timeout)
        except OSError:
            return False
        finally:
            with self._lock:
                self._waiting.discard(sock)

    def shutdown(self) -> None:
        """Stop accepting; connections still waiting for their request end at once."""
        with self._lock:
            self._closing = True
            for sock in self._waiting:
                _end(sock)
        super().shutdown()


def _first_pdu_arrives(sock: socket.socket, deadline: float) -> bool:
    """Wait until the first PDU is all in the socket's buffer (read with ``MSG_PEEK``, so
    pynetdicom reads it all again); the kernel wakes us only then (``SO_RCVLOWAT``), or
    at the peer's end. An A-ASSOCIATE-RQ too long for that wait, or another PDU (which
    pynetdicom answers with an A-ABORT), is handed over as soon as its header is here."""
    poller = select.poll()  # not select.select: descriptors may be past 1024
    poller.register(sock, _READABLE)
    need = pdu.HEADER
    try:
        while True:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, need)
            left = deadline - time.monotonic()
            events = poller.poll(left * MILLISECONDS) if left > 0 else []
            if not events:
                return False  # silent, or stalled in the middle, until ARTIM
            head = sock.recv(need, socket.MSG_PEEK)
            if not head:
                return False  # closed before a word
            if len(head) < need:
                if events[0][1] & _ENDED:
                    log.warning("%s closed the connection in the middle of a PDU", _peer(sock))
                    return False
                return True  # the kernel caps the low-water mark: pynetdicom reads the rest
            if need > pdu.HEADER:
                return True  # the whole A-ASSOCIATE-RQ
            pdu_type, length = PDU_HEADER.unpack_from(head)
            if pdu_type != pdu.PDUType.ASSOCIATE_RQ:
                return True
            if length > pdu.CONTROL_PDU_MAX_LENGTH:
                log.warning(
                    "A-ASSOCIATE-RQ of %d bytes from %s, more than %d; closing",
                    length,
                    _peer(sock),
                    pdu.CONTROL_PDU_MAX_LENGTH,
                )
                return False
            need = pdu.HEADER + length
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def _end(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"? ({host}:{port})"


def wake_acceptor(event: evt.Event) -> None:
    """``EVT_CONN_CLOSE``: a connection closed before its A-ASSOCIATE-RQ arrived.

    Its acceptor thread waits ``acse_timeout`` for the request primitive; ``None`` is
    what that wait returns on a timeout, so the thread ends now (and frees its slot).
    """
    assoc = event.assoc
    if assoc.is_acceptor and not assoc.is_established and assoc.requestor.primitive is None:
        assoc.dul.to_user_queue.put(None)


def start_guarded(
    ae: AE, address: tuple[str, int], handlers: list[Any], request_timeout: float
) -> GuardedAssociationServer:
    """What ``AE.start_server(block=False)`` does, with ``GuardedAssociationServer``."""
    server = ae.make_server(address, evt_handlers=handlers, server_class=GuardedAssociationServer)
    assert isinstance(server, GuardedAssociationServer)
    server.request_timeout = request_timeout
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
    thread.start()
    # AssociationServer.shutdown removes the server from this list, as for start_server.
    ae._servers.append(server)
    return server
