"""Progress of a long job (a backup, a verification, a restore): files and bytes done.

The job calls ``start`` once it knows how much there is, ``advance`` as it goes and
``finish`` at the end. ``Bar`` draws a bar on stderr for the command line; ``LogProgress``
writes a log line now and then, for jobs run inside the engine.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Protocol, TextIO

import orjson

MB = 1024 * 1024


class Progress(Protocol):
    def start(self, what: str, files: int, nbytes: int) -> None: ...

    def advance(self, files: int, nbytes: int) -> None: ...

    def finish(self) -> None: ...


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Counts:
    """What is done of what there is, and how fast it goes."""

    def __init__(self) -> None:
        self.what = ""
        self.files = self.nbytes = self.files_done = self.bytes_done = 0
        self.began = time.monotonic()

    def reset(self, what: str, files: int, nbytes: int) -> None:
        self.what, self.files, self.nbytes = what, files, nbytes
        self.files_done = self.bytes_done = 0
        self.began = time.monotonic()

    def add(self, files: int, nbytes: int) -> None:
        self.files_done += files
        self.bytes_done += nbytes

    @property
    def fraction(self) -> float:
        if self.nbytes:
            return min(1.0, self.bytes_done / self.nbytes)
        return min(1.0, self.files_done / self.files) if self.files else 1.0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.began, 1e-6)
        rate = self.bytes_done / elapsed
        left = (self.nbytes - self.bytes_done) / rate if rate > 0 else 0.0
        return (
            f"{self.what} {self.fraction:4.0%}  {self.files_done}/{self.files} files"
            f"  {self.bytes_done / MB:.1f}/{self.nbytes / MB:.1f} MB"
            f"  {rate / MB:.1f} MB/s  {_clock(elapsed)} elapsed, {_clock(left)} left"
        )


class Bar:
    """A bar on a terminal, redrawn in place at most ``every`` seconds; on anything else
    (a log file, a pipe) one plain line every ``every_plain`` seconds."""

    WIDTH = 24

    def __init__(
        self, stream: TextIO | None = None, every: float = 0.2, every_plain: float = 5.0
    ) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every if self.tty else every_plain
        self.counts = _Counts()
        self._shown = 0.0
        self._drawn = False

    def start(self, what: str, files: int, nbytes: int) -> None:
        self.counts.reset(what, files, nbytes)
        self._shown = 0.0
        self._draw()

    def advance(self, files: int, nbytes: int) -> None:
        self.counts.add(files, nbytes)
        if time.monotonic() - self._shown >= self.every:
            self._draw()

    def finish(self) -> None:
        self._draw()
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False

    def _draw(self) -> None:
        self._shown = time.monotonic()
        line = self.counts.line()
        if self.tty:
            filled = round(self.counts.fraction * self.WIDTH)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self.stream.write(f"\r[{bar}] {line}\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._drawn = True


class LogProgress:
    """A log line at the start, every ``every`` seconds and at the end."""

    def __init__(self, logger: logging.Logger, every: float = 30.0) -> None:
        self.logger = logger
        self.every = every
        self.counts = _Counts()
        self._shown = 0.0
        self._lines = 0

    def start(self, what: str, files: int, nbytes: int) -> None:
        self.counts.reset(what, files, nbytes)
        self._shown = time.monotonic()
        self._lines = 0
        self.logger.info("%s: %d files, %.1f MB", what, files, nbytes / MB)

    def advance(self, files: int, nbytes: int) -> None:
        self.counts.add(files, nbytes)
        if time.monotonic() - self._shown >= self.every:
            self._shown = time.monotonic()
            self._lines += 1
            self.logger.info("%s", self.counts.line())

    def finish(self) -> None:
        if self._lines:  # a short job: its start line and its result say it all
            self.logger.info("%s", self.counts.line())


def report_result(summary: dict[str, Any], problems: list[str], shown: int) -> int:
    """A long job's end, as its commands print it: the summary as one JSON line on
    stdout, then up to ``shown`` problems as ``error:`` lines; the exit status."""
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    for problem in problems[:shown]:
        print(f"error: {problem}", file=sys.stderr)
    if len(problems) > shown:
        print(f"error: ... and {len(problems) - shown} more", file=sys.stderr)
    return 1 if problems else 0
