"""Reports of a bench run: results.json (every run), results.md (medians and ratios),
results.png (a bar chart of instances per second, min-max whiskers).

Only verified runs are aggregated; a run that lost an instance is listed as failed.
Ratios compare the engine's median with each rival's median from the same bench run.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

FIGURES = ("instances_per_s", "mb_per_s", "studies_per_s", "peak_rss_mb", "cpu_s")
# Medians of what not every run has (a failed run has no latency or queryable time; older
# results.json files lack the clients' CPU and the machine's load).
EXTRAS = (
    "latency_p50_ms",
    "latency_p99_ms",
    "queryable_after_s",
    "client_cpu_s",
    "machine_busy_pct",
)


@dataclass(frozen=True)
class Group:
    scenario: str
    concurrency: int
    syntax: str
    peer: str


@dataclass
class Summary:
    group: Group
    repeats: int
    failed: int
    median: dict[str, float]
    low: dict[str, float]
    high: dict[str, float]
    extra: dict[str, float | None]


def _group(run: dict[str, Any]) -> Group:
    return Group(run["scenario"], run["concurrency"], run["syntax"], run["peer"])


def summarise(runs: Iterable[dict[str, Any]]) -> list[Summary]:
    by_group: dict[Group, list[dict[str, Any]]] = {}
    for run in runs:
        by_group.setdefault(_group(run), []).append(run)
    summaries = []
    for group, members in by_group.items():
        good = [r for r in members if r["verified"]]
        median = {f: statistics.median(r[f] for r in good) for f in FIGURES} if good else {}
        low = {f: min(r[f] for r in good) for f in FIGURES} if good else {}
        high = {f: max(r[f] for r in good) for f in FIGURES} if good else {}
        extra: dict[str, float | None] = {}
        for key in EXTRAS:
            values = [r[key] for r in good if r.get(key) is not None]
            extra[key] = statistics.median(values) if values else None
        summaries.append(
            Summary(group, len(members), len(members) - len(good), median, low, high, extra)
        )
    summaries.sort(
        key=lambda s: (
            s.group.syntax,
            s.group.scenario,
            s.group.concurrency,
            _peer_order(s.group.peer),
        )
    )
    return summaries


def _fmt(summary: Summary, figure: str) -> str:
    if figure not in summary.median:
        return "failed"
    m, lo, hi = summary.median[figure], summary.low[figure], summary.high[figure]
    if summary.repeats - summary.failed == 1:
        return f"{m:g}"
    return f"{m:g} ({lo:g}-{hi:g})"


def _optional(summary: Summary, key: str) -> str:
    """A median not every run has (``EXTRAS``), or "-"."""
    value = summary.extra[key]
    return "-" if value is None else f"{value:g}"


PEER_ORDER = {
    "engine": 0,
    "engine-nosync": 1,
    "engine-pynetdicom": 2,
    "engine-pg": 3,
    "engine-pg2": 4,
    "orthanc": 5,
    "storescp": 6,
}


def _peer_order(peer: str) -> int:
    return PEER_ORDER.get(peer, len(PEER_ORDER))


def is_engine(peer: str) -> bool:
    return peer.startswith("engine")


def ratios(summaries: list[Summary]) -> dict[tuple[str, int, str, str], dict[str, float]]:
    """Each engine variant's median instances/s over each rival's, per
    (scenario, concurrency, syntax, engine variant)."""
    table: dict[tuple[str, int, str, str], dict[str, float]] = {}
    medians = {
        (s.group.scenario, s.group.concurrency, s.group.syntax, s.group.peer): s.median.get(
            "instances_per_s"
        )
        for s in summaries
    }
    for (scenario, concurrency, syntax, peer), ours in medians.items():
        if not is_engine(peer) or not ours:
            continue
        for (sc, c, sy, rival), theirs in medians.items():
            if (sc, c, sy) == (scenario, concurrency, syntax) and rival != peer and theirs:
                table.setdefault((scenario, concurrency, syntax, peer), {})[rival] = round(
                    ours / theirs, 2
                )
    return table


def markdown(summaries: list[Summary], meta: dict[str, Any], failed: list[dict[str, Any]]) -> str:
    lines = [
        "# Bench results",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{meta['instances']} instances in {meta['studies']} studies "
        f"({meta['megabytes']:.0f} MB), syntax {', '.join(meta['syntaxes'])}, "
        f"{meta['repeats']} repeats, machine: {meta['machine']}.",
        "Medians over verified repeats, min-max in brackets. MB = 10^6 bytes. "
        "Absolute numbers vary with the machine; ratios from one run are comparable.",
        "",
        "| scenario | C | syntax | peer | instances/s | MB/s | studies/s | peak RSS MB "
        "| CPU s | clients CPU s | machine busy % | latency p50/p99 ms | queryable after s "
        "| runs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        g = s.group
        p50, p99 = s.extra["latency_p50_ms"], s.extra["latency_p99_ms"]
        latency = f"{p50:g} / {p99:g}" if p50 is not None and p99 is not None else "-"
        lines.append(
            f"| {g.scenario} | {g.concurrency} | {g.syntax} | {g.peer} "
            f"| {_fmt(s, 'instances_per_s')} | {_fmt(s, 'mb_per_s')} "
            f"| {_fmt(s, 'studies_per_s')} | {_fmt(s, 'peak_rss_mb')} | {_fmt(s, 'cpu_s')} "
            f"| {_optional(s, 'client_cpu_s')} | {_optional(s, 'machine_busy_pct')} "
            f"| {latency} | {_optional(s, 'queryable_after_s')} "
            f"| {s.repeats - s.failed}/{s.repeats} |"
        )
    table = ratios(summaries)
    if table:
        lines += ["", "## Engine / rival, median instances per second", ""]
        rivals = sorted({r for against in table.values() for r in against}, key=_peer_order)
        lines += [
            "| scenario | C | syntax | engine | " + " | ".join(f"vs {r}" for r in rivals) + " |",
            "| --- | --- | --- | --- | " + " | ".join("---" for _ in rivals) + " |",
        ]
        for (scenario, concurrency, syntax, engine), against in sorted(table.items()):
            cells = [f"{against[r]:.2f}x" if r in against else "-" for r in rivals]
            lines.append(
                f"| {scenario} | {concurrency} | {syntax} | {engine} | " + " | ".join(cells) + " |"
            )
    if failed:
        lines += ["", "## Failed runs (not averaged in)", ""]
        for run in failed:
            lines.append(
                f"- {run['peer']} {run['scenario']} C={run['concurrency']} {run['syntax']} "
                f"repeat {run['repeat']}: {run['error']}"
            )
    return "\n".join(lines) + "\n"


def plot(summaries: list[Summary], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(s.group.syntax, s.group.scenario, s.group.concurrency) for s in summaries})
    peers = sorted({s.group.peer for s in summaries}, key=lambda p: (not is_engine(p), p))
    width = 0.8 / max(1, len(peers))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(groups) + 2), 4.5))
    for n, peer in enumerate(peers):
        xs: list[float] = []
        heights: list[float] = []
        errors: list[list[float]] = [[], []]
        for x, key in enumerate(groups):
            match = [
                s
                for s in summaries
                if (s.group.syntax, s.group.scenario, s.group.concurrency) == key
                and s.group.peer == peer
                and s.median
            ]
            if not match:
                continue
            s = match[0]
            xs.append(x + n * width)
            heights.append(s.median["instances_per_s"])
            errors[0].append(s.median["instances_per_s"] - s.low["instances_per_s"])
            errors[1].append(s.high["instances_per_s"] - s.median["instances_per_s"])
        ax.bar(xs, heights, width, yerr=errors, capsize=3, label=peer)
    ax.set_xticks([x + width * (len(peers) - 1) / 2 for x in range(len(groups))])
    ax.set_xticklabels([f"{sc} C={c}\n{sy}" for sy, sc, c in groups])
    ax.set_ylabel("instances per second (median, min-max)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, runs: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_bytes(
        orjson.dumps({"meta": meta, "runs": runs}, option=orjson.OPT_INDENT_2)
    )
    summaries = summarise(runs)
    failed = [r for r in runs if not r["verified"]]
    (out / "results.md").write_text(markdown(summaries, meta, failed))
    if any(s.median for s in summaries):
        plot(summaries, out / "results.png", f"C-STORE ingest, {meta['instances']} CT instances")
