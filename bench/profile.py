"""``python -m bench profile``: where the engine's CPU goes while it ingests a burst.

The engine runs as in ``bench run``; py-spy samples the thread that holds the GIL
(``--gil``: Python CPU work, which is what limits a Python server on 2 cores; time
blocked in fsync or in sockets is not in it) while dcmtk ``storescu`` sends with C
associations. The raw
stacks are kept (``profile-C{c}.txt``, collapsed-stack format that flame-graph
tools read) and summarised: the share of samples per part of the engine and the
functions with the most samples of their own.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench import generate
from bench.peers import EnginePeer
from bench.replay import Scenario, send

# Which part of the work a stack belongs to: the first rule whose text occurs in it.
# Order matters: the most specific first.
BUCKETS = (
    ("pixel decoding (pylibjpeg)", ("pylibjpeg", "decode_payload")),
    ("header parse", ("parse_header", "read_dataset", "elements.py", "inspect_head")),
    ("digest", ("hexdigest", "digest.py", "blake3", "sha256")),
    ("index (SQLite)", ("aiosqlite", "sqlite3", "commit_batch", "sqlite.py")),
    ("spool: writing datasets as they arrive", ("spool.py",)),
    ("file writes, journal, renames, fsync", ("storage/area.py", "write_batch")),
    ("Part 10 header", ("part10.py",)),
    ("pynetdicom receive (DUL, PDU, DIMSE)", ("pynetdicom",)),
    ("DICOM upper layer (PDUs, state machine, DIMSE)", ("engine/dicom/",)),
    ("asyncio loop and hand-offs", ("asyncio", "uvloop", "receive.py", "flow.py")),
)


def bucket_of(stack: str) -> str:
    for name, needles in BUCKETS:
        if any(needle in stack for needle in needles):
            return name
    return "other"


def summarise(raw: Path, top: int = 15) -> str:
    """Text summary of a py-spy collapsed-stack file."""
    buckets: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        buckets[bucket_of(stack)] += count
        own[stack.rsplit(";", 1)[-1]] += count
    if total == 0:
        return "no samples\n"
    lines = [f"{total} samples", "", "share of samples by part of the engine:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in buckets.most_common()]
    lines += ["", f"top {top} functions by samples of their own:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(lines) + "\n"


def py_spy() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else "py-spy"


def profile(
    concurrency: int, files: list[Path], out: Path, work: Path, rate: int, transport: str
) -> Path:
    peer = EnginePeer(work / f"engine-C{concurrency}", transport=transport)
    peer.start()
    raw = out / f"profile-C{concurrency}.txt"
    spy = subprocess.Popen(
        [
            py_spy(),
            "record",
            "--pid",
            str(peer.pid),
            "--format",
            "raw",
            "--rate",
            str(rate),
            "--output",
            str(raw),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # py-spy attaches
    started = time.monotonic()
    errors = send(peer, files, Scenario.BURST, concurrency, "explicit")
    seconds = time.monotonic() - started
    spy.send_signal(signal.SIGINT)
    spy.wait(120)
    peer.stop()
    shutil.rmtree(peer.folder, ignore_errors=True)
    if errors:
        raise RuntimeError(f"the send failed: {errors[0]}")
    rate_text = f"C={concurrency}: {len(files)} instances in {seconds:.1f} s"
    summary = f"{rate_text} ({len(files) / seconds:.0f}/s)\n" + summarise(raw)
    (out / f"profile-C{concurrency}.md").write_text(summary)
    return raw


def main(
    out: Path,
    concurrencies: list[int],
    spec: generate.StudySpec,
    cache: Path,
    rate: int,
    transport: str = "pynetdicom",
) -> int:
    if shutil.which(py_spy()) is None:
        print("error: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    files = generate.cached(spec, generate.Syntax.EXPLICIT, cache)
    work = out / "work"
    for concurrency in concurrencies:
        print(f"profiling C={concurrency} with {len(files)} instances ...", file=sys.stderr)
        profile(concurrency, files, out, work, rate, transport)
        print((out / f"profile-C{concurrency}.md").read_text(), file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return 0
