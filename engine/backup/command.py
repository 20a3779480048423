"""``python -m engine backup`` and ``python -m engine restore``.

Each prints its result as one JSON object on stdout and its progress on stderr. Exit
status: 0 all is well; 1 a failure, explained on stderr by ``error:`` lines (including
a backup that could not copy some files, or a verification that found a damaged or
missing one); 2 a bad configuration or command line; 130 interrupted (Ctrl-C): run the
same command again to resume.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from engine import config as config_module
from engine.backup.create import Backup, Source
from engine.backup.folder import SAME_DISK, BackupFolder, same_filesystem
from engine.backup.restore import restore
from engine.backup.verify import verify
from engine.config import Config
from engine.errors import EngineError
from engine.progress import Bar, report_result

# Problems listed one per line on stderr before "... and N more".
SHOWN = 20
INTERRUPTED = 130


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backup = commands.add_parser(
        "backup",
        help="copy what the backup folder lacks of the storage folder and the index"
        " (works while the engine runs); or --verify a backup",
    )
    backup.add_argument("--config", type=Path, help="config.toml to use (default: config.toml)")
    backup.add_argument("--to", type=Path, help="the backup folder (default: [backup] destination)")
    backup.add_argument(
        "--verify",
        action="store_true",
        help="check every file of the backup against its manifest instead (needs only --to)",
    )
    restore_ = commands.add_parser(
        "restore", help="restore a backup into an empty storage folder and index"
    )
    restore_.add_argument("--from", dest="source", type=Path, required=True, help="the backup")
    restore_.add_argument("--config", type=Path, help="config.toml to use (default: config.toml)")
    restore_.add_argument(
        "--force",
        action="store_true",
        help="restore over a storage folder or index that is not empty",
    )


def run(
    args: argparse.Namespace, default_config: Path, setup_logging: Callable[[str], None]
) -> int:
    """Run ``backup`` or ``restore``; returns the exit status."""
    setup_logging("WARNING")  # the progress bar is the news; warnings and errors still show
    try:
        config = None
        if args.command == "restore" or not (args.verify and args.to is not None):
            config = config_module.load(args.config or default_config)
            config_module.require_sqlite(config, args.command)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "restore":
            assert config is not None
            return _restore(args.source, config, args.force)
        destination = args.to or (config.backup.destination if config is not None else None)
        if destination is None:
            print(
                "error: no backup folder: give --to DIR or set [backup] destination",
                file=sys.stderr,
            )
            return 2
        if args.verify:
            return _verify(destination)
        assert config is not None
        return _backup(config, destination)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return INTERRUPTED


def _backup(config: Config, destination: Path) -> int:
    if same_filesystem(destination, config.storage.path):
        print(f"warning: {SAME_DISK}", file=sys.stderr)
    job = Backup(Source.of(config), destination.resolve(), Bar())
    job.run()
    return report_result(job.summary(), job.problems, SHOWN)


def _verify(destination: Path) -> int:
    folder = BackupFolder(destination.resolve())
    report = verify(folder, Bar())
    return report_result(report.summary(folder), report.problems, SHOWN)


def _restore(source: Path, config: Config, force: bool) -> int:
    storage, index = config.storage.path, config.index.path
    result = restore(BackupFolder(source.resolve()), storage, index, force, Bar())
    return report_result(result.summary(storage, index), result.problems, SHOWN)
