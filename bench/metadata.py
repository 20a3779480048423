"""``python -m bench metadata``: WADO-RS study metadata latency, the engine against Orthanc.

A viewer opening a study first asks for its metadata (``GET {root}/studies/{uid}/metadata``,
``Accept: application/dicom+json``): the attributes of every instance, as DICOM JSON.
For a 2,000-slice CT that one answer stands between the click and the first image; the
goal is under a second on this kind of machine.

For each peer, in the same run and one after the other:

1. start it fresh in its own folder, DICOMweb on 127.0.0.1 (the engine's ``[dicomweb]``
   server, Orthanc's DICOMweb plugin with its defaults);
2. send one synthetic study of N instances with storescu (one association, as
   ``bench run`` sends), and wait until the peer's own count reaches N;
3. time the metadata request once cold (the first request after ingest) and
   ``--repeat`` times warm, from sending the request to the last byte of the answer,
   one connection per request, no compression asked for;
4. verify every answer: a JSON list of N objects whose SOP Instance UIDs are exactly
   the study's, each with the study's Study Instance UID. A peer whose answer is wrong,
   or that fails anywhere, is marked unverified and left out of the ratio;
5. stop it by its PID.

Bulk data (the pixels) go out as BulkDataURIs, never in the metadata, so the answer is
the same whatever the slice size, and so is the engine's work (it builds the answer
from the headers its index kept at ingest). The slices are therefore small (128x128) by
default, which keeps generation and sending short. Orthanc's plugin, at its default
``StudiesMetadata`` "Full", reads every instance's file, so small slices are its
favourable case: ``--rows 512`` measures real CT sizes (2,000 instances here: Orthanc
0.38 s at 128x128 and 0.63 s at 512x512, the engine 0.28 s at both).

Results: ``metadata.json`` and ``metadata.md`` in ``--out``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from pydicom import dcmread

from bench import generate
from bench.peers import ORTHANC_DICOMWEB_PLUGIN, EnginePeer, OrthancPeer, Peer, available
from bench.replay import Scenario, send, wait_queryable

log = logging.getLogger(__name__)

PEERS = ("engine", "orthanc")
DICOM_JSON = "application/dicom+json"
SOP_INSTANCE_UID = "00080018"
STUDY_INSTANCE_UID = "0020000D"
# Seconds for the peer to count every instance sent, and for one metadata request.
COUNT_TIMEOUT = 120.0
REQUEST_TIMEOUT = 300.0
GOAL_S = 1.0
MB = 1_000_000

# Proxies from the environment never apply: every request goes to 127.0.0.1 directly.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class HttpFailure(Exception):
    """The peer answered the metadata request with an error status."""


@dataclass
class PeerResult:
    peer: str
    instances: int
    stored: int = 0
    send_s: float | None = None
    cold_s: float | None = None
    warm_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    answer_bytes: int = 0
    objects: int = 0
    content_type: str = ""
    # The server and its version, as it reports them (Orthanc: with its DICOMweb plugin).
    server: str = ""
    verified: bool = False
    error: str = ""


@dataclass(frozen=True)
class Study:
    """The files sent and what a correct metadata answer must hold."""

    files: list[Path]
    study_uid: str
    sop_uids: frozenset[str]

    @classmethod
    def read(cls, files: list[Path]) -> Study:
        study_uids, sop_uids = set(), set()
        for path in files:
            ds = dcmread(path, specific_tags=["StudyInstanceUID", "SOPInstanceUID"])
            study_uids.add(str(ds.StudyInstanceUID))
            sop_uids.add(str(ds.SOPInstanceUID))
        if len(study_uids) != 1 or len(sop_uids) != len(files):
            raise ValueError(
                f"expected one study of {len(files)} distinct instances, found "
                f"{len(study_uids)} studies and {len(sop_uids)} SOP Instance UIDs"
            )
        return cls(files, study_uids.pop(), frozenset(sop_uids))


def _first_value(item: Any, tag: str) -> str | None:
    try:
        value = item[tag]["Value"][0]
    except (KeyError, IndexError, TypeError):
        return None
    return value if isinstance(value, str) else None


def check(body: bytes, study: Study) -> tuple[int, str]:
    """(objects in the answer, "" when it is right or else what is wrong)."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return 0, f"the answer is not JSON: {exc}"
    if not isinstance(answer, list):
        return 0, f"the answer is a JSON {type(answer).__name__}, not a list"
    found: list[str] = []
    for n, item in enumerate(answer):
        uid = _first_value(item, SOP_INSTANCE_UID)
        if uid is None:
            return len(answer), f"object {n} has no SOPInstanceUID ({SOP_INSTANCE_UID})"
        if _first_value(item, STUDY_INSTANCE_UID) != study.study_uid:
            return len(answer), f"object {n} ({uid}) is not in study {study.study_uid}"
        found.append(uid)
    unique = set(found)
    problems = []
    if len(answer) != len(study.sop_uids):
        problems.append(f"{len(answer)} objects, expected {len(study.sop_uids)}")
    if len(unique) != len(found):
        problems.append(f"{len(found) - len(unique)} duplicate SOP Instance UIDs")
    if missing := study.sop_uids - unique:
        problems.append(f"{len(missing)} instances missing, e.g. {min(missing)}")
    if extra := unique - study.sop_uids:
        problems.append(f"{len(extra)} unexpected instances, e.g. {min(extra)}")
    return len(answer), "; ".join(problems)


def get_metadata(url: str) -> tuple[float, bytes, str]:
    """(seconds from the request to the answer's last byte, body, Content-Type)."""
    request = urllib.request.Request(url, headers={"Accept": DICOM_JSON})
    started = time.perf_counter()
    try:
        with _OPENER.open(request, timeout=REQUEST_TIMEOUT) as response:
            body = response.read()
            content_type = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        detail = " ".join(exc.read()[:300].decode(errors="replace").split())
        raise HttpFailure(f"HTTP {exc.code} from {url}: {detail}") from None
    return time.perf_counter() - started, body, content_type


def _get_json(url: str) -> Any:
    with _OPENER.open(url, timeout=REQUEST_TIMEOUT) as response:
        return orjson.loads(response.read())


def server_version(peer: Peer) -> str:
    if isinstance(peer, OrthancPeer):
        rest = f"http://127.0.0.1:{peer.http_port}"
        orthanc = _get_json(f"{rest}/system")["Version"]
        plugin = _get_json(f"{rest}/plugins/dicom-web")["Version"]
        return f"Orthanc {orthanc}, DICOMweb plugin {plugin}"
    try:
        return f"engine {importlib.metadata.version('dicom-ingest-engine')}"
    except importlib.metadata.PackageNotFoundError:
        return "engine"


def _peer(name: str, folder: Path) -> Peer:
    if name == "engine":
        return EnginePeer(folder, dicomweb=True)
    return OrthancPeer(folder, dicomweb=True)


def unavailable(name: str) -> str | None:
    """Why a peer cannot be measured here, or None when it can."""
    why = available(name)
    if why is None and name == "orthanc" and not ORTHANC_DICOMWEB_PLUGIN.is_file():
        why = f"{ORTHANC_DICOMWEB_PLUGIN} is missing (apt-get install orthanc-dicomweb)"
    return why


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure(name: str, folder: Path, study: Study, repeat: int) -> PeerResult:
    """One peer, fresh: send the study, then the cold request and ``repeat`` warm ones."""
    n = len(study.files)
    result = PeerResult(name, n)
    # Start with nothing of the generator's (or the previous peer's) still to be flushed.
    os.sync()
    peer = _peer(name, folder)
    peer.start()
    try:
        result.server = server_version(peer)
        _say(f"{name} ({result.server}): sending {n} instances ...")
        started = time.monotonic()
        errors = send(peer, study.files, Scenario.BURST, 1, "explicit")
        result.send_s = round(time.monotonic() - started, 3)
        if errors:
            result.error = f"storescu failed: {errors[0]}"
            return result
        result.stored, after = wait_queryable(peer, n, COUNT_TIMEOUT)
        if after is None:
            result.error = f"{name} counts {result.stored} of {n} after {COUNT_TIMEOUT:.0f} s"
            return result
        _say(f"{name}: {n} instances stored in {result.send_s:g} s")
        url = f"{peer.dicomweb_root}/studies/{study.study_uid}/metadata"
        for call in range(repeat + 1):
            seconds, body, content_type = get_metadata(url)
            result.objects, problem = check(body, study)
            result.answer_bytes, result.content_type = len(body), content_type
            if problem:
                result.error = f"request {call + 1}: {problem}"
                return result
            label = "cold" if call == 0 else f"warm {call}/{repeat}"
            _say(f"{name}: metadata {label}: {seconds:.3f} s, {len(body) / MB:.1f} MB, verified")
            if call == 0:
                result.cold_s = round(seconds, 4)
            else:
                result.warm_s.append(round(seconds, 4))
    except HttpFailure as exc:
        result.error = str(exc)
        return result
    except Exception as exc:  # a failing peer is an unverified result, not a crashed bench
        log.exception("%s failed", name)
        result.error = str(exc) or repr(exc)
        return result
    finally:
        peer.stop()
    result.median_s = round(statistics.median(result.warm_s), 4)
    result.min_s, result.max_s = min(result.warm_s), max(result.warm_s)
    result.verified = True
    return result


def ratios(results: list[PeerResult]) -> dict[str, float] | None:
    """Engine time / Orthanc time (below 1: the engine answers sooner), verified only."""
    by_peer = {r.peer: r for r in results if r.verified}
    engine, orthanc = by_peer.get("engine"), by_peer.get("orthanc")
    if engine is None or orthanc is None:
        return None
    assert engine.median_s and orthanc.median_s and engine.cold_s and orthanc.cold_s
    return {
        "median": round(engine.median_s / orthanc.median_s, 3),
        "cold": round(engine.cold_s / orthanc.cold_s, 3),
    }


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(report: dict[str, Any]) -> str:
    results: list[dict[str, Any]] = report["peers"]
    lines = [
        "# WADO-RS study metadata latency",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}; {report['date']}.",
        "",
        f"One study of {report['instances']} CT instances ({report['series']} series x "
        f"{report['slices']} slices of {report['rows']}x{report['columns']}, "
        f"{report['megabytes']:.0f} MB), sent with storescu to each peer started fresh, then "
        "`GET {root}/studies/{StudyInstanceUID}/metadata` (`Accept: application/dicom+json`) "
        f"once cold and {report['repeat']} times warm: seconds from the request to the "
        "last byte of the answer, a new connection per request, no compression. Every "
        "answer is checked: a JSON list holding each instance's SOP Instance UID once.",
        "",
        "Pixel size does not change the metadata (bulk data go out as BulkDataURIs) nor the "
        "engine's work (headers kept in its index), so small slices keep set-up short; "
        "Orthanc's plugin reads each instance's file, so for it larger slices cost more "
        "(`--rows 512` for real CT sizes).",
        "",
        "| peer | cold s | median s (warm) | min s | max s | answer MB | objects | verified |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['peer']} | {_s(r['cold_s'])} | {_s(r['median_s'])} | {_s(r['min_s'])} "
            f"| {_s(r['max_s'])} | {r['answer_bytes'] / MB:.2f} | {r['objects']} "
            f"| {'yes' if r['verified'] else 'NO: ' + r['error']} |"
        )
    lines.append("")
    ratio = report["ratio_engine_over_orthanc"]
    if ratio is None:
        lines.append("No engine / Orthanc ratio: both peers must be measured and verified.")
    else:
        lines.append(
            f"Engine / Orthanc time, medians: {ratio['median']:g} (Orthanc takes "
            f"{1 / ratio['median']:.1f}x as long); cold requests: {ratio['cold']:g}."
        )
    lines.append("")
    for r in results:
        if r["peer"] == "orthanc":
            lines += [
                f"Orthanc: {r['server'] or 'version unknown'}, the plugin at its defaults "
                '(`StudiesMetadata` "Full": every instance\'s attributes read from its file).',
                "",
            ]
    return "\n".join(lines)


def main(
    out: Path,
    *,
    instances: int,
    series: int,
    repeat: int,
    peers: list[str],
    rows: int,
    cache: Path,
    work: Path | None,
    keep: bool,
    machine: str,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    unknown = [p for p in peers if p not in PEERS]
    if unknown or not peers:
        _say(f"error: unknown peer {unknown[0] if unknown else ''!r}; choose from {PEERS}")
        return 2
    if series < 1 or instances < series or instances % series:
        _say(f"error: --instances ({instances}) must be a multiple of --series ({series})")
        return 2
    if repeat < 1:
        _say("error: --repeat must be at least 1")
        return 2
    measured = []
    for name in peers:
        if (why := unavailable(name)) is not None:
            _say(f"skipping {name}: {why}")
        else:
            measured.append(name)
    spec = generate.StudySpec(
        studies=1, series=series, slices=instances // series, rows=rows, columns=rows
    )
    _say(
        f"one study of {instances} instances ({series} series x {spec.slices} slices of "
        f"{rows}x{rows}: pixel size does not change the metadata, small slices keep set-up "
        "short; Orthanc reads each file, so larger slices cost it more)"
    )
    files = generate.cached(spec, generate.Syntax.EXPLICIT, cache, progress=progress)
    study = Study.read(files)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-metadata-", dir=work))
    started = time.monotonic()
    results: list[PeerResult] = []
    try:
        for n, name in enumerate(measured, 1):
            _say(f"[{n}/{len(measured)}] {name}")
            result = measure(name, folder / name, study, repeat)
            results.append(result)
            verdict = "verified" if result.verified else f"FAILED: {result.error}"
            _say(
                f"[{n}/{len(measured)}] {name}: cold {_s(result.cold_s)} s, "
                f"median {_s(result.median_s)} s, {verdict}"
            )
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    report: dict[str, Any] = {
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": machine,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": round(time.monotonic() - started, 1),
        "instances": instances,
        "series": series,
        "slices": spec.slices,
        "rows": rows,
        "columns": rows,
        "megabytes": round(sum(f.stat().st_size for f in files) / MB, 1),
        "study_uid": study.study_uid,
        "repeat": repeat,
        "goal_s": GOAL_S,
        "peers": [asdict(r) for r in results],
        "ratio_engine_over_orthanc": ratios(results),
    }
    (out / "metadata.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    (out / "metadata.md").write_text(markdown(report))
    ratio = report["ratio_engine_over_orthanc"]
    if ratio is not None:
        _say(f"engine / Orthanc, median time: {ratio['median']:g} (cold: {ratio['cold']:g})")
    _say(f"wrote {out / 'metadata.json'}, metadata.md")
    return 0 if results and all(r.verified for r in results) else 1
