"""The DICOMweb server: aiohttp in the engine's own event loop, under ``[dicomweb]``.

Routes (below ``base_path``, PS3.18 chapter 10):

```
GET  /studies  /series  /instances  /studies/{study}/series  /studies/{study}/instances
     /studies/{study}/series/{series}/instances                         QIDO-RS (search)
GET  /studies/{study}[/series/{series}[/instances/{instance}]]          WADO-RS (instances)
GET  .../metadata                                                       WADO-RS (metadata)
GET  .../instances/{instance}/frames/{frames}                           WADO-RS (frames)
GET  .../instances/{instance}/bulk/{tag}                                WADO-RS (bulk data)
GET  .../instances/{instance}[/frames/{frame}]/rendered, .../thumbnail  WADO-RS (rendered)
POST /studies  /studies/{study}                                         STOW-RS
```

and, at the server's root (not under ``base_path``) when the engine has no ``[metrics]``
section of its own, ``GET /metrics``: the Prometheus metrics (``engine/web/metrics.py``),
behind the same authentication as the rest.

Every error is a JSON body ``{"error": ..., "message": ...}`` with its HTTP status and
one log line. Searches and metadata read the index on worker threads (read-only
connections); files are read on worker threads; decompression runs in the engine's
decoder processes; stored instances are streamed part by part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from engine import codecs
from engine import status as dimse_status
from engine.config import Config, DicomWebConfig
from engine.index.reads import READ_ERRORS, Reads, SQLiteReads
from engine.metrics import Metrics
from engine.model import Origin
from engine.query.levels import Level
from engine.stages.receive import Receiver
from engine.web import media, qido, rendered, stow, wado
from engine.web import metrics as metrics_page
from engine.web.catalog import Catalog, StoredInstance
from engine.web.media import DICOM, DICOM_JSON, Multipart, NotAcceptable, is_uid

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Seconds open HTTP requests get to finish when the engine stops.
SHUTDOWN_GRACE = 5.0
# Bytes of one STOW-RS part read at a time.
READ_CHUNK = 1024 * 1024
_JSON_TYPES = frozenset({DICOM_JSON, "application/json", "*/*", "application/*"})
_EXPOSED = "Content-Type, Content-Length, Content-Location, Warning"


class ApiError(Exception):
    """An answer other than success: its HTTP status and a readable message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> web.Response:
    body = {"error": HTTPStatus(status).phrase, "status": status, "message": message}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


_STATUS_OF: dict[type[Exception], int] = {
    qido.BadQuery: 400,
    wado.BadRequest: 400,
    rendered.RenderError: 400,
    wado.NotFound: 404,
    NotAcceptable: 406,
}


class DicomWebServer:
    def __init__(
        self,
        config: Config,
        web_config: DicomWebConfig,
        receiver: Receiver,
        decoder: codecs.Decoder,
        metrics: Metrics | None = None,
        ssl_context: ssl.SSLContext | None = None,
        reads: Reads | None = None,
    ) -> None:
        """``metrics``: serve them at ``/metrics`` too (None: they are served elsewhere).
        ``ssl_context``: HTTPS (``[dicomweb] tls``, engine/certificates.py). ``reads``:
        the running index's read connections (default: the SQLite file configured)."""
        self.config = config
        self.ssl_context = ssl_context
        self.web = web_config
        self.receiver = receiver
        self.decoder = decoder
        self.metrics = metrics
        self.reads: Reads = reads if reads is not None else SQLiteReads(config.index.path)
        self.catalog = Catalog(self.reads, config.storage.path)
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.app = self._build()

    # -- set-up -----------------------------------------------------------------------

    def _build(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._preflight, self._authenticate])
        app.on_response_prepare.append(self._cors_headers)
        base = self.web.base_path
        study = "/studies/{study}"
        series = study + "/series/{series}"
        instance = series + "/instances/{instance}"
        get = [
            ("/studies", self.search_studies),
            ("/series", self.search_series),
            ("/instances", self.search_instances),
            (study + "/series", self.search_series),
            (study + "/instances", self.search_instances),
            (series + "/instances", self.search_instances),
            (study, self.retrieve),
            (series, self.retrieve),
            (instance, self.retrieve),
            (study + "/metadata", self.metadata),
            (series + "/metadata", self.metadata),
            (instance + "/metadata", self.metadata),
            (instance + "/frames/{frames}", self.frames),
            (instance + "/bulk/{tag}", self.bulk),
            (instance + "/rendered", self.rendered),
            (instance + "/frames/{frames}/rendered", self.rendered),
            (instance + "/thumbnail", self.thumbnail),
            (instance + "/frames/{frames}/thumbnail", self.thumbnail),
            (series + "/thumbnail", self.thumbnail),
            (study + "/thumbnail", self.thumbnail),
        ]
        for path, handler in get:
            app.router.add_get(base + path, handler)
        app.router.add_post(base + "/studies", self.store)
        app.router.add_post(base + study, self.store)
        if self.metrics is not None:
            app.router.add_get(metrics_page.PATH, metrics_page.handler(self.metrics))
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(
            self.app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE, handle_signals=False
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.web.host, self.web.port, ssl_context=self.ssl_context)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.web.port
        scheme = "https" if self.ssl_context is not None else "http"
        log.info(
            "DICOMweb listening on %s://%s:%d%s",
            scheme,
            self.web.host,
            self.port,
            self.web.base_path,
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            log.info("DICOMweb stopped")

    # -- middlewares ------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            status, message = exc.status, exc.message
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            status, message = exc.status, exc.text or exc.reason
            if status == 404 and message.startswith("404"):
                message = f"no such resource: {request.path}"
            elif status == 405:
                message = f"{request.method} is not allowed on {request.path}"
        except READ_ERRORS as exc:
            log.error("DICOMweb %s %s: index error: %s", request.method, request.path_qs, exc)
            return _error(503, f"the index cannot be read right now: {exc}")
        except Exception as exc:
            mapped = next((s for t, s in _STATUS_OF.items() if isinstance(exc, t)), None)
            if mapped is None:
                log.exception("DICOMweb %s %s failed", request.method, request.path_qs)
                return _error(500, f"internal error: {exc!r}")
            status, message = mapped, str(exc)
        log.warning("DICOMweb %s %s -> %d: %s", request.method, request.path_qs, status, message)
        response = _error(status, message)
        if status == 401:
            scheme = "Bearer" if self.web.bearer_token else "Basic"
            response.headers["WWW-Authenticate"] = f'{scheme} realm="dicomweb"'
        return response

    def _allowed_origin(self, request: web.Request) -> str | None:
        origin = request.headers.get("Origin")
        origins = self.web.cors_origins
        if origin is None or not origins:
            return None
        if "*" in origins:
            return "*" if not (self.web.bearer_token or self.web.username) else origin
        return origin if origin in origins else None

    @web.middleware
    async def _preflight(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        origin = self._allowed_origin(request)
        if origin is None:
            raise ApiError(403, f"origin {request.headers.get('Origin')!r} is not allowed")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": "GET, HEAD, POST, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get(
                    "Access-Control-Request-Headers", "*"
                ),
                "Access-Control-Allow-Credentials": "true",
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            },
        )

    async def _cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = self._allowed_origin(request)
        if origin is not None and "Access-Control-Allow-Origin" not in response.headers:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = _EXPOSED
            response.headers["Vary"] = "Origin"
            if origin != "*":
                response.headers["Access-Control-Allow-Credentials"] = "true"

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        token, user = self.web.bearer_token, self.web.username
        if not token and not user:
            return await handler(request)
        given = request.headers.get("Authorization", "")
        scheme, _, credentials = given.partition(" ")
        if token and scheme.lower() == "bearer":
            if hmac.compare_digest(credentials.strip().encode(), token.encode()):
                return await handler(request)
        elif user and scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            name, _, password = decoded.partition(":")
            good_name = hmac.compare_digest(name.encode(), user.encode())
            good_password = hmac.compare_digest(password.encode(), self.web.password.encode())
            if good_name and good_password:
                return await handler(request)
        what = "no credentials" if not given else "wrong credentials"
        raise ApiError(401, f"authentication required ({what}) from {request.remote}")

    # -- helpers ----------------------------------------------------------------------

    def _base_url(self, request: web.Request) -> str:
        return f"{request.scheme}://{request.host}{self.web.base_path}"

    @staticmethod
    def _uids(request: web.Request) -> tuple[str, str | None, str | None]:
        info = request.match_info
        for name in ("study", "series", "instance"):
            value = info.get(name)
            if value is not None and not is_uid(value):
                raise ApiError(400, f"{name} {value!r} is not a valid UID")
        return info["study"], info.get("series"), info.get("instance")

    async def _instances(
        self, request: web.Request, *, with_headers: bool = False
    ) -> list[StoredInstance]:
        study, series, instance = self._uids(request)
        found = await asyncio.to_thread(
            self.catalog.instances, study, series, instance, with_headers=with_headers
        )
        if not found:
            what = (
                f"instance {instance}"
                if instance
                else f"series {series}"
                if series
                else f"study {study}"
            )
            raise ApiError(404, f"{what} is not stored here")
        return found

    async def _dataset_bytes(
        self, instance: StoredInstance, uncompressed: bool
    ) -> tuple[bytes, str]:
        """The stored dataset (after its meta group), decompressed when asked; its syntax."""
        raw, offset = await asyncio.to_thread(wado.read_stored, instance)
        data, syntax = raw[offset:], instance.transfer_syntax
        if uncompressed and syntax not in media.UNCOMPRESSED_SYNTAXES:
            try:
                data, syntax = await self.decoder.process(data, syntax, True)
            except codecs.DecodeError as exc:
                raise ApiError(
                    500, f"instance {instance.sop_instance_uid} cannot be decompressed: {exc}"
                ) from exc
        return data, syntax

    @staticmethod
    def _json(body: Any, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(body=orjson.dumps(body), content_type=DICOM_JSON, headers=headers)

    @staticmethod
    def _check_json_accepted(request: web.Request) -> None:
        ranges = media.accept_ranges(request.headers.get("Accept"))
        if not any(r.type in _JSON_TYPES for r in ranges):
            raise NotAcceptable(
                f"this server answers in {DICOM_JSON} only, not {request.headers.get('Accept')}"
            )

    # -- QIDO-RS ----------------------------------------------------------------------

    async def _search(self, request: web.Request, level: Level) -> web.Response:
        self._check_json_accepted(request)
        info = request.match_info
        for name in ("study", "series"):
            if name in info and not is_uid(info[name]):
                raise ApiError(400, f"{name} {info[name]!r} is not a valid UID")
        search = qido.parse(
            level,
            info.get("study"),
            info.get("series"),
            request.query.items(),
            self.web.max_results,
        )
        results, more = await asyncio.to_thread(
            qido.run_search, search, self.reads, self.config, self._base_url(request)
        )
        headers = {}
        if more:
            headers["Warning"] = '299 engine: "There are additional results that can be requested"'
        return self._json(results, headers)

    async def search_studies(self, request: web.Request) -> web.Response:
        return await self._search(request, Level.STUDY)

    async def search_series(self, request: web.Request) -> web.Response:
        return await self._search(request, Level.SERIES)

    async def search_instances(self, request: web.Request) -> web.Response:
        return await self._search(request, Level.IMAGE)

    # -- WADO-RS ----------------------------------------------------------------------

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        instances = await self._instances(request)
        accept = request.headers.get("Accept")
        syntaxes = [media.instance_syntax(accept, i.transfer_syntax) for i in instances]
        common = syntaxes[0] if len(set(syntaxes)) == 1 else None
        body = Multipart(DICOM, common)
        response = web.StreamResponse(headers={"Content-Type": body.content_type})
        await response.prepare(request)
        base = self._base_url(request)
        for n, (instance, syntax) in enumerate(zip(instances, syntaxes, strict=True)):
            try:
                content = await self._instance_file(instance, syntax)
            except (ApiError, wado.NotFound) as exc:
                # The status line is gone: leave the part out, say so in the log.
                log.error("WADO-RS: instance %s left out: %s", instance.sop_instance_uid, exc)
                continue
            location = wado.instance_url(base, instance)
            head = body.part_head(DICOM, syntax, location)
            await response.write((body.between() if n else b"") + head + content)
        await response.write(body.end())
        await response.write_eof()
        return response

    async def _instance_file(self, instance: StoredInstance, syntax: str) -> bytes:
        if syntax == instance.transfer_syntax:
            raw, _ = await asyncio.to_thread(wado.read_stored, instance)
            return raw
        data, current = await self._dataset_bytes(instance, uncompressed=True)
        if current != syntax:
            data = await asyncio.to_thread(wado.reencoded, data, current, syntax)
        return wado.part10_file(instance, data, syntax)

    async def metadata(self, request: web.Request) -> web.Response:
        self._check_json_accepted(request)
        instances = await self._instances(request, with_headers=True)
        base = self._base_url(request)

        def build() -> bytes:
            return orjson.dumps([wado.metadata(i, base) for i in instances])

        return web.Response(body=await asyncio.to_thread(build), content_type=DICOM_JSON)

    async def _frames_response(
        self, request: web.Request, instance: StoredInstance, numbers: list[int] | None
    ) -> web.StreamResponse:
        choice = media.frame_choice(request.headers.get("Accept"), instance.transfer_syntax)
        data, syntax = await self._dataset_bytes(instance, uncompressed=choice.uncompressed)

        def cut() -> list[bytes]:
            ds = wado.parse(data, syntax)
            wanted = numbers or list(range(1, int(ds.get("NumberOfFrames") or 1) + 1))
            return wado.frames(ds, wanted)

        parts = await asyncio.to_thread(cut)
        part_syntax = None if choice.uncompressed else choice.transfer_syntax
        if not choice.multipart:
            if len(parts) != 1:
                raise NotAcceptable("several frames go out as multipart/related only")
            content_type = choice.media_type
            if part_syntax:
                content_type += f"; transfer-syntax={part_syntax}"
            return web.Response(body=parts[0], headers={"Content-Type": content_type})
        body = Multipart(choice.media_type, part_syntax)
        chunks = []
        for n, frame in enumerate(parts):
            chunks.append(
                (body.between() if n else b"") + body.part_head(choice.media_type, part_syntax)
            )
            chunks.append(frame)
        chunks.append(body.end())
        return web.Response(body=b"".join(chunks), headers={"Content-Type": body.content_type})

    async def frames(self, request: web.Request) -> web.StreamResponse:
        numbers = wado.frame_numbers(request.match_info["frames"])
        (instance,) = await self._instances(request)
        return await self._frames_response(request, instance, numbers)

    async def bulk(self, request: web.Request) -> web.StreamResponse:
        text = request.match_info["tag"]
        try:
            tag = int(text, 16)
        except ValueError:
            raise ApiError(
                400, f"bulk data is named by its tag (8 hex digits), not {text!r}"
            ) from None
        (instance,) = await self._instances(request)
        if tag == wado.PIXEL_DATA:
            return await self._frames_response(request, instance, None)
        data, syntax = await self._dataset_bytes(instance, uncompressed=False)
        value = await asyncio.to_thread(lambda: wado.bulk_value(wado.parse(data, syntax), tag))
        choice = media.frame_choice(request.headers.get("Accept"), media.EXPLICIT_LITTLE)
        if not choice.multipart:
            return web.Response(body=value, content_type=media.OCTET_STREAM)
        body = Multipart(media.OCTET_STREAM)
        payload = body.part_head(media.OCTET_STREAM) + value + body.end()
        return web.Response(body=payload, headers={"Content-Type": body.content_type})

    async def _render(
        self, request: web.Request, instance: StoredInstance, thumbnail: bool
    ) -> web.Response:
        ranges = media.accept_ranges(request.headers.get("Accept"))
        media_type = None
        for r in ranges:
            if r.type in rendered.MEDIA_TYPES:
                media_type = r.type
            elif r.type in ("image/*", "*/*"):
                media_type = rendered.JPEG
            if media_type:
                break
        if media_type is None:
            raise NotAcceptable(
                f"rendered images are image/jpeg or image/png, not {request.headers.get('Accept')}"
            )
        query = request.query
        numbers = wado.frame_numbers(request.match_info.get("frames", "1"))
        if len(numbers) != 1:
            raise ApiError(400, "a rendered image is one frame")
        rendering = rendered.Rendering(
            media_type,
            frame=numbers[0],
            window=rendered.parse_window(query["window"]) if "window" in query else None,
            viewport=rendered.parse_viewport(query["viewport"]) if "viewport" in query else None,
            quality=rendered.parse_quality(query["quality"])
            if "quality" in query
            else rendered.DEFAULT_QUALITY,
        )
        if thumbnail:
            rendering = rendered.thumbnail(rendering)
        data, syntax = await self._dataset_bytes(instance, uncompressed=True)
        image = await asyncio.to_thread(
            lambda: rendered.render(wado.parse(data, syntax), rendering)
        )
        return web.Response(body=image, content_type=media_type)

    async def rendered(self, request: web.Request) -> web.Response:
        (instance,) = await self._instances(request)
        return await self._render(request, instance, thumbnail=False)

    async def thumbnail(self, request: web.Request) -> web.Response:
        instances = await self._instances(request)
        # A study's or series' thumbnail: its middle image.
        return await self._render(request, instances[len(instances) // 2], thumbnail=True)

    # -- STOW-RS ----------------------------------------------------------------------

    async def store(self, request: web.Request) -> web.Response:
        study = request.match_info.get("study")
        if study is not None and not is_uid(study):
            raise ApiError(400, f"study {study!r} is not a valid UID")
        content_type = request.headers.get("Content-Type", "")
        kind = media.accept_ranges(content_type)[0] if content_type else None
        if kind is None or kind.type != media.MULTIPART_RELATED or kind.related_type != DICOM:
            raise ApiError(
                415,
                f'STOW-RS takes multipart/related; type="{DICOM}", not {content_type or "nothing"}',
            )
        limit = self.web.max_request_size
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, f"the request has {request.content_length} bytes; at most {limit}")
        try:
            reader = await request.multipart()
        except (ValueError, AssertionError) as exc:
            raise ApiError(400, f"the multipart body cannot be read: {exc}") from exc
        response = stow.StowResponse(self._base_url(request), study)
        origin = Origin(request.remote or "", 0, "STOW-RS", "")
        stower = stow.Stower(self.receiver, origin, response)
        total = parts = 0
        try:
            while True:
                try:
                    part = await reader.next()
                except (ValueError, AssertionError) as exc:
                    raise ApiError(400, f"the multipart body is malformed: {exc}") from exc
                if part is None:
                    break
                if not isinstance(part, BodyPartReader):
                    raise ApiError(400, "nested multipart bodies are not accepted")
                parts += 1
                part_type = part.headers.get("Content-Type", DICOM).split(";")[0].strip().lower()
                chunks = []
                while chunk := await part.read_chunk(READ_CHUNK):
                    total += len(chunk)
                    if total > limit:
                        raise ApiError(413, f"the request is over {limit} bytes")
                    chunks.append(chunk)
                if part_type != DICOM:
                    response.add_failed(
                        "",
                        "",
                        dimse_status.CANNOT_UNDERSTAND,
                        f"a part of type {part_type} is not {DICOM}",
                    )
                    continue
                await stower.add(b"".join(chunks))
        except BaseException:
            stower.cancel()
            raise
        if parts == 0:
            raise ApiError(400, "the request holds no instance (no multipart part)")
        await stower.finish()
        log.info(
            "STOW-RS from %s: %d stored, %d failed",
            request.remote,
            len(response.stored),
            len(response.failed),
        )
        return web.Response(
            status=response.http_status, body=orjson.dumps(response.body()), content_type=DICOM_JSON
        )
