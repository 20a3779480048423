"""Query/retrieve services answered from the index: C-FIND and C-MOVE (C-GET to come).

``QueryEngine.search`` is plain blocking code over a read-only index connection
(``engine/index/reads.py``, SQLite or PostgreSQL; the matching itself is
``engine/query/``); it runs in a worker thread. The native transport
uses it through ``QueryService`` (responses as encoded messages, C-CANCEL between
matches); the pynetdicom adapter calls ``search`` from its C-FIND handler. Neither the
matching nor the statuses depend on the transport.

A C-MOVE selects the instances named by the identifier's unique keys
(``QueryEngine.instances``) and sends them with a C-STORE SCU (``store_scu.py``, in a
worker thread) to a destination declared in ``[[dicom.peers]]``; pending responses
carry the counts as the sub-operations end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from engine import codecs, status
from engine.config import PeerConfig, QueryConfig
from engine.dicom import dimse
from engine.dicom.dimse import CommandField
from engine.dicom.services import Request, StoreChannel
from engine.dicom.store_scu import Destination, Instance, Progress, send
from engine.index.reads import READ_ERRORS, Reads, reads_of
from engine.query.find import Model, QueryError, plan, run
from engine.storage import part10

log = logging.getLogger(__name__)

# The C-FIND SOP classes of the two information models (PS3.4 C.6.1 and C.6.2).
PATIENT_ROOT_FIND = str(PatientRootQueryRetrieveInformationModelFind)
STUDY_ROOT_FIND = str(StudyRootQueryRetrieveInformationModelFind)
FIND_MODELS = {PATIENT_ROOT_FIND: Model.PATIENT_ROOT, STUDY_ROOT_FIND: Model.STUDY_ROOT}
MOVE_MODELS = {
    str(PatientRootQueryRetrieveInformationModelMove): Model.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelMove): Model.STUDY_ROOT,
}
GET_MODELS = {
    str(PatientRootQueryRetrieveInformationModelGet): Model.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelGet): Model.STUDY_ROOT,
}
QUERY_RETRIEVE_CLASSES = frozenset(FIND_MODELS) | frozenset(MOVE_MODELS) | frozenset(GET_MODELS)
UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))

# The unique key of each level, and the index column it selects instances by.
_UNIQUE_KEYS = {
    "PATIENT": ("PatientID", "s.patient_id"),
    "STUDY": ("StudyInstanceUID", "i.study_uid"),
    "SERIES": ("SeriesInstanceUID", "i.series_uid"),
    "IMAGE": ("SOPInstanceUID", "i.sop_instance_uid"),
}
# SQLite's default limit on host parameters is far above this; a longer list is refused.
MAX_KEYS = 1000


@dataclass
class Found:
    """What one C-FIND gives: the matches (each answered ``pending``), then the final
    status and its comment."""

    matches: list[Dataset] = field(default_factory=list)
    pending: int = status.PENDING
    status: int = status.SUCCESS
    comment: str | None = None


class QueryEngine:
    """Blocking queries over the index (one short-lived read-only connection each)."""

    def __init__(self, index: Reads | Path, config: QueryConfig, storage_root: Path) -> None:
        self.reads = reads_of(index)
        self.config = config
        self.storage_root = storage_root

    def instances(self, model: Model, identifier: Dataset) -> list[Instance]:
        """The stored instances a C-MOVE identifier names, in study/series/number order.

        Raises ``QueryError``: the level must be one of the model's and its unique key
        present (one UID, or a list).
        """
        level = str(identifier.get("QueryRetrieveLevel", "")).strip()
        if level not in _UNIQUE_KEYS or (level == "PATIENT" and model is Model.STUDY_ROOT):
            raise QueryError(
                status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                f"QueryRetrieveLevel {level!r} is not one of this model's",
            )
        keyword, column = _UNIQUE_KEYS[level]
        value = identifier.get(keyword)
        listed = [] if value is None else [value] if isinstance(value, str) else list(value)
        values = [text for v in listed if (text := str(v).strip())]
        if not values:
            raise QueryError(
                status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                f"a {level} level C-MOVE needs {keyword}",
            )
        if len(values) > MAX_KEYS:
            raise QueryError(status.UNABLE_TO_PROCESS, f"more than {MAX_KEYS} {keyword} values")
        marks = ",".join("?" * len(values))
        sql = (
            "SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax, i.path"
            " FROM instances i JOIN studies s ON s.study_uid = i.study_uid"
            f" WHERE {column} IN ({marks})"
            " ORDER BY s.study_date, i.study_uid, i.series_uid, i.instance_number,"
            " i.sop_instance_uid"
        )
        with self.reads.connect() as db:
            rows = db.execute(sql, values).fetchall()
        return [
            Instance(uid, sop_class, syntax, self.storage_root / path)
            for uid, sop_class, syntax, path in rows
        ]

    def search(self, model: Model, identifier: Dataset) -> Found:
        try:
            query = plan(
                model,
                identifier,
                fuzzy_names=self.config.case_insensitive_names,
                dialect=self.reads.dialect,
            )
        except QueryError as exc:
            log.warning("C-FIND refused: %s", exc.message)
            return Found(status=exc.status, comment=exc.message)
        found = Found(pending=query.pending_status)
        limit = self.config.max_matches
        try:
            with self.reads.connect() as db:
                matches = run(db, query, limit)
                found.matches.extend(matches)
                if matches.limit_hit:
                    found.status = status.OUT_OF_RESOURCES
                    found.comment = f"more than {limit} matches; narrow the query"
                    log.warning("C-FIND stopped at %d matches (query.max_matches)", limit)
        except READ_ERRORS as exc:
            log.error("C-FIND failed on the index: %s", exc)
            return Found(status=status.UNABLE_TO_PROCESS, comment=f"index error: {exc}")
        return found


def decode_identifier(data: bytes, transfer_syntax: str) -> Dataset:
    syntax = UID(transfer_syntax)
    return read_dataset(
        BytesIO(data),
        is_implicit_VR=syntax.is_implicit_VR,
        is_little_endian=syntax.is_little_endian,
    )


def encode_identifier(ds: Dataset, transfer_syntax: str) -> bytes:
    syntax = UID(transfer_syntax)
    data = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian)
    if data is None:
        raise ValueError("the identifier cannot be encoded")
    return data


def stored_dataset(instance: Instance) -> bytes:
    """The dataset bytes of a file the engine stored (after its file meta group)."""
    raw = instance.path.read_bytes()
    return raw[part10.dataset_offset(raw) :]


class Decompressor:
    """Decompression of a stored instance for a destination that takes only uncompressed
    syntaxes: the engine's decoder process pool (``codecs.Decoder``, started on first
    use), called from a worker thread (the C-STORE SCU's, or pynetdicom's)."""

    def __init__(self, decoder: codecs.Decoder, loop: asyncio.AbstractEventLoop) -> None:
        self.decoder = decoder
        self.loop = loop

    def __call__(self, instance: Instance) -> Dataset:
        work = self.decoder.process(stored_dataset(instance), instance.transfer_syntax, True)
        data, syntax = asyncio.run_coroutine_threadsafe(work, self.loop).result()
        ds = decode_identifier(data, syntax)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = UID(instance.sop_class_uid)
        ds.file_meta.MediaStorageSOPInstanceUID = UID(instance.sop_instance_uid)
        ds.file_meta.TransferSyntaxUID = UID(syntax)
        return ds


class QueryService:
    """C-FIND, C-MOVE and C-CANCEL for the native transport."""

    def __init__(
        self,
        engine: QueryEngine,
        peers: tuple[PeerConfig, ...] = (),
        ae_title: str = "",
        decoder: codecs.Decoder | None = None,
    ) -> None:
        """``decoder``: decompresses instances for destinations that refuse their
        compressed syntax (without one, those sub-operations fail)."""
        self.engine = engine
        self.decoder = decoder
        self.peers = {peer.ae_title.strip(): peer for peer in peers}
        self.ae_title = ae_title
        # (peer address, peer port, message ID) of the requests being answered -> cancelled
        self._running: dict[tuple[str, int, int], bool] = {}

    def cancel(self, request: Request) -> None:
        origin, message_id = request.origin, request.command.message_id_being_responded_to
        key = (origin.peer_ip, origin.peer_port, message_id or 0)
        if key in self._running:
            self._running[key] = True
            log.info("C-FIND %d of %s cancelled", message_id, origin.calling_ae)

    async def find(self, request: Request) -> AsyncIterator[tuple[bytes, bytes | None]]:
        command = request.command
        message_id = command.message_id or 0
        sop_class = command.affected_sop_class_uid or request.abstract_syntax
        model = FIND_MODELS.get(sop_class)

        def final(code: int, comment: str | None = None) -> tuple[bytes, None]:
            return (
                dimse.encode_response(
                    CommandField.C_FIND_RSP,
                    message_id,
                    code,
                    affected_sop_class_uid=sop_class,
                    error_comment=comment,
                ),
                None,
            )

        if model is None:
            yield final(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"not a C-FIND class: {sop_class}")
            return
        if request.dataset is None:
            yield final(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "C-FIND without an identifier")
            return
        try:
            identifier = decode_identifier(request.dataset, request.transfer_syntax)
        except Exception as exc:
            log.warning(
                "C-FIND identifier from %s does not parse: %s", request.origin.calling_ae, exc
            )
            yield final(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"identifier does not parse: {exc}"
            )
            return
        key = (request.origin.peer_ip, request.origin.peer_port, message_id)
        self._running[key] = False
        try:
            found = await asyncio.to_thread(self.engine.search, model, identifier)
            log.info(
                "C-FIND from %s at %s level: %d matches",
                request.origin.calling_ae,
                identifier.get("QueryRetrieveLevel", "?"),
                len(found.matches),
            )
            pending = dimse.encode_response(
                CommandField.C_FIND_RSP,
                message_id,
                found.pending,
                affected_sop_class_uid=sop_class,
                has_dataset=True,
            )
            for match in found.matches:
                await asyncio.sleep(0)  # a C-CANCEL in the meantime is seen here
                if self._running[key]:
                    yield final(status.CANCEL)
                    return
                yield pending, encode_identifier(match, request.transfer_syntax)
            yield final(found.status, found.comment)
        finally:
            del self._running[key]

    async def _select(self, request: Request, model: Model) -> list[Instance] | QueryError:
        """The instances a C-MOVE or C-GET identifier names, or why there are none."""
        assert request.dataset is not None
        try:
            identifier = decode_identifier(request.dataset, request.transfer_syntax)
            return await asyncio.to_thread(self.engine.instances, model, identifier)
        except QueryError as exc:
            return exc
        except Exception as exc:
            log.warning("retrieve identifier from %s unusable: %s", request.origin.calling_ae, exc)
            return QueryError(status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc))

    async def move(self, request: Request) -> AsyncIterator[tuple[bytes, bytes | None]]:
        """A C-MOVE: pending responses with the counts, then the final one."""
        command = request.command
        message_id = command.message_id or 0
        sop_class = command.affected_sop_class_uid or request.abstract_syntax
        model = MOVE_MODELS.get(sop_class)
        origin = request.origin

        def response(code: int, progress: Progress | None, comment: str | None = None) -> bytes:
            return retrieve_response(
                CommandField.C_MOVE_RSP, message_id, sop_class, code, progress, comment
            )

        peer = self.peers.get((command.move_destination or "").strip())
        if model is None or request.dataset is None:
            yield response(status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None, "not a C-MOVE"), None
            return
        if peer is None:
            log.warning(
                "C-MOVE from %s to unknown destination %r refused",
                origin.calling_ae,
                command.move_destination,
            )
            comment = f"unknown destination {command.move_destination!r}; see [[dicom.peers]]"
            yield response(status.MOVE_DESTINATION_UNKNOWN, None, comment), None
            return
        selected = await self._select(request, model)
        if isinstance(selected, QueryError):
            yield response(selected.status, None, selected.message), None
            return
        instances = selected
        log.info(
            "C-MOVE from %s: %d instances to %s (%s:%d)",
            origin.calling_ae,
            len(instances),
            peer.ae_title,
            peer.host,
            peer.port,
        )
        key = (origin.peer_ip, origin.peer_port, message_id)
        self._running[key] = False
        loop = asyncio.get_running_loop()
        # Progress copies from the SCU's thread, then None once it has returned (both
        # arrive through the loop's callback queue, in that order).
        updates: asyncio.Queue[Progress | None] = asyncio.Queue()

        def progressed(progress: Progress) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, progress)

        try:
            job = asyncio.ensure_future(
                asyncio.to_thread(
                    send,
                    Destination(peer.ae_title, peer.host, peer.port),
                    instances,
                    calling_ae=self.ae_title,
                    move_originator_ae=origin.calling_ae,
                    move_originator_message_id=message_id,
                    on_progress=progressed,
                    cancelled=lambda: self._running.get(key, True),
                    decompress=Decompressor(self.decoder, loop) if self.decoder else None,
                )
            )
            job.add_done_callback(lambda _: updates.put_nowait(None))
            while (progress := await updates.get()) is not None:
                if progress.remaining:
                    yield response(status.PENDING, progress), None
            final = await job
        finally:
            cancelled = self._running.pop(key, False)
        code = final_status(final, cancelled)
        yield response(code, final), failed_list(final, request.transfer_syntax)

    async def get(self, request: Request) -> AsyncIterator[tuple[bytes, bytes | None]]:
        """A C-GET: the instances go back on the requestor's own association, as C-STOREs
        on the storage contexts it proposed with the SCP role; pending responses carry the
        counts, the final one the failed UIDs."""
        command = request.command
        message_id = command.message_id or 0
        sop_class = command.affected_sop_class_uid or request.abstract_syntax
        model = GET_MODELS.get(sop_class)
        origin = request.origin

        def response(code: int, progress: Progress | None, comment: str | None = None) -> bytes:
            return retrieve_response(
                CommandField.C_GET_RSP, message_id, sop_class, code, progress, comment
            )

        channel = request.channel
        if model is None or request.dataset is None or channel is None:
            comment = "not a C-GET this transport can answer"
            yield response(status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None, comment), None
            return
        selected = await self._select(request, model)
        if isinstance(selected, QueryError):
            yield response(selected.status, None, selected.message), None
            return
        instances = selected
        log.info("C-GET from %s: %d instances", origin.calling_ae, len(instances))
        loop = asyncio.get_running_loop()
        decompress = Decompressor(self.decoder, loop) if self.decoder else None
        progress = Progress(remaining=len(instances))
        key = (origin.peer_ip, origin.peer_port, message_id)
        self._running[key] = False
        try:
            for instance in instances:
                if self._running[key]:
                    break
                result = await self._get_one(channel, instance, decompress)
                progress.count(instance.sop_instance_uid, result)
                if progress.remaining:
                    yield response(status.PENDING, progress), None
        finally:
            cancelled = self._running.pop(key, False)
        code = final_status(progress, cancelled)
        yield response(code, progress), failed_list(progress, request.transfer_syntax)

    async def _get_one(
        self, channel: StoreChannel, instance: Instance, decompress: Decompressor | None
    ) -> int:
        """One C-GET sub-operation; the C-STORE-RSP status, or a failure status."""
        uid = instance.sop_instance_uid
        compressed = instance.transfer_syntax not in UNCOMPRESSED
        syntaxes = [instance.transfer_syntax]
        if not compressed or decompress is not None:
            syntaxes += [ts for ts in UNCOMPRESSED if ts != instance.transfer_syntax]
        choice = channel.context_for(instance.sop_class_uid, syntaxes)
        if choice is None:
            log.warning(
                "C-GET: no accepted storage context for %s (%s)", uid, instance.sop_class_uid
            )
            return status.UNABLE_TO_PERFORM_SUBOPERATIONS
        context_id, syntax = choice
        try:
            data = await asyncio.to_thread(dataset_in, instance, syntax, decompress)
        except Exception as exc:  # a file or decoder failure is this instance's alone
            log.warning("C-GET: cannot prepare %s: %s", uid, exc)
            return status.UNABLE_TO_PERFORM_SUBOPERATIONS
        return await channel.c_store(context_id, instance.sop_class_uid, uid, data)


def retrieve_response(
    command_field: int,
    message_id: int,
    sop_class: str,
    code: int,
    progress: Progress | None,
    comment: str | None = None,
) -> bytes:
    """A C-MOVE-RSP or C-GET-RSP command set, with the counts when there are any."""
    counts: dict[str, int | None] = {}
    if progress is not None:
        counts = {
            "remaining": progress.remaining if code == status.PENDING else None,
            "completed": progress.completed,
            "failed": progress.failed,
            "warning": progress.warning,
        }
    return dimse.encode_response(
        command_field,
        message_id,
        code,
        affected_sop_class_uid=sop_class,
        error_comment=comment,
        has_dataset=bool(progress and progress.failed_uids and code != status.PENDING),
        **counts,  # type: ignore[arg-type]
    )


def final_status(progress: Progress, cancelled: bool) -> int:
    """The last C-MOVE/C-GET response's status (PS3.4 C.4.2.1.5, C.4.3.1.4)."""
    if cancelled:
        return status.CANCEL
    if not progress.failed and not progress.warning:
        return status.SUCCESS
    if progress.completed or progress.warning:
        return status.SUBOPERATIONS_WITH_FAILURES
    return status.UNABLE_TO_PERFORM_SUBOPERATIONS


def failed_list(progress: Progress, transfer_syntax: str) -> bytes | None:
    """The final response's identifier: the Failed SOP Instance UID List, if any failed."""
    if not progress.failed_uids:
        return None
    failed = Dataset()
    failed.FailedSOPInstanceUIDList = progress.failed_uids
    return encode_identifier(failed, transfer_syntax)


def dataset_in(instance: Instance, syntax: str, decompress: Decompressor | None) -> bytes:
    """A stored instance's dataset encoded in ``syntax`` (blocking: a worker thread)."""
    if syntax == instance.transfer_syntax:
        return stored_dataset(instance)
    if instance.transfer_syntax in UNCOMPRESSED:
        data = stored_dataset(instance)
        return encode_identifier(decode_identifier(data, instance.transfer_syntax), syntax)
    if decompress is None:
        raise ValueError(f"{instance.transfer_syntax} would need decompressing")
    return encode_identifier(decompress(instance), syntax)
