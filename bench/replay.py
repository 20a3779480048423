"""The replay driver: dcmtk ``storescu`` plays the scanners against one fresh peer.

A run starts the peer in an empty folder, sends every file with C concurrent
associations (or one association per instance), waits for the last answer, then
waits until the peer reports every instance (the engine and Orthanc through their
index, storescp by its files). A run that lost anything is marked unverified and is
never averaged in.

While the run goes, ``TreeSampler`` reads /proc for the receiver's process trees (one
per ``Peer.pids`` root: the engine nodes and PostgreSQL's postmaster for the PostgreSQL
peers): peak resident memory (summed over the trees; forked children share pages, so this
overstates storescp and PostgreSQL a little) and CPU seconds (user + system, including
reaped children).

A peer with several DICOM ports (``Peer.ports``, the two-node engine) gets association
``i`` (the i-th share of a burst, or the i-th instance) on ``ports[i % len(ports)]``.
"""

from __future__ import annotations

import enum
import logging
import os
import resource
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.peers import Peer, nodelay_env

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 0.1
QUERYABLE_TIMEOUT = 60.0
SEND_TIMEOUT = 1800.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1_000_000

# storescu options proposing each syntax of the generated files.
PROPOSE = {"explicit": "-xe", "jpeg-lossless": "-xs", "jpeg-ls": "-xt"}


class Scenario(enum.StrEnum):
    BURST = "burst"  # C associations, each sending its share of the files
    PER_INSTANCE = "per-instance"  # one association per instance, C at a time


@dataclass
class RunResult:
    peer: str
    scenario: str
    concurrency: int
    syntax: str
    repeat: int
    instances: int
    studies: int
    stored: int
    seconds: float
    instances_per_s: float
    mb_per_s: float
    studies_per_s: float
    peak_rss_mb: float
    cpu_s: float
    queryable_after_s: float | None
    verified: bool
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    error: str = ""
    # CPU seconds of the storescu clients, and how busy the whole machine was (% of all
    # its cores) while they sent: a run near 100% measures the machine, not the peer.
    client_cpu_s: float | None = None
    machine_busy_pct: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def _sample(roots: tuple[int, ...]) -> tuple[int, float]:
    """(resident bytes, CPU seconds) of ``roots`` and their descendants, now."""
    tree = _children()
    stack, rss, ticks = list(roots), 0, 0
    while stack:
        pid = stack.pop()
        stack.extend(tree.get(pid, []))
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read()
            with open(f"/proc/{pid}/statm", "rb") as fh:
                rss += int(fh.read().split()[1]) * PAGE
        except (OSError, IndexError):
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        # utime, stime, cutime, cstime: fields 14-17 of stat, 12-15 after "(comm) ".
        ticks += sum(int(v) for v in fields[11:15])
    return rss, ticks / CLOCK_TICKS


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat", "rb") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


def _children_cpu() -> float:
    """CPU seconds of this process's children that have ended (the clients)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class TreeSampler:
    def __init__(self, *roots: int) -> None:
        self.roots = roots
        self.peak_rss = 0
        self.cpu = 0.0
        self._base_cpu = _sample(roots)[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._once()
            self._stop.wait(SAMPLE_INTERVAL)

    def _once(self) -> None:
        rss, cpu = _sample(self.roots)
        self.peak_rss = max(self.peak_rss, rss)
        self.cpu = max(self.cpu, cpu - self._base_cpu)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._once()
        self._stop.set()
        self._thread.join()


def split(files: list[Path], parts: int) -> list[list[Path]]:
    """Contiguous shares, so each association sends whole series as a scanner does."""
    size, extra = divmod(len(files), parts)
    shares, start = [], 0
    for n in range(parts):
        end = start + size + (1 if n < extra else 0)
        if end > start:
            shares.append(files[start:end])
        start = end
    return shares


def storescu(
    peer: Peer, files: list[Path], syntax: str, port: int | None = None
) -> subprocess.CompletedProcess[bytes]:
    argv = [
        "storescu",
        "-aet",
        "BENCHSCU",
        "-aec",
        peer.ae_title,
        "-R",
        PROPOSE[syntax],
        "127.0.0.1",
        str(peer.port if port is None else port),
        *map(str, files),
    ]
    return subprocess.run(argv, env=nodelay_env(), capture_output=True, timeout=SEND_TIMEOUT)


def send(
    peer: Peer, files: list[Path], scenario: Scenario, concurrency: int, syntax: str
) -> list[str]:
    """Send everything; returns the error lines of failed storescu runs."""
    shares = split(files, concurrency) if scenario is Scenario.BURST else [[f] for f in files]
    ports = peer.ports
    jobs = [(share, ports[n % len(ports)]) for n, share in enumerate(shares)]
    errors: list[str] = []
    with ThreadPoolExecutor(concurrency) as pool:
        for done in pool.map(lambda job: storescu(peer, job[0], syntax, job[1]), jobs):
            if done.returncode != 0 or b"Store Failed" in done.stderr:
                errors.append(
                    done.stderr.decode(errors="replace").strip().splitlines()[-1:][0]
                    if done.stderr.strip()
                    else f"storescu exit {done.returncode}"
                )
    return errors


def wait_queryable(peer: Peer, expected: int, timeout: float) -> tuple[int, float | None]:
    """Poll the peer's own count until it holds everything; (count, seconds or None)."""
    start = time.monotonic()
    count = -1
    while time.monotonic() - start < timeout:
        count = peer.count_instances()
        if count >= expected:
            return count, time.monotonic() - start
        time.sleep(0.05)
    return count, None


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_page_cache(files: list[Path]) -> None:
    """As root: empty the page cache (clean pages only, after ``sync``), then read the
    files to send back into it. The runs' files are kept, and without this the page
    cache fills up with them over a run: the kernel then reclaims memory while a peer
    runs, and every peer after the first few pays for it (seen: the same engine's CPU
    per instance doubling, 1100 instances/s falling to 500 within one bench run)."""
    try:
        DROP_CACHES.write_text("1\n")
    except OSError:  # not root: the bench runs, less evenly
        return
    for path in files:
        path.read_bytes()


def run_once(
    peer: Peer,
    files: list[Path],
    studies: int,
    scenario: Scenario,
    concurrency: int,
    syntax: str,
    repeat: int,
    queryable_timeout: float = QUERYABLE_TIMEOUT,
) -> RunResult:
    """One peer, one burst, after ``sync``. The peer's files stay until the run ends: ext4
    skips recently deleted inodes for minutes when it creates files, so deleting a
    run's 600 MB would slow the next peer's file creation (seen: 0.02 ms per create
    becoming 0.9 ms)."""
    total_bytes = sum(f.stat().st_size for f in files)
    error = ""
    # Every peer starts with nothing of the previous peer's still to be written to the
    # disk: otherwise a receiver that syncs pays for the hundreds of MB a rival that
    # does not (storescp) left in the page cache just before.
    os.sync()
    drop_page_cache(files)
    try:
        peer.start()
        with TreeSampler(*peer.pids) as sampler:
            clients_before, machine_before = _children_cpu(), _machine_ticks()
            start = time.monotonic()
            errors = send(peer, files, scenario, concurrency, syntax)
            seconds = time.monotonic() - start
            client_cpu = _children_cpu() - clients_before
            machine_after = _machine_ticks()
            busy = [
                after - before for before, after in zip(machine_before, machine_after, strict=True)
            ]
            stored, queryable = wait_queryable(peer, len(files), queryable_timeout)
            stored = peer.verify_count()
    except Exception as exc:  # a crashed peer is a failed run, not a crashed bench
        log.exception("%s run failed", peer.name)
        peer.stop()
        return RunResult(
            peer.name,
            scenario.value,
            concurrency,
            syntax,
            repeat,
            len(files),
            studies,
            0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            None,
            False,
            error=repr(exc),
        )
    peer.stop()
    details = peer.details()
    if errors:
        error = f"{len(errors)} storescu runs failed: {errors[0]}"
    verified = not errors and stored == len(files)
    if stored != len(files):
        error = error or f"{len(files) - stored} of {len(files)} instances missing"
    return RunResult(
        peer=peer.name,
        scenario=scenario.value,
        concurrency=concurrency,
        syntax=syntax,
        repeat=repeat,
        instances=len(files),
        studies=studies,
        stored=stored,
        seconds=round(seconds, 3),
        instances_per_s=round(len(files) / seconds, 1),
        mb_per_s=round(total_bytes / MB / seconds, 1),
        studies_per_s=round(studies / seconds, 3),
        peak_rss_mb=round(sampler.peak_rss / MB, 1),
        cpu_s=round(sampler.cpu, 2),
        queryable_after_s=None if queryable is None else round(queryable, 3),
        verified=verified,
        latency_p50_ms=details.get("latency_p50_ms"),
        latency_p99_ms=details.get("latency_p99_ms"),
        error=error,
        client_cpu_s=round(client_cpu, 2),
        machine_busy_pct=round(100 * busy[0] / busy[1], 1) if busy[1] else None,
    )
