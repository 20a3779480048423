"""``GET /metrics`` over HTTP: on the DICOMweb server, or on a listener of its own.

Where the metrics are served follows the configuration:

- ``[metrics]`` present: on its own ``host:port`` (``MetricsServer``), without
  authentication: bind it to a management network or to 127.0.0.1.
- only ``[dicomweb]``: at ``/metrics`` on the DICOMweb server, at its root (not under
  ``base_path``), behind the same authentication as DICOMweb when that has one.
- neither: no metrics listener at all.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from engine.config import MetricsConfig
from engine.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)

PATH = "/metrics"
# Seconds an open scrape gets to finish when the engine stops.
SHUTDOWN_GRACE = 5.0


def handler(metrics: Metrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler answering ``GET /metrics`` with the text exposition format."""

    async def metrics_page(request: web.Request) -> web.Response:
        body = await metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    return metrics_page


class MetricsServer:
    """The metrics on their own port, for an engine that has ``[metrics]``."""

    def __init__(self, config: MetricsConfig, metrics: Metrics) -> None:
        self.config = config
        self.app = web.Application()
        self.app.router.add_get(PATH, handler(metrics))
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        self._runner = web.AppRunner(
            self.app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE, handle_signals=False
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        log.info("metrics listening on http://%s:%d%s", self.config.host, self.port, PATH)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
