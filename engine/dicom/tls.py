"""The DICOM TLS port (PS3.15 B.9 secure transport connection) of both transports.

A second listener beside the plain one, with the same AE title and services: a
connection that completes the TLS handshake becomes an ordinary association. Each
handshake is bounded by ``acse_timeout`` and runs apart from the others, so a client
that stalls holds up nobody else; one that fails (a plain DICOM client, no client
certificate, an untrusted one) is closed with one log line naming the reason
(``certificates.HandshakeFailure``), and the engine goes on serving.

- native transport (``TlsAcceptor``): our own accept loop and
  ``loop.connect_accepted_socket(..., ssl=...)``, which raises when a handshake fails
  (``create_server(ssl=...)`` drops such connections without a word).
- pynetdicom transport (``TlsAssociationServer``): pynetdicom's threaded server, with
  the handshake moved from its single accept thread into the connection's own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from engine.certificates import HandshakeFailure, TlsPort, describe_session
from engine.dicom.connections import Unassociated
from engine.dicom.threaded import GuardedAssociationServer

log = logging.getLogger(__name__)

BACKLOG = 256
# Seconds the accept loop waits after the system refused an accept (too many open files).
ACCEPT_RETRY = 1.0


def log_failure(peer: Any, exc: BaseException) -> None:
    address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else peer
    detail = str(exc) or type(exc).__name__
    log.warning("TLS handshake with %s failed: %s (%s)", address, HandshakeFailure.of(exc), detail)


def log_session(peer: Any, tls: ssl.SSLObject | ssl.SSLSocket | None) -> None:
    log.info("TLS connection from %s:%s: %s", peer[0], peer[1], describe_session(tls))


class TlsAcceptor:
    """The native transport's TLS port: accept, handshake, then the association protocol.

    Connections in their handshake are bounded as unassociated ones are (``connections.py``):
    past ``UNASSOCIATED_LIMIT`` the oldest is dropped, so a flood of connections that
    never complete a handshake cannot push out a client that does (it takes a round trip).
    """

    def __init__(
        self,
        host: str,
        tls: TlsPort,
        make_protocol: Callable[[], asyncio.Protocol],
        handshake_timeout: float,
    ) -> None:
        self.host = host
        self.tls = tls
        self.make_protocol = make_protocol
        self.handshake_timeout = handshake_timeout
        self._sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._handshakes: Unassociated[asyncio.Task[None]] = Unassociated()

    @property
    def port(self) -> int:
        return int(self._sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self.host or None,
            self.tls.port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(BACKLOG)
                sock.setblocking(False)
            except OSError:
                sock.close()
                self._close_sockets()
                raise
            self._sockets.append(sock)
        for sock in self._sockets:
            self._accepting.append(loop.create_task(self._accept(sock), name="tls-accept"))

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listening)
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: wait, as asyncio's server does
                log.error("cannot accept on the TLS port: %s; retrying", exc)
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            task = loop.create_task(self._handshake(sock, peer))
            oldest = self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)
            if oldest is not None:
                log.warning(
                    "dropping a TLS handshake: more than %d at once", self._handshakes.limit
                )
                oldest.cancel()  # the loop closes its connection

    async def _handshake(self, sock: socket.socket, peer: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
                self.make_protocol,
                sock,
                ssl=self.tls.context,
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except OSError as exc:  # ssl.SSLError, a timeout, a reset: the loop closed the socket
            log_failure(peer, exc)
            sock.close()
            return
        except Exception:  # the protocol edge: log it, keep serving the others
            log.exception("TLS connection from %s:%s failed", peer[0], peer[1])
            sock.close()
            return
        log_session(peer, transport.get_extra_info("ssl_object"))

    async def stop(self) -> None:
        """Stop accepting and drop the handshakes in progress; associations go on."""
        tasks = [*self._accepting, *self._handshakes]
        for task in tasks:
            task.cancel()
        self._accepting.clear()
        self._close_sockets()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()


class TlsAssociationServer(GuardedAssociationServer):
    """pynetdicom's threaded server for the TLS port (with the plain port's deep backlog
    and shared contexts, engine/dicom/threaded.py).

    pynetdicom wraps each accepted socket in its accept thread, so one client that never
    completes its handshake would stop every other from being accepted; here the accept
    thread only accepts, and the handshake (bounded by ``handshake_timeout``) runs in the
    thread pynetdicom starts for the connection, before the association is created.
    Connections in their handshake are bounded as unassociated ones are: past
    ``UNASSOCIATED_LIMIT`` the oldest is dropped. Once encrypted, the A-ASSOCIATE-RQ
    cannot be peeked at as on the plain port: pynetdicom waits for it (``acse_timeout``),
    on a socket that times out after ``network_timeout``.
    """

    handshake_timeout: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handshake_lock = threading.Lock()
        self._handshaking: Unassociated[ssl.SSLSocket] = Unassociated()
        self._handshakes_end = False

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        return sock, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        secure = self._handshake(request, client_address)
        if secure is None:
            return
        log_session(client_address, secure)
        secure.settimeout(self.ae.network_timeout)
        # Past the plain port's wait for a whole A-ASSOCIATE-RQ (see the class docstring).
        ThreadedAssociationServer.process_request_thread(self, secure, client_address)

    def _handshake(self, request: Any, client_address: Any) -> ssl.SSLSocket | None:
        """The connection, encrypted; None (and closed) when its handshake failed."""
        context = self.ssl_context
        assert context is not None and isinstance(request, socket.socket)
        try:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            secure = context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:
            log_failure(client_address, exc)
            request.close()
            return None
        with self._handshake_lock:
            if self._handshakes_end:
                secure.close()
                return None
            dropped = self._handshaking.add(secure)
            if dropped is not None:
                log.warning(
                    "dropping a TLS handshake: more than %d at once", self._handshaking.limit
                )
                _shut(dropped)  # its thread sees the end at once and closes it
        try:
            secure.settimeout(self.handshake_timeout)
            secure.do_handshake()
        except OSError as exc:  # ssl.SSLError, a timeout, a reset
            log_failure(client_address, exc)
            secure.close()
            return None
        finally:
            with self._handshake_lock:
                self._handshaking.discard(secure)
        return secure

    def shutdown(self) -> None:
        """Stop accepting; handshakes in progress end at once (their sockets are shut)."""
        with self._handshake_lock:
            self._handshakes_end = True
            for sock in self._handshaking:
                _shut(sock)
        super().shutdown()


def _shut(sock: ssl.SSLSocket) -> None:
    """End a connection under the thread doing its handshake: the plain socket call, as
    SSLSocket.shutdown would also drop the TLS state that thread is using."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def start_threaded(
    ae: AE, host: str, tls: TlsPort, handlers: list[Any], handshake_timeout: float
) -> TlsAssociationServer:
    """The pynetdicom transport's TLS port: what ``AE.start_server(block=False)`` does,
    with ``TlsAssociationServer`` as the server class."""
    server = ae.make_server(
        (host, tls.port),
        ssl_context=tls.context,
        evt_handlers=handlers,
        server_class=TlsAssociationServer,
    )
    assert isinstance(server, TlsAssociationServer)
    server.handshake_timeout = handshake_timeout
    thread = threading.Thread(target=server.serve_forever, name="TlsAcceptor", daemon=True)
    thread.start()
    # AssociationServer.shutdown removes the server from this list, as for start_server.
    ae._servers.append(server)
    return server
