"""Soak: calls at a steady rate on the local stack for a long time, and each server's memory,
open peer connections (legs) and asyncio tasks at the start and at the end.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--rate 1] [--hold 3] [--json]

The servers are scraped (/metrics) while idle before the load (baseline), at the end of the
warm-up (memory start), and idle again after the last call (end). Targets: memory growth from
the end of warm-up to the end < 5 %; no leg left; asyncio tasks and open files (peer connections'
UDP sockets among them) back to the baseline, give or take a few. Exit status 0 when every
server meets them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import aiohttp

from probe.client import discover
from probe.load import LoadSettings, run_load
from probe.scrape import parse, total
from relay.logs import setup_logging
from relay.stack import LocalStack, StackSettings

TASK_SLACK = 5
FD_SLACK = 4  #: open files and sockets back to the baseline give or take a connection or two


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as response:
        sample = parse(await response.text())
    memory = total(sample, "process_resident_memory_bytes") or 0.0
    return {"memory_mb": round(memory / 1e6, 2),
            "tasks": total(sample, "relay_asyncio_tasks") or 0.0,
            "legs": total(sample, "relay_legs") or 0.0,
            "calls": total(sample, "relay_calls") or 0.0,
            "fds": total(sample, "process_open_fds") or 0.0}


async def snapshot(session: aiohttp.ClientSession, servers: dict[str, str]) -> dict[str, Any]:
    return {name: await scrape(session, url) for name, url in servers.items()}


async def idle(session: aiohttp.ClientSession, servers: dict[str, str], timeout: float) -> None:
    """Wait until no server has a call or a leg (or the timeout)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        now = await snapshot(session, servers)
        if all(s["legs"] == 0 and s["calls"] == 0 for s in now.values()):
            return
        await asyncio.sleep(1)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    stack_settings = StackSettings(devices=args.devices, size=args.size, video="packets")
    # Scrapes close their connection (force_close) and the load's session is closed before the
    # end is read, so the servers' open files then are theirs alone: peer connections' UDP
    # sockets, the device and trunk WebSockets.
    async with LocalStack(stack_settings) as stack, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)) as scraper:
        async with aiohttp.ClientSession() as session:
            found = await discover(session, stack.urls)
        servers = {s.name: s.url for s in found}
        await asyncio.sleep(1)
        baseline = await snapshot(scraper, servers)
        duration = args.minutes * 60
        load = LoadSettings(rate=args.rate, duration_s=duration, hold_s=args.hold,
                            max_concurrent=args.devices * 2, seed=1)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            task = asyncio.create_task(run_load(session, found, load))
            await asyncio.sleep(min(args.warmup, duration / 2))
            start = await snapshot(scraper, servers)
            report = await task
        await idle(scraper, servers, 30)
        await asyncio.sleep(1)
        end = await snapshot(scraper, servers)
    total = report.recorder.total
    out: dict[str, Any] = {"minutes": args.minutes, "rate": args.rate, "calls": total.calls,
                           "calls_ok": total.ok, "failures": total.failures, "servers": {}}
    ok = True
    for name in servers:
        growth = (end[name]["memory_mb"] - start[name]["memory_mb"]) / start[name]["memory_mb"]
        leaked_tasks = end[name]["tasks"] - baseline[name]["tasks"]
        leaked_fds = end[name]["fds"] - baseline[name]["fds"]
        verdict = (growth < 0.05 and end[name]["legs"] == 0 and leaked_tasks <= TASK_SLACK
                   and leaked_fds <= FD_SLACK)
        ok = ok and verdict
        out["servers"][name] = {
            "memory_mb": {"baseline": baseline[name]["memory_mb"],
                          "after_warmup": start[name]["memory_mb"],
                          "end": end[name]["memory_mb"]},
            "memory_growth_pct": round(growth * 100, 2),
            "legs": {"baseline": baseline[name]["legs"], "after_warmup": start[name]["legs"],
                     "end": end[name]["legs"]},
            "tasks": {"baseline": baseline[name]["tasks"], "after_warmup": start[name]["tasks"],
                      "end": end[name]["tasks"]},
            "open_fds": {"baseline": baseline[name]["fds"], "after_warmup": start[name]["fds"],
                         "end": end[name]["fds"]},
            "ok": verdict}
    out["ok"] = ok and total.calls > 0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=1.0, help="calls started per second")
    parser.add_argument("--hold", type=float, default=3.0)
    parser.add_argument("--devices", type=int, default=10, help="per lower server")
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--warmup", type=float, default=180.0,
                        help="seconds before memory is first read (longer than the servers' "
                             "2-minute retention of ended calls, so that it is full)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    setup_logging("soak", "error")
    out = asyncio.run(run(args))
    if args.json:
        print(json.dumps(out))
    else:
        verdict = "PASS" if out["ok"] else "FAIL"
        print(f"{verdict}: {out['calls']} calls in {args.minutes:g} min, {out['calls_ok']} ok, "
              f"failures {out['failures'] or 'none'}")
        for name, s in out["servers"].items():
            print(f"  {name}: memory {s['memory_mb']['after_warmup']} -> {s['memory_mb']['end']}"
                  f" MB ({s['memory_growth_pct']:+.2f} %), legs {s['legs']['baseline']:g} -> "
                  f"{s['legs']['end']:g}, tasks {s['tasks']['baseline']:g} -> "
                  f"{s['tasks']['end']:g}, open files {s['open_fds']['baseline']:g} -> "
                  f"{s['open_fds']['end']:g}  {'ok' if s['ok'] else 'FAIL'}")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
