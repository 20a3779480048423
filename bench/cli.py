"""``python -m bench run|setup``: replay synthetic CT bursts against the engine and rivals."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import crash, generate, index, metadata, profile, report
from bench.fuzz import campaign as fuzz
from bench.peers import ORTHANC_DICOMWEB_PLUGIN, PEERS, EnginePeer, available
from bench.replay import Scenario, run_once

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "dicom-bench-cache"
RIVAL_PACKAGES = {"orthanc": "orthanc", "storescp": "dcmtk"}


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, {platform.system()} {platform.release()}"


def _progress(label: str) -> Any:
    def show(done: int, total: int) -> None:
        if done == total or done % max(1, total // 20) == 0:
            print(
                f"\r{label}: {done}/{total} ({100 * done // max(1, total)}%)",
                end="",
                file=sys.stderr,
            )
            if done == total:
                print(file=sys.stderr)

    return show


def setup() -> int:
    """Install the rivals from Debian's packages; a rival that cannot be had is skipped."""
    missing = [pkg for name, pkg in RIVAL_PACKAGES.items() if available(name) is not None]
    if not ORTHANC_DICOMWEB_PLUGIN.is_file():
        missing.append("orthanc-dicomweb")  # for ``bench metadata``
    if not missing:
        print("rivals already installed: Orthanc with its DICOMweb plugin, dcmtk")
        return 0
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=False)
    for package in sorted(set(missing)):
        done = subprocess.run(
            [*sudo, "apt-get", "install", "-y", "-qq", package],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            check=False,
        )
        if done.returncode != 0:
            print(f"warning: cannot install {package}; the bench will skip it", file=sys.stderr)
    for name in RIVAL_PACKAGES:
        why = available(name)
        print(f"{name}: {'ready' if why is None else 'skipped: ' + why}")
    return 0


def run(args: argparse.Namespace) -> int:
    spec = generate.StudySpec(
        studies=args.studies,
        series=args.series,
        slices=args.slices,
        rows=args.rows,
        columns=args.columns,
        seed=args.seed,
    )
    peers = []
    for name in _csv(args.peers):
        if name not in PEERS:
            print(f"error: unknown peer {name!r}; choose from {', '.join(PEERS)}", file=sys.stderr)
            return 2
        why = available(name)
        if why is not None:
            print(f"skipping {name}: {why}", file=sys.stderr)
            continue
        peers.append(name)
    syntaxes = _csv(args.syntax)
    concurrencies = [int(c) for c in _csv(args.concurrency)]
    scenarios = [Scenario(s) for s in _csv(args.scenarios)]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-run-", dir=args.work))
    # Searchable by others (not listable): run as root, the PostgreSQL peers' cluster runs
    # as the postgres user and must reach its folder in here, on the peers' disk.
    work.chmod(0o711)
    files_by_syntax = {
        syntax: generate.cached(
            spec, generate.Syntax(syntax), args.cache, progress=_progress(f"generating {syntax}")
        )
        for syntax in syntaxes
    }
    plan = [
        (repeat, syntax, scenario, concurrency, peer)
        for repeat in range(1, args.repeat + 1)
        for syntax in syntaxes
        for scenario in scenarios
        for concurrency in concurrencies
        for peer in peers
    ]
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for n, (repeat, syntax, scenario, concurrency, name) in enumerate(plan, 1):
            folder = work / f"{n:03d}-{name}"
            peer = PEERS[name](folder)
            if isinstance(peer, EnginePeer) and peer.fsync_from_args:
                peer.fsync = args.fsync == "true"
            files = files_by_syntax[syntax]
            label = f"[{n}/{len(plan)}] {name} {scenario.value} C={concurrency} {syntax} r{repeat}"
            print(f"{label}: sending {len(files)} instances ...", file=sys.stderr, flush=True)
            result = run_once(peer, files, spec.studies, scenario, concurrency, syntax, repeat)
            runs.append(result.as_dict())
            verdict = "verified" if result.verified else f"FAILED: {result.error}"
            print(
                f"{label}: {result.instances_per_s:g} instances/s, {result.mb_per_s:g} MB/s, "
                f"peak RSS {result.peak_rss_mb:g} MB, {verdict}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    any_files = next(iter(files_by_syntax.values()))
    meta = {
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "studies": spec.studies,
        "instances": len(any_files),
        "megabytes": sum(f.stat().st_size for f in any_files) / 1e6,
        "syntaxes": syntaxes,
        "repeats": args.repeat,
        "engine_fsync": args.fsync == "true",
        "machine": _machine(),
        "seconds": round(time.monotonic() - started, 1),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    report.write(out, runs, meta)
    print(f"wrote {out / 'results.json'}, results.md, results.png", file=sys.stderr)
    return 0 if all(r["verified"] for r in runs) else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "setup", help="install Orthanc (and its DICOMweb plugin) and dcmtk from Debian's packages"
    )
    r = commands.add_parser("run", help="run the benchmark and write the reports")
    r.add_argument("--out", type=Path, required=True, help="folder for results.json/.md/.png")
    r.add_argument("--studies", type=int, default=4)
    r.add_argument("--series", type=int, default=2, help="series per study")
    r.add_argument("--slices", type=int, default=150, help="slices per series")
    r.add_argument("--rows", type=int, default=512)
    r.add_argument("--columns", type=int, default=512)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--concurrency", default="1,4", help="associations at once, e.g. 1,4,8")
    r.add_argument("--scenarios", default="burst", help="burst and/or per-instance")
    r.add_argument(
        "--peers", default="engine,orthanc,storescp", help=f"comma-separated: {', '.join(PEERS)}"
    )
    r.add_argument("--repeat", type=int, default=3)
    r.add_argument("--syntax", default="explicit", help="explicit, jpeg-lossless, jpeg-ls")
    r.add_argument(
        "--fsync", choices=("true", "false"), default="true", help="engine's [storage] fsync"
    )
    r.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="generated studies, reused")
    r.add_argument("--work", type=Path, default=None, help="folder for the peers' data")
    r.add_argument("--keep", action="store_true", help="keep the peers' folders")
    pr = commands.add_parser("profile", help="sample the engine's CPU with py-spy during a burst")
    pr.add_argument("--out", type=Path, required=True, help="folder for profile-C*.txt/.md")
    pr.add_argument("--studies", type=int, default=2)
    pr.add_argument("--concurrency", default="1,4")
    pr.add_argument("--rate", type=int, default=250, help="samples per second")
    pr.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    pr.add_argument("--transport", choices=("pynetdicom", "native"), default="native")
    ix = commands.add_parser("index", help="C-FIND latency and ingest rate at a large index")
    ix.add_argument("--out", type=Path, required=True, help="folder for index.json/.md")
    ix.add_argument("--instances", type=int, default=1_000_000)
    ix.add_argument("--per-study", type=int, default=100, help="instances per study")
    ix.add_argument("--queries", type=int, default=50, help="identifiers per query type")
    ix.add_argument("--repeat", type=int, default=2, help="ingest runs per index; 0: none")
    ix.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    md = commands.add_parser("metadata", help="WADO-RS study metadata latency, engine and Orthanc")
    md.add_argument("--out", type=Path, required=True, help="folder for metadata.json/.md")
    md.add_argument("--instances", type=int, default=2000, help="instances in the one study")
    md.add_argument("--series", type=int, default=4, help="series the instances are split into")
    md.add_argument("--repeat", type=int, default=5, help="timed requests after the cold one")
    md.add_argument("--peers", default="engine,orthanc")
    md.add_argument("--rows", type=int, default=128, help="rows and columns of each slice")
    md.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="generated studies, reused")
    md.add_argument("--work", type=Path, default=None, help="folder for the peers' data")
    md.add_argument("--keep", action="store_true", help="keep the peers' folders")
    crash.add_arguments(
        commands.add_parser("crash", help="kill -9 the engine mid-burst, restart, check; N rounds")
    )
    fuzz.add_arguments(
        commands.add_parser("fuzz", help="malformed DICOM network input while a sender stores")
    )
    args = parser.parse_args(argv)
    if args.command == "fuzz":
        return fuzz.main(args, machine=_machine())
    if args.command == "crash":
        return crash.main(args, machine=_machine())
    if args.command == "metadata":
        return metadata.main(
            args.out,
            instances=args.instances,
            series=args.series,
            repeat=args.repeat,
            peers=_csv(args.peers),
            rows=args.rows,
            cache=args.cache,
            work=args.work,
            keep=args.keep,
            machine=_machine(),
            progress=_progress("generating"),
        )
    if args.command == "index":
        return index.main(
            args.out, args.instances, args.per_study, args.queries, args.repeat, args.cache
        )
    if args.command == "setup":
        return setup()
    if args.command == "profile":
        spec = generate.StudySpec(studies=args.studies)
        concurrencies = [int(c) for c in _csv(args.concurrency)]
        return profile.main(args.out, concurrencies, spec, args.cache, args.rate, args.transport)
    return run(args)
