"""The engine's own sockets: TCP_NODELAY on every accepted association."""

from __future__ import annotations

import socket
from pathlib import Path

from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from engine import status
from tests.helpers import ct_dataset, engine_in_thread


def test_accepted_sockets_have_tcp_nodelay(tmp_path: Path) -> None:
    with engine_in_thread(tmp_path) as eng:
        ae = AE(ae_title="NODELAY")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", eng.port, ae_title=eng.ae_title)
        assert assoc.is_established
        try:
            (server_side,) = eng.scp.ae.active_associations
            sock = server_side.dul.socket.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            ds = ct_dataset(generate_uid(), generate_uid(), 1)
            assert assoc.send_c_store(ds).Status == status.SUCCESS
        finally:
            assoc.release()
