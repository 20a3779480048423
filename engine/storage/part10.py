"""DICOM Part 10 framing: preamble, "DICM", file meta information, then the dataset.

The dataset bytes are stored exactly as received; only the header is built here.
"""

from __future__ import annotations

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

# Under pydicom's UID root, which its users may extend; identifies files we wrote.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.7301.1"
IMPLEMENTATION_VERSION_NAME = "INGEST_010"
PREAMBLE = b"\x00" * 128 + b"DICM"


def header(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str
) -> bytes:
    """Preamble, prefix and file meta group for one instance."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return PREAMBLE + buffer.getvalue()
