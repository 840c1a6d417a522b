"""Real faults on one hop, and what the probe attributes to each hop: the same calls with no
fault and with it, in one run.

    .venv/bin/python benchmarks/faults.py [--hold 5] [--json]

- slow server: the local stack (upper, lower-a, lower-b; packet devices); the upper server's
  process is stopped 40 ms of every 150 ms (SIGSTOP/SIGCONT). A packet arriving while it is
  stopped waits half the stop: 5.3 ms on average. Printed: each hop's latency part (server
  transit means, link one-way estimates, both directions of video) without and with.
- lossy link: lower-a (and its device) in a network namespace of its own; 5 % of UDP packets
  dropped each way on its veth, so on the link lower-a - upper only. Printed: each link's
  packets lost before repair, as a share of what was sent, without and with.
- capacity: a search of the upper server as a transit (`probe capacity --via upper`, 1 s
  calls), without and with lower-b on the duty cycle. Printed: which server gave way first, by
  what, and every server's signals (transit p99, loop lag, CPU, loss on arrival) at the first
  failing rate.

Needs root (namespaces, iptables); the namespace and everything in it is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.stack import LocalStack, StackSettings
from probe.bottleneck import parts
from probe.calls import CallResult, run_call
from probe.capacity import CapacitySettings, describe_gave_way, search
from probe.load import LoadSettings
from probe.objective import Objective
from probe.scrape import ServerWatch
from tests.faults import duty_cycle, split_lab
from wire.client import discover, pick_pair
from wire.logs import setup_logging

STOPPED_S, PERIOD_S, LOSS = 0.04, 0.15, 0.05


def latency(result: CallResult) -> dict[str, float]:
    return parts(result.hops, result.links)["latency_ms"]


def loss(result: CallResult) -> dict[str, float]:
    out = {}
    for link in result.links:
        for direction, seen in link["directions"].items():
            sent = seen.get("lost", 0) + seen.get("packets", 0)
            if sent:
                out[f"{link['from']} -> {link['to']} {direction}"] = round(
                    100 * seen["lost"] / sent, 2)
    return out


async def slow_server(hold_s: float) -> dict[str, Any]:
    settings = StackSettings(devices=1, video="packets", size="320x240", fps=15)
    async with LocalStack(settings) as stack, aiohttp.ClientSession() as session:
        servers = await discover(session, stack.urls)
        pair = pick_pair(servers)
        before = await run_call(session, servers, *pair, hold_s)
        upper = next(c for c in stack.servers if c.name == "upper")
        async with duty_cycle(upper.process.pid, STOPPED_S, PERIOD_S):
            during = await run_call(session, servers, *pair, hold_s)
    return {"injected": f"upper stopped {STOPPED_S * 1000:g} ms of every "
                        f"{PERIOD_S * 1000:g} ms: {STOPPED_S / PERIOD_S * STOPPED_S / 2 * 1000:.1f}"
                        " ms per packet on average, each way",
            "ok": [before.ok, during.ok], "latency_ms_without": latency(before),
            "latency_ms_with": latency(during), "bottleneck_with": during.bottleneck}


async def lossy_link(hold_s: float) -> dict[str, Any]:
    pair = ("lower-a/cam-a", "lower-b/cam-b")
    async with split_lab() as (ns, session, servers):
        before = await run_call(session, servers, *pair, hold_s)
        ns.drop(LOSS)
        during = await run_call(session, servers, *pair, hold_s)
        dropped = ns.dropped()
    return {"injected": f"{LOSS:.0%} of UDP packets each way on lower-a - upper",
            "dropped_by_iptables": dropped, "ok": [before.ok, during.ok],
            "lost_pct_without": loss(before), "lost_pct_with": loss(during),
            "bottleneck_with": during.bottleneck}


async def capacity_gave_way() -> dict[str, Any]:
    """A capacity search of the upper server as a transit, without and with lower-b (on every
    call's path too) stopped on the duty cycle: which server gave way first."""
    settings = StackSettings(devices=10, video="packets", size="320x240", fps=15)
    out: dict[str, Any] = {"injected": f"lower-b stopped {STOPPED_S * 1000:g} ms of every "
                                       f"{PERIOD_S * 1000:g} ms; search: capacity --via upper"}
    for case in ("without", "with"):
        async with LocalStack(settings) as stack, aiohttp.ClientSession() as session:
            servers = await discover(session, stack.urls)
            slow = next(c for c in stack.servers if c.name == "lower-b")
            load = LoadSettings(rate=1, duration_s=3.0, hold_s=1.0, seed=5,
                                max_lag_ms=500, via="upper")
            async with ServerWatch(session, {s.name: s.url for s in servers},
                                   interval_s=None) as watch, \
                    (duty_cycle(slow.process.pid, STOPPED_S, PERIOD_S) if case == "with"
                     else contextlib.nullcontext()):
                found = await search(session, servers, load, Objective(),
                                     CapacitySettings(start_rate=1, max_rate=8, bisect_steps=0,
                                                      pause_s=0.3), watch=watch)
        capacity = found["upper"]
        out[case] = {"rate": capacity.rate, "failed_rate": capacity.failed_rate,
                     "failed_because": capacity.failed_because,
                     "gave_way": capacity.gave_way}
    return out


def table(out: dict[str, Any]) -> str:
    lines = []
    slow = out["slow_server"]
    lines += [f"slow server: {slow['injected']}",
              f"  {'hop':<34} {'without':>9} {'with':>9}  (latency part, ms, both ways)"]
    for hop, value in slow["latency_ms_with"].items():
        lines.append(f"  {hop:<34} {slow['latency_ms_without'].get(hop, 0.0):9.2f} "
                     f"{value:9.2f}")
    lines.append(f"  bottleneck: {slow['bottleneck_with']['latency_ms']}")
    lossy = out["lossy_link"]
    lines += ["", f"lossy link: {lossy['injected']} ({lossy['dropped_by_iptables']} packets "
                  "dropped)", f"  {'link, direction':<52} {'without':>8} {'with':>8}  (% lost)"]
    for name, value in lossy["lost_pct_with"].items():
        lines.append(f"  {name:<52} {lossy['lost_pct_without'].get(name, 0.0):7.2f}% "
                     f"{value:7.2f}%")
    lines.append(f"  bottleneck: {lossy['bottleneck_with']['lost']}")
    found = out["capacity"]
    lines += ["", f"capacity: {found['injected']}"]
    for case in ("without", "with"):
        one = found[case]
        lines.append(f"  {case} the fault: passed {one['rate']} calls/s, first failing "
                     f"{one['failed_rate']} ({'; '.join(one['failed_because'])})")
        lines.append(f"    {describe_gave_way(one['gave_way'])}")
        for server, seen in sorted(((one["gave_way"] or {}).get("at_failing_rate")
                                    or {}).items()):
            lines.append(f"    {server:<10} " + ", ".join(
                f"{k} {v:g}" if v is not None else f"{k} -" for k, v in seen.items()))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hold", type=float, default=5.0, help="seconds each call is up")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    setup_logging("faults", "warning")

    async def run() -> dict[str, Any]:
        return {"slow_server": await slow_server(args.hold),
                "lossy_link": await lossy_link(args.hold),
                "capacity": await capacity_gave_way()}

    out = asyncio.run(run())
    print(json.dumps(out) if args.json else table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
