"""``python -m probe call``: start calls between devices of two lower servers and time them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from probe.calls import CallResult, run_call, summarize, wait_idle
from probe.client import ProbeError, Server, discover, find_device, pick_pair
from relay.logs import setup_logging
from relay.messages import DIRECTIONS
from relay.stack import LocalStack, StackError, StackSettings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m probe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("call", help="one call (or --count sequential calls), timed")
    c.add_argument("caller", nargs="?", help="SERVER/DEVICE or DEVICE (default: first idle)")
    c.add_argument("callee", nargs="?", help="SERVER/DEVICE or DEVICE (default: first idle "
                                             "under another lower server)")
    c.add_argument("--server", action="append", default=None,
                   help="a server URL (repeatable); upper servers name their lower servers "
                        "(env PROBE_SERVERS, comma-separated)")
    c.add_argument("--local", action="store_true",
                   help="start a local stack (upper, lower-a, lower-b, devices) for this run")
    c.add_argument("--devices", type=int, default=1, help="with --local: devices per server")
    c.add_argument("--size", default="640x480", help="with --local: device picture size")
    c.add_argument("--count", type=int, default=1, help="sequential calls to make")
    c.add_argument("--hold", type=float, default=3.0, help="seconds to keep each call up")
    c.add_argument("--setup-timeout", type=float, default=20.0)
    c.add_argument("--json", action="store_true",
                   help="one JSON object per call (and a summary object after several)")
    c.add_argument("--log-level", default="warning")
    return p


@contextlib.asynccontextmanager
async def servers_for(args: argparse.Namespace) -> AsyncIterator[list[str]]:
    if args.local:
        settings = StackSettings(devices=args.devices, size=args.size)
        async with LocalStack(settings) as stack:
            if not args.json:
                names = ", ".join(f"{c.name} {c.url}" for c in stack.children if c.url)
                print(f"local stack: {names} (logs in {stack.log_dir})", flush=True)
            yield stack.urls
        return
    urls = args.server or [u for u in os.environ.get("PROBE_SERVERS", "").split(",") if u]
    if not urls:
        raise ProbeError("no_servers", "give --server URL (repeatable), PROBE_SERVERS, or --local")
    yield urls


def describe(result: CallResult) -> str:
    lines = [f"call {result.call or '-'}  {result.caller} -> {result.callee}  via {result.server}"
             f"  {'OK' if result.ok else 'FAILED'}  (ended: {result.reason})"]
    labels = {"response_ms": "response", "caller_woken_ms": "caller woken",
              "routed_ms": "routed by upper", "callee_woken_ms": "callee woken",
              "media_up_ms": "caller media at its server",
              "first_frame_callee_ms": "first frame at callee",
              "first_frame_caller_ms": "first frame at caller", "setup_ms": "setup (both ways)"}
    for name, value in result.intervals.items():
        lines.append(f"  {labels.get(name, name):<28} {value:9.1f} ms")
    for direction in DIRECTIONS:
        m = result.media.get(direction)
        if not m:
            lines.append(f"  {direction:<28} no media figures")
            continue
        p50, p95 = m.get("latency_ms_p50"), m.get("latency_ms_p95")
        lines.append(f"  {direction:<28} latency p50 {_ms(p50)} p95 {_ms(p95)}  "
                     f"{m['fps']:.1f} fps  {m['frames']} frames, {m['frames_lost']} lost, "
                     f"{m['gaps']} freezes  audio {m['audio_frames']} frames")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return f"{value:.1f} ms" if value is not None else "-"


def describe_summary(summary: dict[str, Any]) -> str:
    lines = [f"{summary['ok']} of {summary['calls']} calls carried media both ways"
             + (f"; failures: {summary['failures']}" if summary["failures"] else "")]
    for name, fig in summary["figures"].items():
        lines.append(f"  {name:<36} p50 {fig['p50']:9.1f}   max {fig['max']:9.1f}")
    return "\n".join(lines)


async def command_call(args: argparse.Namespace) -> int:
    results: list[CallResult] = []
    async with servers_for(args) as urls, aiohttp.ClientSession() as session:
        servers: list[Server] = await discover(session, urls)
        for i in range(args.count):
            if i:
                servers = await discover(session, urls)
            if args.caller and args.callee:
                caller, callee = args.caller, args.callee
            elif args.caller or args.callee:
                raise ProbeError("bad_arguments", "give both caller and callee, or neither")
            else:
                caller, callee = pick_pair(servers)
            result = await run_call(session, servers, caller, callee, args.hold,
                                    args.setup_timeout)
            results.append(result)
            print(json.dumps(result.to_dict()) if args.json else describe(result), flush=True)
            await wait_idle(session, servers,
                            [find_device(servers, caller)[1].address, result.callee])
    if args.count > 1:
        summary = summarize(results)
        print(json.dumps({"summary": summary}) if args.json else describe_summary(summary))
    return 0 if results and all(r.ok for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("probe", args.log_level)
    try:
        return asyncio.run(command_call(args))
    except (ProbeError, StackError) as exc:
        code = getattr(exc, "code", "stack_failed")
        print(f"probe: {code}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
