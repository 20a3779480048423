"""Command line: ``python -m engine serve|stats|backup|restore|reindex|verify --config PATH``.

The only place that configures logging and starts an event loop (uvloop).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import orjson
import uvloop

from engine import certificates, forwarding, maintenance
from engine import config as config_module
from engine.backup import command as backup_command
from engine.backup import schedule as backup_schedule
from engine.config import Config
from engine.dicom.listener import Listener, make_listener
from engine.dicom.qr import QueryEngine
from engine.errors import EngineError
from engine.index.backends import make_index
from engine.index.backends import stats as index_stats
from engine.index.backups import summary_of as backup_summary_of
from engine.pipeline import Pipeline
from engine.recovery import recover
from engine.storage.area import StorageArea
from engine.web.metrics import MetricsServer
from engine.web.server import DicomWebServer

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("config.toml")


async def serve(
    config: Config,
    stop: asyncio.Event,
    on_ready: Callable[[Pipeline, Listener], None] | None = None,
) -> None:
    """Run the engine until ``stop`` is set; then drain, answer and close cleanly.

    ``on_ready`` is called once the server listens (tests use it to watch the pipeline).
    """
    # [tls] first: a certificate that cannot be used stops the engine before anything opens.
    dicom_tls = certificates.dicom_port(config)
    https = certificates.https_context(config)
    storage = StorageArea(
        config.storage.path,
        config.storage.quarantine,
        config.storage.fsync,
        config.storage.sync_method,
        node=config_module.node_name(config),
    )
    index = make_index(
        config, storage.flusher(None if config.index.shared else config.index.path)
    )
    await index.open()
    try:
        was_clean = await asyncio.to_thread(storage.prepare, await index.has_instances())
        await recover(storage, index, was_clean)
        pipeline = Pipeline(config, index, storage)
        async with pipeline.running():
            query = QueryEngine(index.reads, config.query, config.storage.path)
            listener = make_listener(
                config.dicom,
                config.ingest,
                pipeline.receiver,
                pipeline.spooler,
                query,
                pipeline.decoder,
                metrics=pipeline.metrics,
                tls=dicom_tls,
            )
            await listener.start()
            web = None
            if config.dicomweb is not None:
                # /metrics goes on the DICOMweb server unless [metrics] gives it a port.
                on_web = pipeline.metrics if config.metrics is None else None
                web = DicomWebServer(
                    config,
                    config.dicomweb,
                    pipeline.receiver,
                    pipeline.decoder,
                    on_web,
                    https,
                    reads=index.reads,
                )
            metrics = MetricsServer(config.metrics, pipeline.metrics) if config.metrics else None
            try:
                if web is not None:
                    await web.start()
                if metrics is not None:
                    await metrics.start()
                log.info(
                    "engine ready: storage %s, index %s%s",
                    storage.root,
                    index.location,
                    f", node {storage.node}" if storage.node else "",
                )
                if on_ready is not None:
                    on_ready(pipeline, listener)
                # Stable studies and [[forward]] rules, and scheduled backups ([backup]
                # interval), until the engine stops.
                async with (
                    forwarding.running(config, index, query, pipeline.decoder),
                    backup_schedule.running(config, index),
                ):
                    await stop.wait()
                log.info("stopping: no new associations; finishing what is in flight")
            finally:
                if metrics is not None:
                    await metrics.stop()
                if web is not None:
                    await web.stop()
                await listener.stop(config.dicom.shutdown_grace)
            log.info("ingest summary: %s", orjson.dumps(pipeline.receiver.summary()).decode())
        storage.mark_clean()
        log.info("engine stopped cleanly")
    finally:
        await index.close()
        storage.release()


async def _serve_until_signal(config: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, stop)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pynetdicom logs every PDU at INFO; keep its warnings only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    threading.excepthook = _log_thread_crash


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    """An exception that ends a thread (ours or pynetdicom's) becomes one log record with
    its traceback: Python's default hook writes it to stderr piece by piece, where it
    interleaves with the records other threads log at the same moment."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    if args.exc_value is None:  # possible in the hook's signature, not seen from a thread
        log.error("uncaught exception in thread %s: %s", name, args.exc_type.__name__)
        return
    exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
    log.error("uncaught exception in thread %s", name, exc_info=exc_info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "run the DICOM server in the foreground (stop with SIGTERM or Ctrl-C)"),
        ("stats", "print the index's counts as one JSON object"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config.toml to use")
    backup_command.add_commands(commands)  # backup [--verify], restore
    maintenance.add_commands(commands)  # reindex, verify
    args = parser.parse_args(argv)
    if args.command in ("backup", "restore"):
        return backup_command.run(args, DEFAULT_CONFIG, _setup_logging)
    if args.command in maintenance.COMMANDS:
        return maintenance.run(args, DEFAULT_CONFIG, _setup_logging)
    try:
        config = config_module.load(args.config)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "serve":
            _setup_logging(config.log.level)
            log.info("configuration: %s", orjson.dumps(config_module.describe(config)).decode())
            uvloop.run(_serve_until_signal(config))
        elif args.command == "stats":
            counts: dict[str, object] = dict(uvloop.run(index_stats(config)))
            if not config.index.shared:
                last_backup = backup_summary_of(config.index.path)  # only once there was one
                if last_backup is not None:
                    counts["last_backup"] = last_backup
            sys.stdout.write(orjson.dumps(counts).decode() + "\n")
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
