"""The engine's own sockets: TCP_NODELAY on every accepted association."""

from __future__ import annotations

import socket
from pathlib import Path

from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from engine import status
from engine.dicom.listener import ThreadedListener
from engine.dicom.server import NativeServer
from tests.helpers import InProcess, ct_dataset, engine_in_thread


def server_socket(eng: InProcess) -> socket.socket:
    """The engine's side of the one open association, whichever transport has it."""
    listener = eng.listener
    if isinstance(listener, ThreadedListener):
        (association,) = listener.scp.ae.active_associations
        sock: socket.socket = association.dul.socket.socket
        return sock
    assert isinstance(listener, NativeServer)
    (native,) = listener.associations
    assert native.transport is not None
    found: socket.socket = native.transport.get_extra_info("socket")
    return found


def test_accepted_sockets_have_tcp_nodelay(tmp_path: Path) -> None:
    with engine_in_thread(tmp_path) as eng:
        ae = AE(ae_title="NODELAY")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", eng.port, ae_title=eng.ae_title)
        assert assoc.is_established
        try:
            sock = server_socket(eng)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            ds = ct_dataset(generate_uid(), generate_uid(), 1)
            assert assoc.send_c_store(ds).Status == status.SUCCESS
        finally:
            assoc.release()


# Every transfer syntax the engine must take, as a scanner would propose it.
SYNTAXES = [
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE lossless
]
PRIVATE_SOP_CLASS = "1.3.12.2.1107.5.9.1"  # a vendor's private storage class


def test_every_syntax_and_private_classes_are_accepted(tmp_path: Path) -> None:
    with engine_in_thread(tmp_path) as eng:
        ae = AE(ae_title="PROPOSER")
        for syntax in SYNTAXES:
            ae.add_requested_context(CTImageStorage, [syntax])
        ae.add_requested_context(PRIVATE_SOP_CLASS, ["1.2.840.10008.1.2.1"])
        assoc = ae.associate("127.0.0.1", eng.port, ae_title=eng.ae_title)
        try:
            assert assoc.is_established
            accepted = {
                (cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
            }
            assert {(CTImageStorage, s) for s in SYNTAXES} <= accepted
            assert (PRIVATE_SOP_CLASS, "1.2.840.10008.1.2.1") in accepted
            assert assoc.rejected_contexts == []
        finally:
            assoc.release()


def test_more_associations_than_pynetdicoms_default_at_once(tmp_path: Path) -> None:
    """pynetdicom allows 10 by default; a trauma burst from several scanners needs more."""
    with engine_in_thread(tmp_path, dicom={"maximum_associations": 24}) as eng:
        ae = AE(ae_title="MANY")
        ae.add_requested_context(CTImageStorage)
        associations = [
            ae.associate("127.0.0.1", eng.port, ae_title=eng.ae_title) for _ in range(20)
        ]
        try:
            assert all(a.is_established for a in associations)
            ds = ct_dataset(generate_uid(), generate_uid(), 1)
            assert associations[-1].send_c_store(ds).Status == status.SUCCESS
        finally:
            for assoc in associations:
                assoc.release()
