"""C-FIND at IMAGE level (Study Root), as a viewer asks: which instances a series holds."""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from engine import status

CALLING_AE = "BENCHFIND"
_MATCH = (status.PENDING, status.PENDING_UNSUPPORTED_KEYS)


class FindError(RuntimeError):
    """The query could not be made or was answered with a failure."""


def find_images(
    port: int, called_ae: str, series: Iterable[tuple[str, str]], timeout: float
) -> dict[str, set[str]]:
    """The SOP Instance UIDs the engine on 127.0.0.1:``port`` returns for each
    (Study Instance UID, Series Instance UID), one association for all."""
    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    found: dict[str, set[str]] = {}
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
        if not assoc.is_established:
            raise FindError("the engine refused the C-FIND association")
        try:
            for study_uid, series_uid in series:
                found[series_uid] = _query(assoc, study_uid, series_uid)
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        ae.shutdown()
    return found


def _query(assoc: Association, study_uid: str, series_uid: str) -> set[str]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = study_uid
    identifier.SeriesInstanceUID = series_uid
    identifier.SOPInstanceUID = ""
    uids: set[str] = set()
    for rsp, match in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        if "Status" not in rsp:
            raise FindError(f"no answer to the C-FIND of series {series_uid}")
        code = int(rsp.Status)
        if code in _MATCH and match is not None:
            uids.add(str(match.SOPInstanceUID))
        elif code != status.SUCCESS:
            raise FindError(f"C-FIND of series {series_uid} answered 0x{code:04X}")
    return uids
