"""The OHIF viewer in headless Chromium, pointed at a DICOMweb root.

The harness of ``tests/test_ohif.py``; nothing here knows which server answers DICOMweb, so
the same code drives our engine and Orthanc (``python -m tests.ohif --orthanc`` runs the whole
flow against Orthanc and prints every DICOMweb request the viewer made).

- ``ohif_dist`` fetches ``@ohif/app`` with ``npm pack`` once into a cache folder; its
  ``dist/`` is a ready static site.
- ``OhifSite`` serves that folder on 127.0.0.1 with a generated ``app-config.js`` whose only
  data source is the DICOMweb root; it can also forward a path prefix to an upstream server,
  for servers that do not answer CORS (Orthanc's DICOMweb plugin).
- ``DicomwebLog`` records every request the page makes under the root, with its status.
- ``chromium_page`` opens a page in the Debian Chromium package through Playwright.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import Page, Request, Response, ViewportSize

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
)
NPM_TIMEOUT = 600.0
# Playwright's default for each wait, in milliseconds.
PAGE_TIMEOUT_MS = 30_000
VIEWPORT_SIZE: ViewportSize = {"width": 1280, "height": 900}
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "d" / "ohif"
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
TOURS = ["basicViewerTour"]
PATIENTS = {"Alpha^Anna": "OHIF-A", "Bravo^Ben": "OHIF-B"}
SLICES = 5
PHANTOM_SIZE = 128
# A viewport counts as rendered when the middle of its canvas has at least this many grey
# levels and this fraction of pixels brighter than BLACK.
MIN_GREY_LEVELS = 32
MIN_LIT_FRACTION = 0.25
BLACK = 8

MIME_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "application/javascript; charset=utf-8",
    ".mjs": "application/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".xml": "application/xml",
    ".txt": "text/plain; charset=utf-8",
}
# Headers that describe one hop, never forwarded by the proxy.
HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}
)


def missing_tools() -> str | None:
    """Why the browser test cannot run here, or None when it can."""
    if shutil.which("npm") is None:
        return "npm is not installed (apt-get install npm): it fetches the OHIF viewer"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed (apt-get install chromium chromium-driver)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -e '.[dev]')"
    return None


def ohif_dist(cache: Path) -> Path:
    """The viewer's ``dist/`` folder, unpacked under ``cache``; ``npm pack`` runs only once."""
    name = f"ohif-app-{OHIF_VERSION}"
    dist = cache / name / "dist"
    if (dist / "index.html").exists():
        return dist
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{name}.tgz"
    if not tarball.exists():
        # Packed beside the final name, then renamed: an interrupted run leaves no half file.
        spec = f"{OHIF_PACKAGE}@{OHIF_VERSION}"
        packing = cache / f"{name}.npm"
        shutil.rmtree(packing, ignore_errors=True)
        packing.mkdir()
        npm = subprocess.run(
            ["npm", "pack", spec, "--ignore-scripts", "--pack-destination", str(packing)],
            cwd=packing,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT,
        )
        if npm.returncode != 0 or not (packing / tarball.name).exists():
            raise RuntimeError(f"npm pack {spec} failed ({npm.returncode}):\n{npm.stderr}")
        (packing / tarball.name).rename(tarball)
        shutil.rmtree(packing)
    # Unpacked beside the final folder, then renamed, for the same reason.
    partial = cache / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(tarball) as archive:
        archive.extractall(partial, filter="data")
    shutil.rmtree(cache / name, ignore_errors=True)
    (partial / "package").rename(cache / name)
    shutil.rmtree(partial)
    return dist


def app_config(root: str) -> str:
    """``window.config`` with one DICOMweb data source at ``root``."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "engine",
        "configuration": {
            "friendlyName": "engine",
            "name": "engine",
            "wadoUriRoot": root,
            "qidoRoot": root,
            "wadoRoot": root,
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": None,
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "engine",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


class _SiteHandler(BaseHTTPRequestHandler):
    """Static files with a single-page-app fallback, plus an optional forwarding prefix."""

    protocol_version = "HTTP/1.1"
    server: _SiteServer

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_OPTIONS(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        site = self.server
        if site.proxy_prefix is not None and path.startswith(site.proxy_prefix):
            self._forward()
        elif self.command not in ("GET", "HEAD"):
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"", "text/plain")
        elif path == "/app-config.js":
            self._send(HTTPStatus.OK, site.config_js, MIME_TYPES[".js"])
        else:
            self._static(path)

    def _static(self, path: str) -> None:
        dist = self.server.dist
        relative = urllib.parse.unquote(path).lstrip("/")
        target = (dist / relative).resolve()
        if not target.is_relative_to(dist) or not target.is_file():
            # Unknown paths are the app's own routes (/viewer?StudyInstanceUIDs=...).
            target = dist / "index.html"
        mime = MIME_TYPES.get(target.suffix, "application/octet-stream")
        self._send(HTTPStatus.OK, target.read_bytes(), mime)

    def _send(self, status: HTTPStatus, body: bytes, mime: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", mime)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self) -> None:
        upstream = self.server.upstream
        assert upstream is not None
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        connection = http.client.HTTPConnection(upstream.netloc, timeout=60)
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in HOP_HEADERS and key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
        finally:
            connection.close()


class _SiteServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, dist: Path, config_js: bytes, proxy_prefix: str | None, upstream: str | None
    ) -> None:
        super().__init__(("127.0.0.1", 0), _SiteHandler)
        self.dist = dist.resolve()
        self.config_js = config_js
        self.proxy_prefix = proxy_prefix
        self.upstream = urllib.parse.urlsplit(upstream) if upstream else None


@dataclass
class OhifSite:
    """The viewer served on an ephemeral port of 127.0.0.1.

    ``root`` is the DICOMweb root the viewer queries. When ``upstream`` is set (an origin such
    as ``http://127.0.0.1:8042``), requests whose path starts with ``root``'s path are forwarded
    there and the viewer uses this site's own origin: the DICOMweb server needs no CORS.
    """

    dist: Path
    root: str
    upstream: str | None = None
    url: str = ""
    _server: _SiteServer | None = None
    _thread: threading.Thread | None = None

    def start(self) -> OhifSite:
        prefix = urllib.parse.urlsplit(self.root).path.rstrip("/") + "/"
        server = _SiteServer(self.dist, b"", prefix if self.upstream else None, self.upstream)
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        if self.upstream:
            self.root = self.url + prefix.rstrip("/")
        server.config_js = app_config(self.root).encode()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="ohif-site", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        self._server = self._thread = None

    def __enter__(self) -> OhifSite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(eq=False)
class DicomwebCall:
    """One request of the page under the DICOMweb root, as the browser saw it."""

    method: str
    url: str
    accept: str
    status: int | None = None
    failure: str | None = None
    content_type: str = ""

    @property
    def failed(self) -> bool:
        return self.failure is not None or self.status is None or self.status >= 400

    def describe(self, root: str) -> str:
        path = self.url[len(root) :] if self.url.startswith(root) else self.url
        outcome = f"{self.status} {self.content_type}" if self.status else "no response"
        if self.failure:
            outcome = f"{self.failure} ({outcome})"
        return f"{self.method} {path}  Accept: {self.accept or '-'}  -> {outcome}"


@dataclass
class DicomwebLog:
    """Every request a page makes under ``root``: pending, finished or failed."""

    root: str
    calls: list[DicomwebCall] = field(default_factory=list)
    _pending: dict[Request, DicomwebCall] = field(default_factory=dict)
    _last_change: float = field(default_factory=time.monotonic)

    def attach(self, page: Page) -> None:
        page.on("request", self._on_request)
        page.on("requestfinished", self._on_finished)
        page.on("requestfailed", self._on_failed)

    def _mine(self, request: Request) -> bool:
        return request.url.startswith(self.root)

    def _on_request(self, request: Request) -> None:
        if self._mine(request):
            call = DicomwebCall(request.method, request.url, request.headers.get("accept", ""))
            self.calls.append(call)
            self._pending[request] = call
            self._last_change = time.monotonic()

    def _on_finished(self, request: Request) -> None:
        call = self._pending.pop(request, None)
        if call is not None:
            response: Response | None = request.response()
            if response is not None:
                call.status = response.status
                call.content_type = response.headers.get("content-type", "")
            self._last_change = time.monotonic()

    def _on_failed(self, request: Request) -> None:
        call = self._pending.pop(request, None)
        if call is not None:
            call.failure = request.failure or "failed"
            response = request.response()
            call.status = response.status if response is not None else None
            self._last_change = time.monotonic()

    def wait_quiet(self, page: Page, quiet: float = 1.5, timeout: float = 30.0) -> None:
        """Until no request under the root has been pending or changed for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._pending and time.monotonic() - self._last_change >= quiet:
                return
            page.wait_for_timeout(100)
        pending = "\n".join(c.describe(self.root) for c in self._pending.values())
        raise TimeoutError(f"DICOMweb requests still pending after {timeout}s:\n{pending}")

    def failures(self) -> list[DicomwebCall]:
        pending = set(self._pending.values())
        return [c for c in self.calls if c not in pending and c.failed]

    def report(self) -> str:
        return "\n".join(c.describe(self.root) for c in self.calls)


@contextmanager
def chromium_page(console: list[str] | None = None) -> Iterator[Page]:
    """A page of the Debian Chromium, headless; ``console`` collects the page's errors."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS), timeout=PAGE_TIMEOUT_MS
        )
        try:
            context = browser.new_context(viewport=VIEWPORT_SIZE, service_workers="block")
            # A returning user: the onboarding tour would cover the viewport.
            context.add_init_script(f"localStorage.setItem('shownTours', '{json.dumps(TOURS)}')")
            page = context.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            if console is not None:
                page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: console.append(f"uncaught: {e}"))
            yield page
        finally:
            browser.close()


def write_phantom_study(folder: Path, patient_name: str, patient_id: str) -> str:
    """One CT series of ``SLICES`` phantom slices as Part 10 files; returns the Study UID.

    A water disc with a bone ring and a marker in its upper left quadrant, windowed for soft
    tissue: a rendered slice has many grey levels, and a flipped or byte-swapped one shows.
    """
    import numpy as np
    from pydicom.uid import generate_uid

    from tests.helpers import ct_dataset

    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    size = PHANTOM_SIZE
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size - 0.5
    radius = np.hypot(x, y)
    rng = np.random.default_rng(len(patient_name))
    for number in range(1, SLICES + 1):
        hu = np.full((size, size), -1000.0)
        hu[radius < 0.4] = 40.0 + 300.0 * (x[radius < 0.4] + y[radius < 0.4])
        hu[(radius >= 0.36) & (radius < 0.4)] = 700.0
        marker = (abs(x + 0.15) < 0.05) & (abs(y + 0.15 - 0.01 * number) < 0.05)
        hu[marker] = 1000.0
        hu += rng.normal(0.0, 15.0, hu.shape)
        ds = ct_dataset(
            study_uid,
            series_uid,
            number,
            patient_id=patient_id,
            patient_name=patient_name,
            size=size,
        )
        ds.PixelData = (hu + 1024.0).round().astype(np.int16).tobytes()
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.save_as(folder / f"{number:04d}.dcm", enforce_file_format=True)
    return study_uid


def ohif_name(patient_name: str) -> str:
    """How the study list shows a Person Name: ``Family^Given`` as ``Family, Given``."""
    family, _, given = patient_name.partition("^")
    return f"{family}, {given}" if given else family


def show_study_list(
    page: Page, site: OhifSite, names: list[str], screenshot: Path, timeout: float = 30.0
) -> list[str]:
    """Open the study list and wait until it has a row for each patient of ``names``.

    Saves a screenshot; returns each row as ``"cell | cell | ..."`` (the patient first), all
    the rows there are when ``timeout`` ends if some name never showed.
    """
    page.goto(site.url + "/")
    rows = page.locator("tbody tr[aria-selected]")
    deadline = time.monotonic() + timeout
    while True:
        texts = [
            " | ".join(cell for cell in map(str.strip, text.splitlines()) if cell)
            for text in rows.all_inner_texts()
        ]
        shown = {text.split(" | ")[0] for text in texts}
        if shown.issuperset(names) or time.monotonic() >= deadline:
            break
        page.wait_for_timeout(250)
    page.screenshot(path=screenshot)
    return texts


def show_study(
    page: Page, site: OhifSite, study_uid: str, screenshot: Path, timeout: float = 30.0
) -> tuple[int, float]:
    """Open the viewer on one study and wait until its viewport shows an image.

    Saves a screenshot of the viewport; returns the grey levels and lit fraction of its last
    look at the viewport canvas (see ``grey_levels``), rendered or not when ``timeout`` ends.
    """
    page.goto(f"{site.url}/viewer?StudyInstanceUIDs={study_uid}")
    pane = page.locator('[data-cy="viewport-pane"]').first
    canvas = pane.locator("canvas.cornerstone-canvas").first
    canvas.wait_for(state="visible")
    deadline = time.monotonic() + timeout
    stats = grey_levels(canvas.screenshot())
    while not rendered(stats) and time.monotonic() < deadline:
        page.wait_for_timeout(250)
        stats = grey_levels(canvas.screenshot())
    pane.screenshot(path=screenshot)
    return stats


def grey_levels(png: bytes) -> tuple[int, float]:
    """Distinct grey levels and the fraction of non-black pixels in the middle half of ``png``.

    The middle half leaves out the corner overlays (date, window level, slice number), so an
    empty viewport with its text does not count as a rendered image.
    """
    from PIL import Image

    image = Image.open(BytesIO(png)).convert("L")
    w, h = image.size
    histogram = image.crop((w // 4, h // 4, w - w // 4, h - h // 4)).histogram()
    total = sum(histogram)
    levels = sum(1 for count in histogram if count)
    lit = 1.0 - sum(histogram[:BLACK]) / total if total else 0.0
    return levels, lit


def rendered(stats: tuple[int, float]) -> bool:
    levels, lit = stats
    return levels >= MIN_GREY_LEVELS and lit >= MIN_LIT_FRACTION


@dataclass
class Orthanc:
    """Debian's Orthanc with its DICOMweb plugin, on ephemeral ports of 127.0.0.1."""

    folder: Path
    ae_title: str = "ORTHANC"
    port: int = 0
    http_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        from tests.helpers import dcmtk_env, free_port

        self.port, self.http_port = free_port(), free_port()
        config = {
            "Name": "OHIFTEST",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "StorageCompression": False,
            "Plugins": [ORTHANC_DICOMWEB],
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        with open(self.folder / "orthanc.log", "ab") as log:
            self.process = subprocess.Popen(
                ["Orthanc", str(path)], env=dcmtk_env(), stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=5)
                connection.request("GET", "/system")
                if connection.getresponse().status == HTTPStatus.OK:
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("Orthanc did not start in 30 s")

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
            self.process = None


def main() -> None:
    """``python -m tests.ohif --orthanc``: the test's flow against Orthanc's DICOMweb."""
    import argparse
    import tempfile

    from tests.helpers import dcmtk_env

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--orthanc", action="store_true", required=True)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=DEFAULT_CACHE / "artifacts-orthanc")
    args = parser.parse_args()
    reason = missing_tools()
    if reason:
        raise SystemExit(reason)
    dist = ohif_dist(args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        studies = {
            name: write_phantom_study(folder / "data" / pid, name, pid)
            for name, pid in PATIENTS.items()
        }
        orthanc = Orthanc(folder / "orthanc").start()
        try:
            subprocess.run(
                [
                    *("storescu", "-aet", "OHIFTEST", "-aec", orthanc.ae_title, "+sd", "+r"),
                    *("127.0.0.1", str(orthanc.port), str(folder / "data")),
                ],
                env=dcmtk_env(),
                check=True,
                timeout=120,
            )
            with OhifSite(dist, "/dicom-web", upstream=orthanc.origin) as site:
                log = DicomwebLog(site.root)
                console: list[str] = []
                with chromium_page(console) as page:
                    log.attach(page)
                    names = [ohif_name(name) for name in studies]
                    rows = show_study_list(page, site, names, args.out / "ohif-study-list.png")
                    print("study list:", *rows, sep="\n  ")
                    first = next(iter(studies.values()))
                    stats = show_study(page, site, first, args.out / "ohif-viewport.png")
                    log.wait_quiet(page)
                print(f"viewport: {stats[0]} grey levels, {stats[1]:.0%} lit")
                print("DICOMweb requests:", log.report(), sep="\n")
                print("console errors:", *console, sep="\n  ")
                print("screenshots in", args.out)
        finally:
            orthanc.stop()


if __name__ == "__main__":
    main()
