"""Congestion control end to end: one call across a trunk limited to 400 kbit/s each way, with
the servers' congestion control on and off, in one run.

    .venv/bin/python benchmarks/congestion.py [--limit 400] [--hold 25] [--json]

The tree is tests/faults.py's split lab: upper and lower-b (device cam-b) on the host, lower-a
(device cam-a) in a network namespace of the benchmark's own, so of the call
lower-b/cam-b -> lower-a/cam-a only the trunk upper - lower-a crosses the veth, which tbf limits
each way (the probe, on the host, reads the caller's server: its own traffic stays off the
narrow link). Devices are synthetic (640x480@30, VP8 encoded live: they can adapt; Opus at 32
kbit/s). The call is sampled every second (probe/calls.py ``sample``) and so is the limit's
queue (tc -s). Printed for each, for the caller's media (cam-b -> cam-a; the other direction
is in ``directions``):

- ``bitrate_kbps_after_10s``: what cam-b sent (video and audio, as lower-b received them) 10 s
  into the call;
- ``converge_s``: from when what it sent stayed under the limit and the limit dropped no more
  of it (None: never);
- from then on (the whole call when it never did): ``frame_loss`` (frames lost / sent),
  ``freeze_ratio`` (freezes / frames), and ``latency_ms_p50``/``p95`` (glass-to-glass; the
  frame-weighted percentile of the one-second windows' p50 and p95);
- ``ok`` and ``reason``: whether the call lasted, and how it ended.

Needs root (namespaces, tc); the namespace and everything in it is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probe.calls import run_call
from tests.faults import split_lab
from wire.logs import setup_logging
from wire.messages import DIRECTIONS

CALLER, CALLEE = "lower-b/cam-b", "lower-a/cam-a"
#: which way of the limit each direction of the call crosses (tests/faults.py link_stats)
WAYS = {"caller_to_callee": "in", "callee_to_caller": "out"}


def weighted(rows: list[dict[str, Any]], key: str, q: float) -> float | None:
    """The ``q`` percentile of ``key`` over the windows, each counting for its frames."""
    known = sorted((r[key], r["frames"]) for r in rows if r.get(key) is not None and r["frames"])
    total = sum(frames for _, frames in known)
    seen = 0
    for value, frames in known:
        seen += frames
        if seen >= q * total:
            return value
    return None


def judge(series: list[dict[str, Any]], limit_kbps: float,
          drops: list[tuple[float, int]]) -> dict[str, Any]:
    """The figures of one direction's samples (see the module's docstring); ``drops``: the
    limit's dropped-packet counter over time, on the way this direction crosses it."""
    sent = [(r["t_s"], r["at"], round(r["sent_kbps"] + (r.get("audio_kbps") or 0.0), 1))
            for r in series if r.get("sent_kbps") is not None]
    after_10 = next((kbps for t, _, kbps in sent if t >= 10), None)
    last_drop = max((at for (_, before), (at, count) in itertools.pairwise(drops)
                     if count > before), default=float("-inf"))
    converge = next((t for t, at, kbps in sent if kbps < limit_kbps and at >= last_drop),
                    None)
    rows = [r for r in series if converge is None or r["t_s"] > converge]
    rows = [r for r in rows if r.get("frames") is not None]
    frames = sum(r["frames"] for r in rows)
    lost = sum(r["frames_lost"] for r in rows)
    gaps = sum(r["gaps"] for r in rows)
    return {"limit_kbps": limit_kbps, "bitrate_kbps_after_10s": after_10,
            "converge_s": converge, "dropped_by_the_limit": drops[-1][1] if drops else None,
            "frame_loss": round(lost / (frames + lost), 4) if frames + lost else None,
            "freeze_ratio": round(gaps / frames, 4) if frames else None,
            "latency_ms_p50": weighted(rows, "latency_ms_p50", 0.5),
            "latency_ms_p95": weighted(rows, "latency_ms_p95", 0.95),
            "seconds_judged": len(rows)}


async def one(congestion: str, limit_kbps: int, hold_s: float) -> dict[str, Any]:
    async with split_lab(video="synthetic", size="640x480",
                         servers=("--congestion-control", congestion)) as (ns, session, servers):
        ns.limit_rate(limit_kbps)
        link: list[tuple[float, dict[str, dict[str, int]]]] = []

        async def watch() -> None:
            while True:
                link.append((time.time(), ns.link_stats()))
                await asyncio.sleep(0.5)

        watching = asyncio.create_task(watch())
        try:
            result = await run_call(session, servers, CALLER, CALLEE, hold_s, sample_s=1.0)
        finally:
            watching.cancel()
    directions = {d: judge(result.series.get(d, []), limit_kbps,
                           [(at, seen[WAYS[d]]["dropped"]) for at, seen in link])
                  for d in DIRECTIONS}
    out = dict(directions["caller_to_callee"])
    last = result.series.get("caller_to_callee", [{}])[-1] if result.series else {}
    first = (result.hops[0]["streams"].get("caller_to_callee") or {}).get("video") or {} \
        if result.hops else {}
    sender = result.senders.get("caller_to_callee") or {}
    out.update(ok=result.ok, reason=result.reason, target_kbps_at_end=last.get("target_kbps"),
               keyframes_asked_of_sender=first.get("keyframes_out"),
               encoder_restarts=sender.get("restarts"),
               limited_by=(result.rate.get("caller_to_callee") or {}).get("link"),
               directions=directions,
               series=[{k: r.get(k) for k in ("t_s", "sent_kbps", "audio_kbps",
                                              "reported_kbps", "target_kbps", "frames",
                                              "frames_lost", "gaps", "latency_ms_p50",
                                              "latency_ms_p95")}
                       for r in result.series.get("caller_to_callee", [])])
    return out


def table(out: dict[str, Any]) -> str:
    keys = ("bitrate_kbps_after_10s", "converge_s", "frame_loss", "freeze_ratio",
            "latency_ms_p50", "latency_ms_p95")
    lines = [f"one call, trunk upper - lower-a limited to {out['on']['limit_kbps']} kbit/s each "
             "way (tbf); cam-b's media (video + audio)",
             f"{'congestion control':<20}" + "".join(f"{k:>24}" for k in keys) + "   call"]
    for case in ("on", "off"):
        found = out[case]
        lines.append(f"{case:<20}" + "".join(
            f"{'-' if found[k] is None else found[k]:>24}" for k in keys)
            + f"   {'ok' if found['ok'] else 'FAILED'} ({found['reason']})")
    on = out["on"]
    lines.append(f"with it on, the rate was limited by {on['limited_by']}; the sender's "
                 f"target at the end {on['target_kbps_at_end']} kbit/s")
    for case in ("on", "off"):
        found = out[case]
        lines.append(f"{case}: keyframes asked of the sender {found['keyframes_asked_of_sender']}"
                     f", encoder restarts (new targets) {found['encoder_restarts']}")
    lines.append("video kbit/s each second, on:  " + " ".join(
        f"{r['sent_kbps']:.0f}" for r in on["series"] if r["sent_kbps"] is not None))
    lines.append("video kbit/s each second, off: " + " ".join(
        f"{r['sent_kbps']:.0f}" for r in out["off"]["series"] if r["sent_kbps"] is not None))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=400, help="kbit/s, each way")
    parser.add_argument("--hold", type=float, default=25.0, help="seconds the call is up")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    setup_logging("congestion", "warning")

    async def run() -> dict[str, Any]:
        return {"on": await one("on", args.limit, args.hold),
                "off": await one("off", args.limit, args.hold)}

    out = asyncio.run(run())
    print(json.dumps(out) if args.json else table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
