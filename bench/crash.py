"""``python -m bench crash``: kill -9 the engine in the middle of bursts, round after round.

The promise under test: nothing acknowledged is lost (DESIGN.md, *Promises*). Each round

1. starts ``--senders`` scanner processes (``bench.scanner``), each with one association
   and its own series of ``--size`` x ``--size`` CT slices; a scanner first re-sends what
   the engine did not acknowledge in earlier rounds (as a scanner whose association
   broke retries), then its new slices. Every answer goes to the scanner's
   acknowledgement log, synced, the moment it arrives;
2. kills the engine with SIGKILL at a random moment of the burst: a delay drawn from
   the seeded generator, uniform over the burst's expected duration (measured in the
   rounds before);
3. restarts it on the same folder and times the restart until the engine accepts
   associations again (its recovery runs before that);
4. audits the storage folder and the index (``bench.audit``): every instance
   acknowledged in this round is there, parses and holds the bytes sent; those of
   earlier rounds still have their row and file; no orphan file, no dangling row, no
   temp file or journal left by the crashed run, counters right; nothing quarantined;
   and C-FIND at IMAGE level finds every instance acknowledged in the round.

The engine keeps one folder for the whole campaign: state accumulates, so a recovery
that leaves a little debris, or one that slows down as the archive grows, shows up
over the rounds (a fresh folder per round would hide both). An engine that exits
before our kill, fails to restart, or does not stop cleanly at the end counts as a
crash. After the last round the engine is stopped cleanly and every acknowledged
instance of the campaign is read back once more. Reports: ``crash.json`` and
``crash.md``; the exit status is 1 on any loss, violation or crash.

Everything runs on 127.0.0.1; every wait is bounded; the campaign stops only the
processes it started, by their PIDs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import crash_report, scanner
from bench.audit import QUARANTINE, Findings, Scratch, audit
from bench.find import FindError, find_images
from bench.generate import StudySpec
from bench.peers import START_TIMEOUT, STOP_TIMEOUT, EnginePeer
from bench.scanner import AckLog, Answer, ScannerJob, Share
from engine import status
from engine.config import QueryConfig

log = logging.getLogger(__name__)

# Defaults: 50 rounds take about seven minutes on 2 cores (bench/README.md, *Crash campaign*).
SENDERS = 3
INSTANCES_PER_ROUND = 450
SIZE = 256
# Seconds: a scanner's association timeouts; building the data; scanners ending after
# the kill; the longest kill delay whatever the estimate.
SCU_TIMEOUT = 15.0
READY_TIMEOUT = 120.0
SENDERS_END_TIMEOUT = 30.0
MAX_KILL_DELAY = 60.0
POLL = 0.005
# Instances per second assumed until a round has measured the burst.
INITIAL_RATE = 300.0
# Acknowledgements a round needs before its rate counts in the estimate.
RATE_SAMPLE_MIN = 20
# Round r's data use seed * ROUND_SEEDS + r: new UIDs each round, same for a seed.
ROUND_SEEDS = 100_000
CALLED_AE = "ENGINE"
# Start-up log lines of the engine's recovery worth counting (engine/recovery.py, area.py).
RECOVERY_LINES = {
    "temps_removed": re.compile(r"removed (\d+) temp files"),
    "replayed": re.compile(r"indexed (\d+) files written before an interrupted commit"),
}
# The engine's log lines start with their time (engine/cli.py sets the format).
LOG_TIME = "%Y-%m-%d %H:%M:%S,%f"
LOG_TIME_EXAMPLE = "2026-01-01 00:00:00,000"
READY_LINE = "engine ready"
RECOVERY_EVENTS = {
    "rows_forgotten": "was indexed but its file is missing",
    "rows_dropped": "is missing; removing its index row",
    "recovery_quarantined": "does not parse",
}


@dataclass(frozen=True)
class Settings:
    rounds: int
    senders: int
    instances_per_round: int
    size: int
    seed: int
    out: Path
    work: Path
    transport: str
    fsync: bool
    keep: bool

    @property
    def per_sender(self) -> int:
        return self.instances_per_round // self.senders


@dataclass
class RoundResult:
    round: int
    kill_delay_s: float  # the kill moment drawn, seconds after the go
    killed_at_s: float  # when the kill came (earlier if the burst was over)
    kill_after_burst: bool  # every request was answered (or every scanner gone) by then
    planned: int  # requests the scanners meant to send (new and re-sent)
    resent: int
    answered: int
    acknowledged: int
    acknowledged_resent: int
    other_statuses: dict[str, int]
    unanswered: int
    engine_crash: str | None  # the engine exited before our kill: how
    restart_s: float  # from the restart until the engine accepts associations
    startup_s: float | None  # of which the engine's own start-up, recovery included
    recovery: dict[str, int]
    verified: int
    violations: dict[str, int]
    examples: dict[str, list[str]]
    log_errors: list[str]
    stuck_senders: list[str] = field(default_factory=list)
    scanner_errors: list[str] = field(default_factory=list)  # refused, or failed to run
    # Seconds: scanners starting and building their data; the audit and C-FIND; all.
    ready_s: float = 0.0
    check_s: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.engine_crash is None and not any(self.violations.values())


@dataclass(frozen=True)
class _Kill:
    processes: list[Any]  # the scanners (multiprocessing processes)
    ready_s: float  # seconds the scanners took to start and build their data
    went: float  # monotonic time of the go
    at: float  # seconds after the go
    after_burst: bool
    crash: str | None  # how the engine had ended, if it was gone before the kill


class Aborted(RuntimeError):
    """The campaign cannot go on (the engine does not restart)."""


@dataclass
class _RetryQueue:
    """Per scanner, the slices not acknowledged yet: re-sent first in the next round."""

    pending: list[list[Share]]

    def take(self, scanner_index: int, limit: int) -> list[Share]:
        """The oldest ``limit`` slices waiting (a bounded retry per round)."""
        taken: list[Share] = []
        for share in self.pending[scanner_index]:
            left = limit - sum(len(t.slices) for t in taken)
            if left <= 0:
                break
            taken.append(Share(share.spec, share.series, share.slices[:left]))
        return taken

    def settle(self, scanner_index: int, new: Share, acked_keys: set[str]) -> None:
        """After a round: what was acknowledged leaves the queue, the rest stays in order."""
        left: list[Share] = []
        for share in [*self.pending[scanner_index], new]:
            slices = tuple(k for k in share.slices if scanner.slice_key(share, k) not in acked_keys)
            if slices:
                left.append(Share(share.spec, share.series, slices))
        self.pending[scanner_index] = left


class Campaign:
    def __init__(self, settings: Settings, command: str = "", machine: str = "") -> None:
        self.settings = settings
        self.command = command
        self.machine = machine
        self.rng = random.Random(settings.seed)
        self.engine = EnginePeer(
            settings.work / "engine", transport=settings.transport, fsync=settings.fsync
        )
        self.storage = self.engine.folder / "storage"
        self.index_path = self.engine.folder / "index.sqlite"
        self.queue = _RetryQueue([[] for _ in range(settings.senders)])
        self.acked: dict[str, str] = {}  # every acknowledged UID: the digest sent
        self.rates: list[float] = []
        self.rounds: list[RoundResult] = []
        # Every distinct item found wrong in any round, by kind of violation.
        self.found: dict[str, set[str]] = {}
        self.crashes: list[str] = []
        self.first_start_s = 0.0
        self.final: Findings | None = None
        self.final_extra: dict[str, list[str]] = {}
        self.aborted = ""
        self._context = multiprocessing.get_context("spawn")
        self._log_offset = 0  # where the engine's log was at its last start
        self._log_mark = 0  # where it was when the last round's check ended

    # -- the engine process ----------------------------------------------------

    def _start(self) -> float:
        """Start (or restart) the engine; seconds until it accepts associations."""
        self._log_offset = self._log_size()
        started = time.monotonic()
        try:
            self.engine.start()
        except RuntimeError as exc:
            if self.engine.process is not None:
                self._kill()
            tail = self._log_since(self._log_offset)[-2000:]
            raise Aborted(f"the engine did not start: {exc}\n{tail}") from exc
        accepting = time.monotonic() - started
        self._wait_for_ready_line()
        return accepting

    def _wait_for_ready_line(self) -> None:
        """The engine listens a moment before it logs "engine ready" (the line the
        start-up figure ends at): wait for the line, within the start timeout."""
        deadline = time.monotonic() + START_TIMEOUT
        while READY_LINE not in self._log_since(self._log_offset):
            if time.monotonic() > deadline:
                raise Aborted(f'the engine accepts associations but never logged "{READY_LINE}"')
            time.sleep(POLL)

    def _kill(self) -> str | None:
        """SIGKILL the engine by its PID, then anything left in the process group it
        leads. Returns how it had ended if it was gone already (a crash), else None."""
        process = self.engine.process
        assert process is not None
        code = process.poll()
        crash = None if code is None else f"exited with code {code} before the kill"
        if code is None:
            os.kill(process.pid, signal.SIGKILL)
            code = process.wait(STOP_TIMEOUT)
            if code != -signal.SIGKILL:  # it ended on its own just before the kill
                crash = f"exited with code {code} just before the kill"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        self.engine.process = None
        return crash

    def _stop(self) -> str | None:
        """SIGTERM by PID and wait: the clean stop must end with code 0."""
        process = self.engine.process
        if process is None:
            return None
        if process.poll() is not None:
            self._kill()
            return f"exited with code {process.returncode} before the clean stop"
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._kill()
            return f"did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        self.engine.process = None
        return None if code == 0 else f"exit code {code} at the clean stop"

    def _log_size(self) -> int:
        path = self.engine.log_path
        return path.stat().st_size if path.exists() else 0

    def _log_since(self, offset: int, end: int | None = None) -> str:
        with open(self.engine.log_path, "rb") as fh:
            fh.seek(offset)
            data = fh.read() if end is None else fh.read(max(0, end - offset))
        return data.decode(errors="replace")

    # -- one round -------------------------------------------------------------

    def _jobs(self, number: int, folder: Path) -> tuple[list[ScannerJob], list[Share]]:
        s = self.settings
        spec = StudySpec(
            studies=1,
            series=s.senders,
            slices=s.per_sender,
            rows=s.size,
            columns=s.size,
            seed=s.seed * ROUND_SEEDS + number,
        )
        jobs, new = [], []
        for i in range(s.senders):
            share = Share(spec, i, tuple(range(s.per_sender)))
            new.append(share)
            jobs.append(
                ScannerJob(
                    calling_ae=f"SCU{i}",
                    port=self.engine.port,
                    called_ae=CALLED_AE,
                    shares=(*self.queue.take(i, s.per_sender), share),
                    ack_log=folder / f"SCU{i}.acks",
                    log_file=folder / f"SCU{i}.log",
                    timeout=SCU_TIMEOUT,
                )
            )
        return jobs, new

    def _rate(self) -> float:
        return statistics.median(self.rates) if self.rates else INITIAL_RATE

    def _burst(self, jobs: list[ScannerJob], delay: float) -> _Kill:
        """Start the scanners, let them go, kill the engine ``delay`` seconds later (or
        as soon as every scanner is done, or the engine is gone)."""
        spawned = time.monotonic()
        go = self._context.Event()
        ready = [self._context.Event() for _ in jobs]
        processes = [
            self._context.Process(
                target=scanner.run, args=(job, r, go), name=job.calling_ae, daemon=True
            )
            for job, r in zip(jobs, ready, strict=True)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(r.is_set() for r in ready) and time.monotonic() < deadline:
            if any(not p.is_alive() for p in processes):
                break
            time.sleep(POLL)
        go.set()
        went = time.monotonic()
        kill_at = went + delay
        assert self.engine.process is not None
        while time.monotonic() < kill_at:
            if self.engine.process.poll() is not None:
                break
            if not any(p.is_alive() for p in processes):
                break
            time.sleep(POLL)
        after_burst = not any(p.is_alive() for p in processes)
        at = time.monotonic() - went
        return _Kill(processes, went - spawned, went, at, after_burst, self._kill())

    def _end_scanners(self, processes: list[Any]) -> list[str]:
        """Each scanner ends by itself once its association breaks; a stuck one is
        killed by its PID. Returns the names of those."""
        deadline = time.monotonic() + SENDERS_END_TIMEOUT
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        stuck = [p.name for p in processes if p.is_alive()]
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(STOP_TIMEOUT)
        return stuck

    def round(self, number: int) -> RoundResult:
        s = self.settings
        started = time.monotonic()
        folder = s.work / "rounds" / f"{number:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs, new = self._jobs(number, folder)
        planned = sum(job.count for job in jobs)
        resent = planned - sum(len(share.slices) for share in new)
        delay = min(MAX_KILL_DELAY, self.rng.random() * planned / self._rate())
        kill = self._burst(jobs, delay)
        if kill.crash is not None:
            self.crashes.append(f"round {number}: {kill.crash}")
        crashed = Scratch.of(self.storage)
        stuck = self._end_scanners(kill.processes)
        logs = [AckLog.read(job.ack_log) for job in jobs]

        answers = [a for entry in logs for a in entry.answers]
        acked = {a.uid: a for entry in logs for a in entry.acked}
        round_seed = str(s.seed * ROUND_SEEDS + number)
        for i, entry in enumerate(logs):
            self.queue.settle(i, new[i], {a.key for a in entry.acked})
        self.acked.update({uid: a.digest for uid, a in acked.items()})
        if len(answers) >= RATE_SAMPLE_MIN:
            span = max(a.at for a in answers) - kill.went
            if span > 0:
                self.rates.append(len(answers) / span)

        restart_offset = self._log_size()
        restart_s = self._start()
        restart_log = self._log_since(restart_offset)
        burst_log = self._log_since(self._log_mark, restart_offset)

        checking = time.monotonic()
        findings = audit(
            self.storage, self.index_path, self.acked, deep=set(acked), crashed=crashed
        )
        extra = {
            "quarantined": self._quarantined(),
            "unfindable": self._unfindable(acked.values()),
        }
        violations = {**findings.counts(), **{k: len(v) for k, v in extra.items()}}
        examples = findings.examples()
        examples.update({k: sorted(v)[:5] for k, v in extra.items() if v})
        self._remember(findings, extra)
        check_s = time.monotonic() - checking
        statuses = Counter(f"0x{a.status:04X}" for a in answers if a.status != status.SUCCESS)
        result = RoundResult(
            round=number,
            kill_delay_s=round(delay, 3),
            killed_at_s=round(kill.at, 3),
            kill_after_burst=kill.after_burst or len(answers) == planned,
            planned=planned,
            resent=resent,
            answered=len(answers),
            acknowledged=len(acked),
            acknowledged_resent=sum(
                1 for a in acked.values() if not a.key.startswith(round_seed + ":")
            ),
            other_statuses=dict(statuses),
            unanswered=sum(len(entry.unanswered) for entry in logs),
            engine_crash=kill.crash,
            restart_s=round(restart_s, 3),
            startup_s=_startup_seconds(restart_log),
            recovery=_recovery_figures(restart_log),
            verified=findings.verified,
            violations=violations,
            examples=examples,
            log_errors=_error_lines(burst_log) + _error_lines(restart_log),
            stuck_senders=stuck,
            scanner_errors=[
                f"{job.calling_ae}: {problem}"
                for job, entry in zip(jobs, logs, strict=True)
                for problem in [*entry.errors, *_refused(entry, kill.went + kill.at)]
            ],
            ready_s=round(kill.ready_s, 2),
            check_s=round(check_s, 2),
            seconds=round(time.monotonic() - started, 2),
        )
        self.rounds.append(result)
        self._log_mark = self._log_size()
        return result

    def _quarantined(self) -> list[str]:
        folder = self.storage / QUARANTINE
        return sorted(p.name for p in folder.rglob("*.json")) if folder.is_dir() else []

    def _unfindable(self, acked: Iterable[Answer]) -> list[str]:
        """Acknowledged instances of this round that C-FIND (IMAGE level) does not return."""
        answers = list(acked)
        series = sorted({(a.study_uid, a.series_uid) for a in answers})
        if not series:
            return []
        try:
            found = find_images(self.engine.port, CALLED_AE, series, SCU_TIMEOUT)
        except (FindError, OSError) as exc:
            return [f"C-FIND failed: {exc}"]
        return sorted(a.uid for a in answers if a.uid not in found.get(a.series_uid, set()))

    def _remember(self, findings: Findings, extra: dict[str, list[str]]) -> None:
        for name, items in {**findings.items(), **extra}.items():
            self.found.setdefault(name, set()).update(items)

    # -- the campaign ----------------------------------------------------------

    def run(self) -> int:
        s = self.settings
        started = time.monotonic()
        try:
            self.first_start_s = self._start()
            for number in range(1, s.rounds + 1):
                if self.engine.process is not None and self.engine.process.poll() is not None:
                    self.crashes.append(
                        f"before round {number}: exited with code {self.engine.process.returncode}"
                    )
                    self.engine.process = None
                    self._start()
                result = self.round(number)
                _print_round(result, s.rounds)
            stopped = self._stop()
            if stopped is not None:
                self.crashes.append(f"at the end: {stopped}")
            print(
                f"final check: reading all {len(self.acked)} acknowledged instances ...",
                file=sys.stderr,
                flush=True,
            )
            self.final = audit(self.storage, self.index_path, self.acked)
            self.final_extra = {"quarantined": self._quarantined()}
        except Aborted as exc:
            self.aborted = str(exc)
            self.crashes.append(f"round {len(self.rounds) + 1}: {str(exc).splitlines()[0]}")
            print(f"campaign aborted: {exc}", file=sys.stderr)
        finally:
            if self.engine.process is not None:
                self._kill()
        return self._finish(time.monotonic() - started)

    @property
    def ok(self) -> bool:
        final_ok = self.final is not None and self.final.ok and not any(self.final_extra.values())
        return final_ok and not self.crashes and all(r.ok for r in self.rounds)

    def _finish(self, seconds: float) -> int:
        s = self.settings
        report = crash_report.build(self, seconds)
        crash_report.write(s.out, report)
        print(crash_report.summary_line(report), file=sys.stderr)
        print(f"wrote {s.out / 'crash.json'} and crash.md", file=sys.stderr)
        if self.ok and not s.keep:
            shutil.rmtree(s.work, ignore_errors=True)
        else:
            print(f"the engine's folder and the scanners' logs are in {s.work}", file=sys.stderr)
        return 0 if self.ok else 1


def _recovery_figures(text: str) -> dict[str, int]:
    figures = {}
    for name, pattern in RECOVERY_LINES.items():
        figures[name] = sum(int(m.group(1)) for m in pattern.finditer(text))
    for name, needle in RECOVERY_EVENTS.items():
        figures[name] = text.count(needle)
    return figures


def _refused(entry: AckLog, killed: float) -> list[str]:
    """An association that failed while the engine was still alive (before the kill)."""
    refused = entry.refused_at is not None and entry.refused_at < killed
    return ["association refused or failed before the kill"] if refused else []


def _startup_seconds(text: str) -> float | None:
    """The engine's own start-up in a run's log: from its first line (the configuration,
    logged once loaded) to "engine ready". The index is opened, temp files cleared,
    journals replayed and missing files looked for in between."""
    stamps = []  # a line without a time (a thread's traceback on stderr) is skipped
    for line in text.splitlines():
        try:
            stamps.append((datetime.strptime(line[: len(LOG_TIME_EXAMPLE)], LOG_TIME), line))
        except ValueError:
            continue
    ready = next((when for when, line in stamps if READY_LINE in line), None)
    if not stamps or ready is None:
        return None
    return (ready - stamps[0][0]).total_seconds()


def _error_lines(text: str, limit: int = 5) -> list[str]:
    lines = [line for line in text.splitlines() if " ERROR " in line or " CRITICAL " in line]
    return lines[:limit]


def _print_round(r: RoundResult, rounds: int) -> None:
    when = "after the burst" if r.kill_after_burst else "mid-burst"
    problems = {k: v for k, v in r.violations.items() if v}
    verdict = "ok" if r.ok else f"FAILED: {problems or ''} {r.engine_crash or ''}".strip()
    print(
        f"round {r.round}/{rounds}: killed {r.killed_at_s:.2f} s in ({when}), "
        f"{r.acknowledged}/{r.planned} acknowledged ({r.acknowledged_resent} re-sent), "
        f"restart {r.restart_s:.2f} s (replayed {r.recovery['replayed']}, "
        f"temps removed {r.recovery['temps_removed']}), verified {r.verified}, "
        f"lost {r.violations['lost']}, orphans {r.violations['orphans']}, "
        f"temps {r.violations['temps']}, dangling {r.violations['dangling']}: {verdict}",
        file=sys.stderr,
        flush=True,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, required=True, help="kill -9 and restart this often")
    parser.add_argument("--senders", type=int, default=SENDERS, help="associations at once")
    parser.add_argument(
        "--instances-per-round",
        type=int,
        default=INSTANCES_PER_ROUND,
        help="new instances per round, shared by the senders (plus re-sends)",
    )
    parser.add_argument("--size", type=int, default=SIZE, help="rows and columns of each slice")
    parser.add_argument("--seed", type=int, default=0, help="kill moments and data")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(tempfile.gettempdir()) / "crash-campaign",
        help="folder for crash.json and crash.md",
    )
    parser.add_argument("--work", type=Path, default=None, help="where the engine's folder goes")
    parser.add_argument(
        "--transport", choices=("native", "pynetdicom"), default="native", help="[dicom] transport"
    )
    parser.add_argument(
        "--fsync", choices=("true", "false"), default="true", help="the engine's [storage] fsync"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the engine's folder (kept anyway on failure)"
    )


def main(args: argparse.Namespace, machine: str) -> int:
    per_sender_max = QueryConfig().max_matches  # a series must fit one C-FIND answer
    if args.rounds < 1 or args.senders < 1 or args.size < 1:
        print("error: --rounds, --senders and --size must be at least 1", file=sys.stderr)
        return 2
    if not args.senders <= args.instances_per_round <= args.senders * per_sender_max:
        print(
            f"error: --instances-per-round must be between --senders and {per_sender_max}"
            " per sender",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="crash-campaign-", dir=args.work))
    settings = Settings(
        rounds=args.rounds,
        senders=args.senders,
        instances_per_round=args.instances_per_round,
        size=args.size,
        seed=args.seed,
        out=args.out,
        work=work,
        transport=args.transport,
        fsync=args.fsync == "true",
        keep=args.keep,
    )
    command = "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return Campaign(settings, command, machine).run()
