"""The campaign's reports: ``fuzz.json`` (everything counted) and ``fuzz.md`` (the tables)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from bench.fuzz.model import Family, FindingKind, Reaction
from bench.fuzz.watch import LogVerdict

if TYPE_CHECKING:
    from bench.fuzz.campaign import Journal, Settings, Tally

TOP_VARIANTS = 80
RUN_FACTS = frozenset({"sender", "completed", "seconds", "fuzz_seconds"})  # not the engine's
TOP_WARNINGS = 25
# Column order of the family table: the reactions in the order a reader expects.
REACTIONS = [str(r) for r in Reaction]


def build(
    settings: Settings, tally: Tally, journal: Journal, verdict: LogVerdict, facts: dict[str, Any]
) -> dict[str, Any]:
    fuzz_seconds = float(facts.get("fuzz_seconds") or facts.get("seconds") or 0.0)
    return {
        "command": settings.command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": settings.machine,
        "transport": settings.transport,
        "seed": settings.seed,
        "planned": settings.planned,
        "inputs": tally.done,
        "completed": bool(facts.get("completed", False)),
        "parallel": settings.parallel,
        "timing": {
            "acse_timeout": settings.timing.acse_timeout,
            "network_timeout": settings.timing.network_timeout,
            "slack": settings.timing.slack,
        },
        "seconds": facts.get("seconds"),
        "inputs_per_s": round(tally.done / fuzz_seconds, 1) if fuzz_seconds else None,
        "verdict": "FAIL" if tally.findings else "pass",
        "findings": {
            kind: {
                "what": FindingKind[kind].value,
                "count": count,
                "inputs": tally.finding_inputs.get(kind, []),
                "details": tally.finding_details.get(kind, []),
            }
            for kind, count in tally.findings.items()
        },
        "reactions": dict(tally.reactions.most_common()),
        "by_family": {family: dict(counts) for family, counts in sorted(tally.by_family.items())},
        "variants": dict(tally.variants.most_common(TOP_VARIANTS)),
        "dimse_answers": dict(tally.answers.most_common()),
        "aborts": dict(tally.aborts.most_common()),
        "slowest_reaction_s": tally.slowest,
        "engine": {key: value for key, value in facts.items() if key not in RUN_FACTS},
        "sender": facts.get("sender", {}),
        "log": {
            "records": verdict.records,
            "levels": dict(verdict.levels),
            "warnings": dict(verdict.warnings.most_common(TOP_WARNINGS)),
            "library": dict(verdict.library.most_common(TOP_WARNINGS)),
            "unexpected": verdict.unexpected_count,
            "unexpected_examples": verdict.unexpected,
            "library_crashes": dict(verdict.library_crashes.most_common()),
            "library_crash_examples": verdict.library_crash_examples,
        },
    }


def markdown(data: dict[str, Any]) -> str:
    lines = [
        f"# Network fuzz: {data['verdict']}",
        "",
        f"`{data['command']}`",
        "",
        f"{data['date']}, {data['machine']}; transport **{data['transport']}**, "
        f"seed {data['seed']}, {data['inputs']} of {data['planned']} inputs"
        f"{'' if data['completed'] else ' (cut short)'}, {data['parallel']} connections at a "
        f"time, {data['inputs_per_s']} inputs/s, {data['seconds']} s in all; engine timers "
        f"acse {data['timing']['acse_timeout']} s, network {data['timing']['network_timeout']} s.",
        "",
        "## Findings",
        "",
    ]
    if not data["findings"]:
        lines.append("None: no crash, no hang, no loss, no unexpected log record.")
    for kind, finding in data["findings"].items():
        lines.append(f"- **{kind}** ({finding['what']}): {finding['count']}")
        lines.extend(f"  - {detail}" for detail in finding["details"][:5])
    present = [r for r in REACTIONS if r in data["reactions"]]
    lines += ["", "## Reactions by family", "",
              "| family | inputs | " + " | ".join(present) + " |",
              "| --- | --- |" + " --- |" * len(present)]  # fmt: skip
    for family in [str(f) for f in Family]:
        counts = data["by_family"].get(family)
        if not counts:
            continue
        cells = " | ".join(str(counts.get(r, "")) for r in present)
        lines.append(f"| {family} | {sum(counts.values())} | {cells} |")
    total = " | ".join(str(data["reactions"].get(r, "")) for r in present)
    lines.append(f"| **all** | {data['inputs']} | {total} |")
    lines += ["", "DIMSE answers received (command field, status): "
              + ", ".join(f"{k}: {v}" for k, v in data["dimse_answers"].items()),
              "", "A-ABORTs (source, reason): "
              + ", ".join(f"{k}: {v}" for k, v in data["aborts"].items())]  # fmt: skip
    engine, sender = data["engine"], data["sender"]
    lines += [
        "",
        "## Engine",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| resident memory at start / end / peak (MB) | {engine.get('rss_start_mb', '?')} / "
        f"{engine.get('rss_end_mb', '?')} / {engine.get('peak_rss_mb', '?')} |",
        f"| CPU while idle after the run (share of a core) | {engine.get('idle_cpu_share', '?')} |",
        f"| C-ECHO at the end | {engine.get('final_echo', '?')} |",
        f"| exit code after SIGTERM | {engine.get('exit_code', '?')} |",
        f"| index at the end | {engine.get('index', {})} |",
        f"| slowest reaction (s) | {data['slowest_reaction_s']} |",
        "",
        "## Well-behaved sender",
        "",
        f"{sender.get('sent', 0)} C-STOREs on {sender.get('associations', 0)} associations: "
        f"{sender.get('succeeded', 0)} answered success, {sender.get('failed', 0)} failed, "
        f"**{sender.get('lost', 0)} lost**; slowest operation "
        f"{sender.get('slowest_operation_s')} s.",
        "",
        "## Engine log",
        "",
        f"{data['log']['records']} records: {data['log']['levels']}; "
        f"unexpected: {data['log']['unexpected']}.",
        "",
        "| warnings, by kind | count |",
        "| --- | --- |",
    ]
    lines.extend(f"| `{k}` | {v} |" for k, v in data["log"]["warnings"].items())
    if data["log"]["library"]:
        lines += ["", "| errors pynetdicom logs for bad input it handles itself | count |",
                  "| --- | --- |"]  # fmt: skip
        lines.extend(f"| `{k}` | {v} |" for k, v in data["log"]["library"].items())
    return "\n".join(lines) + "\n"


def write(
    settings: Settings, tally: Tally, journal: Journal, verdict: LogVerdict, facts: dict[str, Any]
) -> Path:
    data = build(settings, tally, journal, verdict, facts)
    out: Path = settings.out
    (out / "fuzz.json").write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    (out / "fuzz.md").write_text(markdown(data))
    return out / "fuzz.json"
