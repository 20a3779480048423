"""``python -m engine reindex`` and ``python -m engine verify``: the index rebuilt from the
storage folder (``engine/reindex/``), or the two checked against each other
(``engine/verify.py``).

Each prints its result as one JSON object on stdout, its progress on stderr, and each
problem as an ``error:`` line on stderr (what the new index could not take from the
old one as ``note:`` lines). Exit status: 0 all is well; 1 problems found (files that
could not be indexed; files missing, changed or unindexed) or a failure explained by
an ``error:`` line (an engine running on the folder, no index, ...); 2 a bad
configuration; 130 interrupted (reindex: the index was left as it was).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import uvloop

from engine import config as config_module
from engine.errors import EngineError
from engine.progress import Bar, report_result
from engine.reindex import reindex
from engine.verify import verify

COMMANDS = ("reindex", "verify")
# Problems listed one per line on stderr before "... and N more" (all are in the JSON).
SHOWN = 50
INTERRUPTED = 130


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rebuild = commands.add_parser(
        "reindex",
        help="rebuild the index from the storage folder alone (the engine must be stopped)",
    )
    rebuild.add_argument("--config", type=Path, help="config.toml to use (default: config.toml)")
    rebuild.add_argument(
        "--force",
        action="store_true",
        help="rebuild even when the storage folder holds far fewer files than the index lists",
    )
    check = commands.add_parser(
        "verify",
        help="check every indexed file's size and digest, and find files no row names"
        " (works while the engine runs)",
    )
    check.add_argument("--config", type=Path, help="config.toml to use (default: config.toml)")


def run(
    args: argparse.Namespace, default_config: Path, setup_logging: Callable[[str], None]
) -> int:
    """Run ``reindex`` or ``verify``; returns the exit status."""
    setup_logging("WARNING")  # the progress bar is the news; warnings and errors still show
    try:
        config = config_module.load(args.config or default_config)
        config_module.require_sqlite(config, args.command)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "reindex":
            rebuilt = uvloop.run(reindex(config, Bar(), args.force))
            for note in rebuilt.notes():
                print(f"note: {note}", file=sys.stderr)
            return report_result(rebuilt.summary(), rebuilt.problems, SHOWN)
        checked = verify(config, Bar())
        return report_result(checked.summary(), checked.problems, SHOWN)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        left = ": the index was left as it was" if args.command == "reindex" else ""
        print(f"\ninterrupted{left}", file=sys.stderr)
        return INTERRUPTED
