"""A probe command's summary JSON: its load runs, the figures over all of them, the objective
verdict; and the exact merge of several probes' summaries (``probe merge``)."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

from probe.histograms import decode, encode, percentiles
from probe.objective import RUN, Objective
from probe.stats import Recorder

#: Counts of a run that add up when probes share a load.
RUN_COUNTS = ("scheduled", "started", "skipped_cap", "skipped_no_devices", "late_starts",
              "max_concurrent_seen", "probe_errors")


def build(command: str, runs: list[dict[str, Any]], servers: list[str], objective: Objective,
          missed: dict[str, list[str]], window_s: float) -> dict[str, Any]:
    """``runs``: each a LoadReport summary plus ``offset_s`` (its start in the command)."""
    total = Recorder(window_s)
    for run in runs:
        total.merge(Recorder.from_summary(run["figures"]), shift=int(run["offset_s"] // window_s))
        run["timeseries_abs"] = [{**row, "t_s": row["t_s"] + run["offset_s"]}
                                 for row in run.get("timeseries", [])]
    return {
        "command": command,
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "servers": servers, "objective": objective.describe(),
        "objective_limits": dataclasses.asdict(objective),
        "objective_missed": missed, "objective_met": not any(missed.values()),
        "valid": all(run["valid"] for run in runs),
        # what each call did (wire/scenario.py): the same in every run of the command
        "scenario": runs[0].get("scenario") if runs else None,
        "runs": runs, "figures": total.summary(),
    }


def merge(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Probes that shared one load: runs by index, every count summed and every histogram
    merged, so the figures are those one probe would have had seeing every call."""
    if not summaries:
        raise ValueError("nothing to merge")
    window_s = summaries[0]["figures"]["window_s"]
    runs: list[dict[str, Any]] = []
    for index in range(max(len(s["runs"]) for s in summaries)):
        parts = [s["runs"][index] for s in summaries if index < len(s["runs"])]
        run = dict(parts[0])
        for key in RUN_COUNTS:
            run[key] = sum(p.get(key, 0) for p in parts)
        recorder = Recorder(window_s)
        schedule = decode("")
        for part in parts:
            recorder.merge(Recorder.from_summary(part["figures"]))
            schedule.add(decode(part.get("schedule_error_hist", "")))
        run["figures"] = recorder.summary()
        run["timeseries"] = recorder.timeseries()
        run["schedule_error_hist"] = encode(schedule)
        run["schedule_error_ms"] = percentiles(schedule)
        run["valid"] = all(p["valid"] for p in parts)
        run["probes"] = len(parts)
        run["shard"] = shards_of(parts)
        runs.append(run)
    servers = sorted({n for s in summaries for n in s.get("servers", [])})
    objective = Objective(**summaries[0].get("objective_limits", {}))
    media = any(run.get("media") == "full" for run in runs)
    total = Recorder(window_s)
    for run in runs:
        total.merge(Recorder.from_summary(run["figures"]))
    missed = objective.missed_by_server(total.crossing, media)
    gaps = [f"run {i}: {run['shard']['problem']}" for i, run in enumerate(runs)
            if run["shard"].get("problem")]
    if gaps:  # a load whose shards do not add up is not the load that was asked for
        missed[RUN] = missed.get(RUN, []) + gaps
    merged = build("merge", runs, servers, objective, missed, window_s)
    merged["merged_from"] = len(summaries)
    # The probes watched the same servers: one view of them (the first probe's) is enough.
    merged["server_metrics"] = next(
        (s["server_metrics"] for s in summaries if s.get("server_metrics")), {})
    return merged


def shards_of(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """What the merged parts of one run are as shards of one load (probe/load.py Shard), and
    what is wrong with them if they do not make it whole: a shard missing or twice, parts of
    different loads, or a count that does not add up to the schedule."""
    found = [p.get("shard") or {"index": 0, "count": 1, "scheduled_total": p.get("scheduled")}
             for p in parts]
    count = found[0]["count"]
    # a part may itself be shards merged already (a fleet leader's run): its indexes count
    indexes = sorted(i for f in found for i in (f["indexes"] if "indexes" in f else
                                                   [f["index"]]))
    total = found[0].get("scheduled_total")
    out: dict[str, Any] = {"count": count, "indexes": indexes, "scheduled_total": total}
    if count == 1:
        return out  # probes that each ran a whole load of their own: nothing to check
    if problems := [f["problem"] for f in found if f.get("problem")]:
        out["problem"] = problems[0]  # a part already not whole
        return out
    scheduled = sum(p.get("scheduled", 0) for p in parts)
    if any(f["count"] != count or f.get("scheduled_total") != total for f in found):
        out["problem"] = "parts of different loads (shard counts or schedules differ)"
    elif len(set(indexes)) != len(indexes):
        out["problem"] = f"a shard merged twice: {indexes}"
    elif indexes != list(range(count)):
        missing = sorted(set(range(count)) - set(indexes))
        out["problem"] = f"shards {missing} of {count} missing"
    elif scheduled != total:
        out["problem"] = f"the shards scheduled {scheduled} calls of {total}"
    starts = {p.get("schedule_started_at") for p in parts}
    if "problem" not in out and len(starts) > 1:
        out["problem"] = f"the shards started their schedules apart: {sorted(starts)}"
    return out
