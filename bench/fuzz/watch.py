"""What the campaign judges on the engine from outside: its log, its memory and CPU, and the
TCP connections still open on its port. Linux only (/proc).

The log is read line by line. Expected per-input reactions are WARNING records
("protocol error from ...; aborting"). Unexpected: every record at ERROR or CRITICAL,
every uncaught exception in a thread ("Exception in thread ...", written by Python
outside logging) and every fatal error, with these exceptions:

- pynetdicom logs at ERROR, with a traceback, every bad input it rejects on the
  pynetdicom transport ("Unknown PDU type received", "Received an invalid DIMSE
  message", its state machine's own exceptions). Records of the ``pynetdicom.*``
  loggers are its reaction, counted apart as ``library``, unless they name one of our
  handlers (how pynetdicom reports an exception in a handler the engine bound).
- An uncaught exception that kills one of pynetdicom's own threads (named by
  pynetdicom, or with pynetdicom's frames and none of ours) is a defect of that
  transport, not of the engine's code: ``library_crashes``, a finding of its own.

The engine logs such an exception as one record ("uncaught exception in thread NAME",
engine/cli.py) followed by its traceback, written whole under logging's lock. Python's
default hook, which an older engine or another program may still use, writes it to
stderr piece by piece, outside that lock, so on the pynetdicom transport it interleaves
with other records, even within a line: a record header is looked for anywhere in a
line, not only at its start, and such crashes are judged from what can be pieced
together (a thread name lost in the interleaving can leave one judged ours).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_HEADER = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<name>[\w.]+): (?P<message>.*)$"
)
_THREAD_CRASH = re.compile(r"Exception in thread (?P<thread>[^:]*)")
# The record the engine logs for an exception that ended a thread (engine/cli.py), with
# the traceback after it: whole, unlike Python's default hook's output.
_THREAD_CRASH_RECORD = re.compile(r"^uncaught exception in thread (?P<thread>.*)$")
_FATAL = ("Fatal Python error", "Exception ignored in")
TRACEBACK = "Traceback (most recent call last)"
THREAD_START = "_bootstrap_inner"  # the first frame of every thread's traceback
UNEXPECTED_LEVELS = frozenset({"ERROR", "CRITICAL"})
LIBRARY_LOGGER = "pynetdicom."
LIBRARY_FRAME = "/pynetdicom/"
# How pynetdicom names its threads ("Exception in thread Thread-7 (run_reactor):").
LIBRARY_THREADS = ("AcceptorThread", "RequestorThread", "(run_reactor)")
OUR_FRAME = re.compile(r'File "[^"]*/engine/[^"]*"')
SITE_PACKAGES = "/site-packages/"
# How pynetdicom names an exception raised by one of the engine's handlers (scp.py).
OUR_HANDLERS = ("handler bound to", "event handler 'handle_")
# The line naming a traceback's exception ("KeyError: 3").
_EXCEPTION_LINE = re.compile(r"^(?!Exception in)[A-Za-z_.]*(Error|Exception|Interrupt|Exit)\b")
# Lines after "Exception in thread" searched for its traceback's frames and exception.
CRASH_WINDOW = 40
SHOWN = 20  # unexpected records kept in the report, with up to SHOWN_LINES lines each
SHOWN_LINES = 30
_TEMPLATE_SUBSTITUTIONS = (
    (re.compile(r"\(\d+\.\d+\.\d+\.\d+:\d+\)"), "(PEER)"),
    (re.compile(r"\d+\.\d+\.\d+\.\d+:\d+"), "PEER"),
    (re.compile(r"[\d.]{8,}"), "UID"),
    (re.compile(r"0x[0-9A-Fa-f]+"), "0xN"),
    (re.compile(r"\b\d+(\.\d+)?\b"), "N"),
    (re.compile(r"b'[^']*'|b\"[^\"]*\""), "BYTES"),
)
TEMPLATE_LENGTH = 110
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")
MB = 1024 * 1024
# /proc/net/tcp states that hold a connection (not LISTEN, TIME_WAIT or CLOSE).
_TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0B": "CLOSING",
}


def template(message: str) -> str:
    """A log message with its peers, UIDs and numbers blanked, for counting by kind."""
    for pattern, replacement in _TEMPLATE_SUBSTITUTIONS:
        message = pattern.sub(replacement, message)
    return message[:TEMPLATE_LENGTH]


@dataclass
class LogVerdict:
    records: int = 0
    levels: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    library: Counter[str] = field(default_factory=Counter)  # pynetdicom's own reactions
    unexpected: list[str] = field(default_factory=list)  # the first ``SHOWN``
    unexpected_count: int = 0
    unexpected_kinds: Counter[str] = field(default_factory=Counter)
    # Uncaught exceptions that killed one of pynetdicom's threads.
    library_crashes: Counter[str] = field(default_factory=Counter)
    library_crash_examples: list[str] = field(default_factory=list)

    def _unexpected(self, kind: str, lines: list[str]) -> None:
        self.unexpected_count += 1
        self.unexpected_kinds[template(kind)] += 1
        if len(self.unexpected) < SHOWN:
            self.unexpected.append("\n".join(lines[:SHOWN_LINES]))


def _ours(lines: list[str]) -> bool:
    """Whether traceback lines run through the engine's own code."""
    return any(OUR_FRAME.search(line) and SITE_PACKAGES not in line for line in lines)


def _exception(lines: list[str]) -> str:
    """The first exception line among ``lines`` (the end of the traceback that starts
    there), or ""."""
    for line in lines:
        start = line.lstrip()
        if _EXCEPTION_LINE.match(start):
            return start
    return ""


def _traceback(window: list[str]) -> list[str]:
    """The lines of the thread's traceback that starts ``window``, up to its exception line.

    A log record is written whole (its header, then its own traceback if it has one), so
    a record found in the middle is left out with its traceback: a thread's traceback
    starts in ``threading.py``, a record's does not.
    """
    out = [window[0]]
    i = 1
    while i < len(window):
        line = window[i]
        if _THREAD_CRASH.search(line):
            break
        if _HEADER.search(line):
            after = window[i + 1 : i + 3]
            own = (
                len(after) == 2 and after[0].startswith(TRACEBACK) and THREAD_START not in after[1]
            )
            i += 1
            while own and i < len(window) and not _EXCEPTION_LINE.match(window[i].lstrip()):
                i += 1
            i += 1 if own else 0
            continue
        out.append(line)
        if _EXCEPTION_LINE.match(line.lstrip()):
            break
        i += 1
    return out


def _thread_name(crash: re.Match[str], following: list[str]) -> str:
    """The name in "Exception in thread NAME:"; when a log record was written between
    those words and the name, the name ends the next line."""
    name = crash["thread"]
    header = _HEADER.search(crash.string, crash.start("thread"))
    if header is not None:
        name = crash.string[crash.start("thread") : header.start()]
        if not name.strip() and following:
            name = following[0]
    return name.strip().rstrip(":")


def _thread_crash(verdict: LogVerdict, thread: str, window: list[str]) -> None:
    lines = _traceback(window)
    kind = f"Exception in thread {thread}: {_exception(lines[1:])}"
    # pynetdicom runs the engine's handlers inside try/except of its own: an exception
    # that kills a thread it named is its own.
    named = any(name in thread for name in LIBRARY_THREADS)
    if named or (not _ours(lines) and any(LIBRARY_FRAME in line for line in lines)):
        verdict.library_crashes[template(kind)] += 1
        if len(verdict.library_crash_examples) < SHOWN:
            verdict.library_crash_examples.append("\n".join(lines[:SHOWN_LINES]))
    else:
        verdict._unexpected(kind, lines)


def judge_log(text: str) -> LogVerdict:
    verdict = LogVerdict()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        for crash in _THREAD_CRASH.finditer(line):
            verdict.records += 1
            verdict.levels["UNCAUGHT"] += 1
            _thread_crash(
                verdict, _thread_name(crash, lines[i + 1 : i + 2]), lines[i : i + CRASH_WINDOW]
            )
        if line.startswith(_FATAL):
            verdict.records += 1
            verdict.levels["FATAL"] += 1
            verdict._unexpected(line, lines[i : i + SHOWN_LINES])
        header = _HEADER.search(line)
        if header is None:
            continue
        level, name, message = header["level"], header["name"], header["message"]
        verdict.records += 1
        record = _THREAD_CRASH_RECORD.match(message)
        if record is not None:
            verdict.levels["UNCAUGHT"] += 1
            _thread_crash(verdict, record["thread"], [line, *lines[i + 1 : i + CRASH_WINDOW]])
            continue
        verdict.levels[level] += 1
        if level == "WARNING":
            verdict.warnings[template(message)] += 1
        elif level in UNEXPECTED_LEVELS:
            if name.startswith(LIBRARY_LOGGER) and not any(m in message for m in OUR_HANDLERS):
                verdict.library[template(f"{name}: {message}")] += 1
            else:
                verdict._unexpected(f"{level} {name}: {message}", lines[i : i + SHOWN_LINES])
    return verdict


def judge_log_file(path: Path) -> LogVerdict:
    return judge_log(path.read_text(errors="replace") if path.exists() else "")


# -- the process -----------------------------------------------------------------------------


def memory(pid: int) -> tuple[float, float]:
    """(resident MB now, peak resident MB) of one process, from /proc/PID/status."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024 / MB
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of one process (its threads included)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def open_connections(port: int) -> Counter[str]:
    """TCP connections whose local end is 127.0.0.1:``port`` (the engine's side), by state."""
    states: Counter[str] = Counter()
    wanted = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(wanted) and fields[3] in _TCP_STATES:
                states[_TCP_STATES[fields[3]]] += 1
    return states
