"""The crash campaign's reports: ``crash.json`` (everything) and ``crash.md`` (tables)."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from bench.audit import Findings

if TYPE_CHECKING:
    from bench.crash import Campaign

# What a round or the final check counts as a violation (all must be zero).
VIOLATIONS = (*Findings.VIOLATIONS, "quarantined", "unfindable")

# The totals shown in the summary table, in order, with their labels.
_SUMMARY = (
    ("rounds", "rounds (kill -9, restart, check)"),
    ("acknowledged", "instances acknowledged"),
    ("acknowledged_resent", "of which re-sent after an earlier kill"),
    ("verified_after_each_restart", "verified after the restart of their round"),
    ("verified_at_the_end", "verified at the end (all read back)"),
    ("lost", "lost"),
    ("orphans", "orphan files"),
    ("temps", "temp files left"),
    ("journals", "journal batches left"),
    ("dangling", "dangling rows"),
    ("unreadable", "unreadable files"),
    ("counters", "wrong counters"),
    ("quarantined", "quarantined"),
    ("unfindable", "not found by C-FIND"),
    ("engine_crashes", "engine crashes (exits other than our kill)"),
    ("kills_mid_burst", "kills mid-burst"),
    ("kills_before_any_answer", "of which before the first answer"),
    ("kills_after_burst", "kills after the burst had ended"),
    ("replayed", "files indexed by the journal replay"),
    ("temps_removed", "temp files removed at restart"),
    ("instances_at_the_end", "instances in the index at the end"),
)


def build(campaign: Campaign, seconds: float) -> dict[str, Any]:
    """Everything the JSON report holds: settings, totals, every round."""
    s = campaign.settings
    rounds = campaign.rounds
    final = campaign.final
    restarts = [r.restart_s for r in rounds]
    distinct = {name: set(items) for name, items in campaign.found.items()}
    if final is not None:
        for name, items in {**final.items(), **campaign.final_extra}.items():
            distinct.setdefault(name, set()).update(items)
    statuses: Counter[str] = Counter()
    for r in rounds:
        statuses.update(r.other_statuses)
    totals: dict[str, Any] = {
        "rounds": len(rounds),
        "acknowledged": len(campaign.acked),
        "acknowledged_resent": sum(r.acknowledged_resent for r in rounds),
        "verified_after_each_restart": sum(r.verified for r in rounds),
        "verified_at_the_end": final.verified if final is not None else 0,
        **{name: len(distinct.get(name, ())) for name in VIOLATIONS},
        "engine_crashes": len(campaign.crashes),
        "stuck_senders": sum(len(r.stuck_senders) for r in rounds),
        "scanner_errors": sum(len(r.scanner_errors) for r in rounds),
        "other_statuses": dict(statuses),
        "unanswered": sum(r.unanswered for r in rounds),
        "kills_mid_burst": sum(not r.kill_after_burst for r in rounds),
        "kills_before_any_answer": sum(r.answered == 0 for r in rounds),
        "kills_after_burst": sum(r.kill_after_burst for r in rounds),
        "replayed": sum(r.recovery["replayed"] for r in rounds),
        "temps_removed": sum(r.recovery["temps_removed"] for r in rounds),
        "first_start_s": round(campaign.first_start_s, 3),
        "restart_s": spread(restarts),
        "startup_s": spread([r.startup_s for r in rounds if r.startup_s is not None]),
        "round_s": spread([r.seconds for r in rounds]),
        "check_s": spread([r.check_s for r in rounds]),
        "instances_at_the_end": final.rows if final is not None else None,
        "log_error_lines": sum(len(r.log_errors) for r in rounds),
    }
    return {
        "ok": campaign.ok,
        "command": campaign.command,
        "machine": campaign.machine,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": round(seconds, 1),
        "settings": {
            "rounds": s.rounds,
            "senders": s.senders,
            "instances_per_round": s.instances_per_round,
            "size": s.size,
            "seed": s.seed,
            "transport": s.transport,
            "fsync": s.fsync,
            "work": str(s.work),
        },
        "totals": totals,
        "crashes": campaign.crashes,
        "aborted": campaign.aborted,
        "examples": {name: sorted(items)[:10] for name, items in distinct.items() if items},
        "rounds": [asdict(r) for r in rounds],
    }


def spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def write(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "crash.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    (out / "crash.md").write_text(markdown(report))


def summary_line(report: dict[str, Any]) -> str:
    t = report["totals"]
    verdict = "PASSED" if report["ok"] else "FAILED"
    median = t["restart_s"]["median"]
    restart = "n/a" if median is None else f"{median:.2f} s"
    return (
        f"crash campaign {verdict}: {t['rounds']} rounds, {t['acknowledged']} acknowledged, "
        f"lost {t['lost']}, orphans {t['orphans']}, temps {t['temps']}, "
        f"dangling {t['dangling']}, crashes {t['engine_crashes']}, median restart {restart}"
    )


def markdown(report: dict[str, Any]) -> str:
    t = report["totals"]
    s = report["settings"]
    restart = t["restart_s"]
    lines = [
        "# Crash campaign",
        "",
        f"**{summary_line(report)}**",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine']}; {report['date']}; {report['seconds']} s",
        f"- engine: transport {s['transport']}, fsync {str(s['fsync']).lower()}; "
        f"{s['senders']} senders, {s['instances_per_round']} new instances per round "
        f"({s['size']}x{s['size']} CT slices), seed {s['seed']}",
        "",
        "| figure | value |",
        "| --- | --- |",
    ]
    lines += [f"| {label} | {t[key]} |" for key, label in _SUMMARY]
    lines += [
        f"| first start (fresh folder), s | {t['first_start_s']} |",
        f"| restart after the kill until ready, s: median (min-max) | {_spread(restart)} |",
        "| of which the engine's own start-up (index, clean-up, journal replay, missing-file"
        f" check), s | {_spread(t['startup_s'])} |",
        f"| a round, s: median (min-max) | {_spread(t['round_s'])} |",
        f"| of which the check (audit, C-FIND), s | {_spread(t['check_s'])} |",
        f"| answers other than success | {t['other_statuses'] or 'none'} |",
        f"| senders stuck after the kill | {t['stuck_senders']} |",
        f"| scanners refused or failed (not counting the kill) | {t['scanner_errors']} |",
        f"| ERROR lines in the engine's log | {t['log_error_lines']} |",
        "",
    ]
    if report["crashes"] or report["aborted"]:
        lines += ["## Crashes", ""] + [f"- {c}" for c in report["crashes"]] + [""]
    if report["examples"]:
        lines += ["## Violations (examples)", ""]
        for name, items in report["examples"].items():
            lines += [f"- {name}:"] + [f"  - `{item}`" for item in items]
        lines.append("")
    lines += [
        "## Rounds",
        "",
        "| round | kill at s | moment | sent | re-sent | acknowledged | restart s "
        "| start-up s | replayed | temps removed | verified | violations |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rounds"]:
        problems = {k: v for k, v in r["violations"].items() if v}
        if r["engine_crash"]:
            problems["crash"] = r["engine_crash"]
        lines.append(
            f"| {r['round']} | {r['killed_at_s']} "
            f"| {'after' if r['kill_after_burst'] else 'mid-burst'} | {r['planned']} "
            f"| {r['resent']} | {r['acknowledged']} | {r['restart_s']} | {r['startup_s']} "
            f"| {r['recovery']['replayed']} | {r['recovery']['temps_removed']} "
            f"| {r['verified']} | {problems or 'none'} |"
        )
    return "\n".join(lines) + "\n"


def _spread(figures: dict[str, Any]) -> str:
    return f"{figures['median']} ({figures['min']}-{figures['max']})"
