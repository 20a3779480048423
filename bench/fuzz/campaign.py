"""``python -m bench fuzz``: the campaign from start to verdict.

1. Start the engine in its own folder (``engine.FuzzedEngine``) and the well-behaved
   sender (``sender.py``) in a process of its own; send the recorded exchange once,
   unmodified: it must be stored, or the fuzzer's seeds are wrong and nothing runs.
2. Send the inputs, ``parallel`` connections at a time, until ``count`` are done or the
   time limit passes; each input's outcome goes to ``inputs.jsonl`` as it ends. Stop
   early if the engine process dies.
3. Stop the sender; wait for the engine to close every connection on its port (the
   slowest timer plus slack); measure its CPU while idle, its memory; C-ECHO it; check
   that every instance the sender was answered success for is indexed and on disk;
   stop it with SIGTERM (it must exit 0); judge its log.
4. Write ``fuzz.json`` and ``fuzz.md``; the exit status is 1 if there is any finding.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from bench.fuzz import report, watch
from bench.fuzz.cases import control_case, make_case
from bench.fuzz.engine import FuzzedEngine
from bench.fuzz.model import FindingKind, Outcome, Reaction
from bench.fuzz.peer import Timing, run_case
from bench.fuzz.seeds import Seeds
from bench.peers import REPO
from bench.replay import TreeSampler

HOST = "127.0.0.1"
SENDER_STOP_TIMEOUT = 60.0
IDLE_WINDOW = 2.0  # seconds the engine's CPU is measured with nothing to do
BUSY_SHARE = 0.5  # of one core, while idle: a spinning loop
MEMORY_GROWTH_LIMIT_MB = 200.0  # resident growth from start to end that counts as a leak
PROGRESS_EVERY = 2.0  # seconds between progress lines
ECHO_TIMEOUT = 10.0
SHOWN_PER_FINDING = 20  # input numbers listed per finding kind


@dataclass(frozen=True)
class Settings:
    count: int
    seed: int
    out: Path
    transport: str
    time_limit: float
    parallel: int
    sender_rate: float
    timing: Timing
    keep: bool = False
    only: tuple[int, ...] = ()
    command: str = "python -m bench fuzz"
    machine: str = ""

    @property
    def numbers(self) -> Iterable[int]:
        return self.only or range(1, self.count + 1)

    @property
    def planned(self) -> int:
        return len(self.only) or self.count


@dataclass
class Tally:
    """Outcomes counted as they come in; the report is built from this."""

    done: int = 0
    reactions: Counter[str] = field(default_factory=Counter)
    by_family: dict[str, Counter[str]] = field(default_factory=dict)
    variants: Counter[str] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)
    aborts: Counter[str] = field(default_factory=Counter)
    findings: Counter[str] = field(default_factory=Counter)  # by FindingKind name
    finding_inputs: dict[str, list[int]] = field(default_factory=dict)  # the first few
    finding_details: dict[str, list[str]] = field(default_factory=dict)  # the first few
    slowest: float = 0.0

    def add(self, outcome: Outcome) -> None:
        self.done += 1
        reaction = str(outcome.reaction)
        self.reactions[reaction] += 1
        self.by_family.setdefault(str(outcome.family), Counter())[reaction] += 1
        self.variants[f"{outcome.family}: {outcome.variant} -> {reaction}"] += 1
        self.answers.update(outcome.answers)
        if outcome.reaction in (Reaction.A_ABORT, Reaction.TIMEOUT_ABORT):
            self.aborts[outcome.detail] += 1
        self.slowest = max(self.slowest, outcome.seconds)
        if outcome.finding is not None:
            what = f"{outcome.family}: {outcome.variant}"
            detail = f"input {outcome.number} ({what}): {outcome.detail} {outcome.note}"
            self.finding(outcome.finding, detail, outcome.number)

    def finding(
        self, kind: FindingKind, detail: str, number: int | None = None, count: int = 1
    ) -> None:
        self.findings[kind.name] += count
        details = self.finding_details.setdefault(kind.name, [])
        if len(details) < SHOWN_PER_FINDING:
            details.append(detail)
        inputs = self.finding_inputs.setdefault(kind.name, [])
        if number is not None and len(inputs) < SHOWN_PER_FINDING:
            inputs.append(number)


class Journal:
    """The sender's journal, read incrementally for progress and at the end for the check."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self.statuses: dict[str, int | None] = {}
        self.errors: list[str] = []
        self.events: Counter[str] = Counter()
        self.slowest = 0.0

    def read(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        complete = chunk.rfind(b"\n") + 1
        self._offset += complete
        for line in chunk[:complete].splitlines():
            record = orjson.loads(line)
            self.slowest = max(self.slowest, float(record.get("seconds", 0.0)))
            if "uid" in record:
                self.statuses[record["uid"]] = record["status"]
                if record.get("error"):
                    self.errors.append(f"{record['uid']}: {record['error']}")
            else:
                self.events[record["event"]] += 1
                if record["event"] == "echo" and record.get("status") != 0:
                    self.errors.append(f"C-ECHO status {record.get('status')}")
                if record["event"] != "echo":
                    self.errors.append(str(record))

    @property
    def succeeded(self) -> list[str]:
        return [uid for uid, code in self.statuses.items() if code == 0]

    @property
    def failed(self) -> list[str]:
        return [uid for uid, code in self.statuses.items() if code != 0]


def echo(port: int, ae_title: str) -> str | None:
    """None if the engine answers a C-ECHO with success; else why not."""
    ae = AE(ae_title="FUZZECHO")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ECHO_TIMEOUT
    ae.add_requested_context(Verification, [ExplicitVRLittleEndian])
    assoc = ae.associate(HOST, port, ae_title=ae_title)
    if not assoc.is_established:
        return "association not established"
    try:
        answer = assoc.send_c_echo()
        code = int(answer.Status) if "Status" in answer else None
    finally:
        assoc.release()
    return None if code == 0 else f"C-ECHO status {code}"


async def _control(seeds: Seeds, port: int, timing: Timing) -> str | None:
    """The recorded exchange, unmodified: None if answered success and released."""
    case = control_case(seeds)
    outcome = await run_case(case, HOST, port, timing)
    if outcome.reaction is Reaction.A_RELEASE_RP and outcome.answers == [
        "0x8030 0x0000",
        "0x8001 0x0000",
    ]:
        return None
    return f"{outcome.reaction}, answers {outcome.answers}, {outcome.detail}"


async def _inputs(
    settings: Settings,
    seeds: Seeds,
    engine: FuzzedEngine,
    tally: Tally,
    sink: IO[bytes],
    journal: Journal,
) -> bool:
    """Run every input; False if the time limit or a dead engine cut the run short."""
    numbers = iter(settings.numbers)
    deadline = time.monotonic() + settings.time_limit
    started = time.monotonic()
    stopped = False
    timing = settings.timing
    case_limit = 3 * timing.silence + 30

    async def worker() -> None:
        nonlocal stopped
        for number in numbers:
            if time.monotonic() > deadline or not engine.alive:
                stopped = True
                return
            case = make_case(seeds, number)
            try:
                async with asyncio.timeout(case_limit):
                    outcome = await run_case(case, HOST, engine.port, timing)
            except TimeoutError:
                outcome = Outcome(number, case.family, case.variant, Reaction.HANG,
                                  detail=f"input not over after {case_limit:.0f} s",
                                  finding=FindingKind.HANG)  # fmt: skip
            tally.add(outcome)
            sink.write(orjson.dumps(outcome.as_dict()) + b"\n")

    async def progress(done: asyncio.Event) -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), PROGRESS_EVERY)
            journal.read()
            _print_progress(settings, tally, journal, engine, time.monotonic() - started)

    done = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        group.create_task(progress(done))
        async with asyncio.TaskGroup() as workers:
            for _ in range(settings.parallel):
                workers.create_task(worker())
        done.set()
    return not stopped


def _print_progress(
    settings: Settings, tally: Tally, journal: Journal, engine: FuzzedEngine, elapsed: float
) -> None:
    rss = watch.memory(engine.pid)[0] if engine.alive else 0.0
    top = ", ".join(f"{name} {n}" for name, n in tally.reactions.most_common(4))
    findings = sum(tally.findings.values())
    print(
        f"fuzz: {tally.done}/{settings.planned} inputs ({tally.done / max(elapsed, 1e-9):.0f}/s) "
        f"| {top} | findings {findings} | sender {len(journal.succeeded)} stored, "
        f"{len(journal.failed)} failed | RSS {rss:.0f} MB",
        file=sys.stderr,
        flush=True,
    )


def _start_sender(
    settings: Settings, engine: FuzzedEngine, journal: Path
) -> subprocess.Popen[bytes]:
    with open(settings.out / "sender.log", "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.fuzz.sender", "--port", str(engine.port),
             "--called-ae", engine.ae_title, "--journal", str(journal),
             "--tag", f"good{settings.seed}-{time.time_ns()}", "--rate", str(settings.sender_rate)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _stop_sender(sender: subprocess.Popen[bytes], tally: Tally) -> None:
    sender.terminate()
    try:
        code = sender.wait(SENDER_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        sender.kill()
        sender.wait(SENDER_STOP_TIMEOUT)
        code = None
    if code != 0:
        tally.finding(FindingKind.SENDER_FAILED, f"the sender exited with {code} (sender.log)")


def _wait_drained(port: int, timing: Timing) -> Counter[str]:
    deadline = time.monotonic() + timing.silence + timing.slack
    while True:
        left = watch.open_connections(port)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def run(settings: Settings) -> int:
    settings.out.mkdir(parents=True, exist_ok=True)
    seeds = Seeds.build(settings.seed)
    engine = FuzzedEngine(
        settings.out / "engine", transport=settings.transport, timing=settings.timing
    )
    engine.log_path.unlink(missing_ok=True)
    shutil.rmtree(engine.folder / "storage", ignore_errors=True)
    for stale in engine.folder.glob("index.sqlite*"):
        stale.unlink()
    tally = Tally()
    journal = Journal(settings.out / "sender.jsonl")
    journal.path.unlink(missing_ok=True)
    started = time.monotonic()
    print(f"fuzz: starting the engine ({settings.transport}) in {engine.folder}", file=sys.stderr)
    engine.start()
    facts: dict[str, Any] = {}
    sender: subprocess.Popen[bytes] | None = None
    try:
        control = asyncio.run(_control(seeds, engine.port, settings.timing))
        if control is not None:
            tally.finding(
                FindingKind.VALID_REFUSED, f"the recorded exchange, unmodified: {control}"
            )
            raise _Abandon
        facts["rss_start_mb"] = round(watch.memory(engine.pid)[0], 1)
        sender = _start_sender(settings, engine, journal.path)
        with TreeSampler(engine.pid) as sampler, open(settings.out / "inputs.jsonl", "wb") as sink:
            inputs_started = time.monotonic()
            facts["completed"] = asyncio.run(_inputs(settings, seeds, engine, tally, sink, journal))
            facts["fuzz_seconds"] = round(time.monotonic() - inputs_started, 1)
            _stop_sender(sender, tally)
            sender = None
            left = _wait_drained(engine.port, settings.timing)
            if left:
                tally.finding(FindingKind.LEFT_OPEN, f"{dict(left)} on port {engine.port}")
        facts["peak_rss_tree_mb"] = round(sampler.peak_rss / watch.MB, 1)
        _judge_engine(engine, tally, facts)
        journal.read()
        _judge_sender(engine, journal, tally, facts)
    except _Abandon:
        pass
    finally:
        if sender is not None:
            sender.kill()
            sender.wait(SENDER_STOP_TIMEOUT)
        if engine.alive or engine.process is not None:
            code = engine.stop_cleanly()
            facts["exit_code"] = code
            if code != 0:
                tally.finding(FindingKind.SHUTDOWN, f"exit code {code} after SIGTERM")
    verdict = watch.judge_log_file(engine.log_path)
    for kind, n in verdict.unexpected_kinds.most_common():
        tally.finding(FindingKind.LOG_ERROR, f"{n} x {kind}", count=n)
    for kind, n in verdict.library_crashes.most_common():
        tally.finding(FindingKind.LIBRARY_CRASH, f"{n} x {kind}", count=n)
    shutil.copy(engine.log_path, settings.out / "engine.log")
    facts["seconds"] = round(time.monotonic() - started, 1)
    report.write(settings, tally, journal, verdict, facts)
    if not tally.findings and not settings.keep:
        shutil.rmtree(engine.folder, ignore_errors=True)
    print(f"fuzz: wrote {settings.out / 'fuzz.json'} and fuzz.md", file=sys.stderr)
    for kind, details in tally.finding_details.items():
        print(f"FINDING {kind}: {FindingKind[kind].value}", file=sys.stderr)
        for detail in details[:5]:
            print(f"  {detail}", file=sys.stderr)
    return 1 if tally.findings else 0


class _Abandon(Exception):
    """The campaign cannot run (its control input failed)."""


def _judge_engine(engine: FuzzedEngine, tally: Tally, facts: dict[str, Any]) -> None:
    if not engine.alive:
        code = engine.process.returncode if engine.process else None
        tally.finding(FindingKind.CRASH, f"exit code {code}")
        return
    before = watch.cpu_seconds(engine.pid)
    time.sleep(IDLE_WINDOW)
    idle = (watch.cpu_seconds(engine.pid) - before) / IDLE_WINDOW
    facts["idle_cpu_share"] = round(idle, 3)
    if idle > BUSY_SHARE:
        tally.finding(FindingKind.BUSY, f"{idle:.0%} of a core with nothing to do")
    rss, peak = watch.memory(engine.pid)
    facts["rss_end_mb"] = round(rss, 1)
    facts["peak_rss_mb"] = round(peak, 1)
    growth = rss - facts["rss_start_mb"]
    facts["rss_growth_mb"] = round(growth, 1)
    if growth > MEMORY_GROWTH_LIMIT_MB:
        tally.finding(FindingKind.MEMORY, f"resident memory grew by {growth:.0f} MB")
    why = echo(engine.port, engine.ae_title)
    facts["final_echo"] = why or "success"
    if why is not None:
        tally.finding(FindingKind.ECHO_FAILED, why)
    facts["index"] = engine.counts()


def _judge_sender(
    engine: FuzzedEngine, journal: Journal, tally: Tally, facts: dict[str, Any]
) -> None:
    succeeded = journal.succeeded
    stored = engine.stored(succeeded)
    lost = [uid for uid in succeeded if uid not in stored or not stored[uid].is_file()]
    facts["sender"] = {
        "sent": len(journal.statuses),
        "succeeded": len(succeeded),
        "failed": len(journal.failed),
        "lost": len(lost),
        "associations": journal.events.get("echo", 0),
        "slowest_operation_s": round(journal.slowest, 3),
    }
    for uid in lost:
        tally.finding(FindingKind.LOSS, f"{uid} answered success, not stored")
    for error in journal.errors:
        tally.finding(FindingKind.SENDER_FAILED, error)
    for uid in journal.failed:
        tally.finding(FindingKind.SENDER_FAILED, f"{uid}: status {journal.statuses[uid]}")


# -- the command line (``python -m bench fuzz``) ------------------------------------------------

DEFAULT_OUT = Path(tempfile.gettempdir()) / "bench-fuzz"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=1000, help="inputs to send")
    parser.add_argument("--seed", type=int, default=1, help="the same seed sends the same inputs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the reports")
    parser.add_argument("--transport", choices=("native", "pynetdicom"), default="native")
    parser.add_argument("--time-limit", type=float, default=600.0,
                        help="seconds after which no new input starts")  # fmt: skip
    parser.add_argument("--parallel", type=int, default=16, help="connections at once")
    parser.add_argument("--sender-rate", type=float, default=20.0,
                        help="C-STOREs per second of the well-behaved sender")  # fmt: skip
    parser.add_argument("--acse-timeout", type=float, default=1.0, help="the engine's ARTIM")
    parser.add_argument("--network-timeout", type=float, default=2.0,
                        help="the engine's idle timeout")  # fmt: skip
    parser.add_argument("--only", default="", help="comma-separated input numbers to rerun")
    parser.add_argument("--keep", action="store_true", help="keep the engine's folder")


def main(args: argparse.Namespace, machine: str) -> int:
    only = tuple(int(n) for n in args.only.split(",") if n.strip())
    if args.count < 1 or args.parallel < 1 or args.time_limit <= 0:
        print("error: --count, --parallel and --time-limit must be positive", file=sys.stderr)
        return 2
    settings = Settings(
        count=args.count,
        seed=args.seed,
        out=args.out,
        transport=args.transport,
        time_limit=args.time_limit,
        parallel=args.parallel,
        sender_rate=args.sender_rate,
        timing=Timing(args.acse_timeout, args.network_timeout),
        keep=args.keep,
        only=only,
        command="python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        machine=machine,
    )
    return run(settings)
