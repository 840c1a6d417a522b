"""Calls through a deeper tree against today's three servers, in one run: glass-to-glass latency
each way and command -> first frame at the callee, per call, for calls that cross the most
servers of each stack.

    .venv/bin/python benchmarks/tree.py [--calls 10] [--hold 3] [--json]

Stacks (each started, measured and stopped in turn, on loopback, synthetic devices 640x480@30):
- "three servers": upper, lower-a, lower-b; calls lower-a -> lower-b (3 servers on the path);
- "tree": root -> mid-1, mid-2 -> lower-a1, lower-a2, lower-b1, lower-b2; calls alternate
  lower-a1 -> lower-b1 and lower-b2 -> lower-a2 (5 servers on the path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.stack import LocalStack, StackSettings
from lab.topology import DEFAULT, parse
from probe.calls import run_call, wait_idle
from wire.client import discover
from wire.logs import setup_logging

TREE = parse({"name": "root", "children": [
    {"name": "mid-1", "children": [{"name": "lower-a1"}, {"name": "lower-a2"}]},
    {"name": "mid-2", "children": [{"name": "lower-b1"}, {"name": "lower-b2"}]}]})


async def measure(name: str, settings: StackSettings, pairs: list[tuple[str, str]], calls: int,
                  hold_s: float) -> dict[str, Any]:
    async with LocalStack(settings) as stack, aiohttp.ClientSession() as session:
        servers = await discover(session, stack.urls)
        devices = {s.name: s.devices[0].address for s in servers if s.devices}
        rows = []
        for i in range(calls + 1):  # the first call warms every process up: not counted
            a, b = pairs[i % len(pairs)]
            result = await run_call(session, servers, devices[a], devices[b], hold_s)
            await wait_idle(session, servers, [devices[a], devices[b]])
            if i == 0:
                continue
            media = result.media
            rows.append({
                "ok": result.ok, "path": result.path,
                "first_frame_callee_ms": result.intervals.get("first_frame_callee_ms"),
                "latency_ms_caller_to_callee": media.get("caller_to_callee", {}).get(
                    "latency_ms_p50"),
                "latency_ms_callee_to_caller": media.get("callee_to_caller", {}).get(
                    "latency_ms_p50")})
    figures: dict[str, Any] = {"stack": name, "calls": len(rows),
                               "ok": sum(r["ok"] for r in rows),
                               "servers_on_path": sorted({len(r["path"]) for r in rows})}
    for key in ("first_frame_callee_ms", "latency_ms_caller_to_callee",
                "latency_ms_callee_to_caller"):
        values = [r[key] for r in rows if r[key] is not None]
        figures[f"{key}_p50"] = round(statistics.median(values), 1) if values else None
        figures[f"{key}_max"] = round(max(values), 1) if values else None
    figures["per_call"] = rows
    return figures


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [
        await measure("three servers", StackSettings(devices=1, topology=DEFAULT),
                      [("lower-a", "lower-b")], args.calls, args.hold),
        await measure("tree", StackSettings(devices=1, topology=TREE),
                      [("lower-a1", "lower-b1"), ("lower-b2", "lower-a2")], args.calls,
                      args.hold),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--hold", type=float, default=3.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    setup_logging("benchmark", "warning")
    out = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{'stack':<15}{'servers':>8}{'ok':>6}{'first frame at callee p50':>27}"
          f"{'glass-to-glass p50 caller->callee':>35}{'callee->caller':>16}")
    for f in out:
        print(f"{f['stack']:<15}{'/'.join(map(str, f['servers_on_path'])):>8}"
              f"{f['ok']:>3}/{f['calls']:<2}{f['first_frame_callee_ms_p50']:>24} ms"
              f"{f['latency_ms_caller_to_callee_p50']:>32} ms"
              f"{f['latency_ms_callee_to_caller_p50']:>13} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
