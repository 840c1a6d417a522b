"""Forwarding benchmark: the same N streams with no relay, through a transcoding relay, and
through this project's forwarding relay, measured in one run on this machine (127.0.0.1).

    .venv/bin/python benchmarks/forwarding.py [--streams 4] [--seconds 15] [--json]

A stream is one direction of a call: 640x480 at 30 fps, ~1 Mbit/s VP8 (a pre-encoded loop, so
the load side spends no CPU encoding) plus Opus audio. Calls are between two devices of one
lower server, so each stream crosses the relay once (one hop). Modes:

- direct: the devices call each other peer to peer (no relay): the baseline latency;
- transcode: through a lower server run with ``--media-mode transcode``, which decodes and
  re-encodes every stream (aiortc's MediaRelay, what a simple relay does);
- forward: through a lower server forwarding encoded packets (the default).

Per mode: relay CPU (% of one core) per stream, read from /proc over the measuring window;
added latency per hop p50/p95 (the mode's glass-to-glass percentile minus the direct one's);
fps delivered per stream; frames lost in the window. Then the ratio of transcode to forward CPU.

``--hop-rounds N`` and ``--cc-rounds N`` price two server features that are on by default, the
per-hop figures and congestion control: the packet streams forwarded with the feature and
without, N times each, alternated; the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from hdrh.histogram import HdrHistogram

from endpoint.device import Device, DeviceCall, DeviceSettings, MediaSupply
from endpoint.meter import LATENCY_MAX_US
from rtc.adapter import MediaSettings
from wire.logs import setup_logging
from wire.messages import Offer

MODES = ("direct", "transcode", "forward")
LOOPBACK = MediaSettings(addresses=("127.0.0.1",))
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


@dataclass
class Window:
    """Figures of the receiving meters over the measuring window."""

    latency: HdrHistogram
    frames: int
    lost: int


def open_window(calls: list[DeviceCall]) -> dict[int, tuple[int, int]]:
    start = {}
    for call in calls:
        call.video.latency_us.reset()
        start[id(call)] = (call.video.frames, call.video.lost)
    return start


def close_window(calls: list[DeviceCall], start: dict[int, tuple[int, int]]) -> Window:
    merged = HdrHistogram(1, LATENCY_MAX_US, 3)
    frames = lost = 0
    for call in calls:
        merged.add(call.video.latency_us)
        frames += call.video.frames - start[id(call)][0]
        lost += call.video.lost - start[id(call)][1]
    return Window(merged, frames, lost)


@contextlib.asynccontextmanager
async def relay_server(mode: str, options: tuple[str, ...] = ()
                       ) -> AsyncIterator[tuple[str, int]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "lower", "--name", "bench", "--media-mode", mode,
        "--media-address", "127.0.0.1", "--log-level", "warning", *options,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        yield json.loads(line)["url"], process.pid
    finally:
        process.terminate()
        await process.wait()


async def through_relay(mode: str, pairs: int, settings: DeviceSettings, supply: MediaSupply,
                        warmup: float, seconds: float, options: tuple[str, ...] = ()
                        ) -> dict[str, Any]:
    async with relay_server(mode, options) as (url, pid), \
            aiohttp.ClientSession() as session:
        devices = [Device(url, f"d{i}", settings, supply=supply) for i in range(2 * pairs)]
        tasks = [asyncio.create_task(d.run(session)) for d in devices]
        try:
            await asyncio.wait_for(asyncio.gather(*(d.registered.wait() for d in devices)), 20)
            call_ids = []
            for i in range(pairs):
                async with session.post(f"{url}/v1/calls", json={
                        "caller": f"bench/d{2 * i}", "callee": f"bench/d{2 * i + 1}"}) as r:
                    call_ids.append((await r.json())["call"])
            for call_id in call_ids:
                async with session.get(f"{url}/v1/calls/{call_id}?wait=active&timeout=20") as r:
                    state = (await r.json())["state"]
                    if state != "active":
                        raise RuntimeError(f"{mode}: call {call_id} is {state}, not active")
            await asyncio.sleep(warmup)
            calls = [c for d in devices for c in d.calls.values()]
            start = open_window(calls)
            before = await forwarding_counts(session, url)
            relay_cpu, load_cpu = cpu_seconds(pid), time.process_time()
            began = time.monotonic()
            await asyncio.sleep(seconds)
            elapsed = time.monotonic() - began
            user, system = (b - a for a, b in zip(relay_cpu, cpu_seconds(pid), strict=True))
            load_cpu = time.process_time() - load_cpu
            window = close_window(calls, start)
            after = await forwarding_counts(session, url)
            for call_id in call_ids:
                async with session.delete(f"{url}/v1/calls/{call_id}"):
                    pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(d.close() for d in devices))
    out = figures(window, 2 * pairs, elapsed, user + system, load_cpu,
                  transcoding=after["transcoded_total"])
    # in the relay's own code (Python, SRTP) and in the kernel (its sockets)
    out["relay_user_pct"] = round(user / elapsed * 100, 2)
    out["relay_system_pct"] = round(system / elapsed * 100, 2)
    # what the relay did besides forwarding, a second per stream over the measured window
    out["per_stream_s"] = {key: round((after[key] - before[key]) / elapsed / (2 * pairs), 2)
                           for key in PER_STREAM_COUNTS}
    return out


#: the relay's counters (its /healthz "forwarding") that a run reports a second per stream
PER_STREAM_COUNTS = ("packets", "fast_path_packets", "nacks_sent", "retransmissions",
                     "keyframe_requests_up", "rembs_received", "rembs_sent")


async def forwarding_counts(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with session.get(f"{url}/healthz") as r:
        return (await r.json())["forwarding"]


async def direct(pairs: int, settings: DeviceSettings, supply: MediaSupply, warmup: float,
                 seconds: float) -> dict[str, Any]:
    calls: list[DeviceCall] = []
    try:
        for i in range(pairs):
            a = DeviceCall(f"c{i}", "caller", f"b{i}", settings, None, time.time, f"a{i}", supply)
            b = DeviceCall(f"c{i}", "callee", f"a{i}", settings, None, time.time, f"b{i}", supply)
            calls += [a, b]
            sdp = await a.offer()
            await a.accept(await b.answer(Offer(call=f"c{i}", leg=f"c{i}", sdp=sdp)))
        await asyncio.sleep(warmup)
        start = open_window(calls)
        load_cpu = time.process_time()
        began = time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - began
        window = close_window(calls, start)
        load_cpu = time.process_time() - load_cpu
    finally:
        await asyncio.gather(*(c.close() for c in calls), return_exceptions=True)
    return figures(window, 2 * pairs, elapsed, 0.0, load_cpu, transcoding=0)


def figures(window: Window, streams: int, elapsed: float, relay_cpu: float, load_cpu: float,
            transcoding: int) -> dict[str, Any]:
    has = window.latency.get_total_count() > 0
    return {
        "streams": streams,
        "relay_cpu_pct": round(relay_cpu / elapsed * 100, 2),
        "cpu_pct_per_stream": round(relay_cpu / elapsed * 100 / streams, 3),
        "load_cpu_pct": round(load_cpu / elapsed * 100, 1),
        "latency_ms_p50": window.latency.get_value_at_percentile(50) / 1000 if has else None,
        "latency_ms_p95": window.latency.get_value_at_percentile(95) / 1000 if has else None,
        "fps": round(window.frames / elapsed / streams, 2),
        "frames_lost": window.lost,
        "transcoded_tracks": transcoding,
    }


def added_latency(out: dict[str, Any]) -> None:
    """Each mode's latency percentiles minus the direct run's: what the relay hop adds."""
    base = out["direct"]
    for mode in MODES:
        if mode not in out:
            continue
        m = out[mode]
        for p in ("p50", "p95"):
            mine, theirs = m[f"latency_ms_{p}"], base[f"latency_ms_{p}"]
            m[f"added_latency_ms_{p}"] = (round(mine - theirs, 3)
                                          if mine is not None and theirs is not None else None)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    width, height = (int(v) for v in args.size.split("x"))
    settings = DeviceSettings(width=width, height=height, fps=args.fps, media=LOOPBACK,
                              video="preencoded", stats_interval_s=1.0)
    supply = MediaSupply.for_settings(settings)
    pairs = args.streams // 2
    out: dict[str, Any] = {"streams": 2 * pairs, "seconds": args.seconds, "size": args.size,
                           "fps": args.fps}
    if args.streams:
        out["direct"] = await direct(pairs, settings, supply, args.warmup, args.seconds)
        for mode in ("transcode", "forward"):
            if mode in args.modes:
                out[mode] = await through_relay(mode, pairs, replace(settings), supply,
                                                args.warmup, args.seconds)
        added_latency(out)
    if args.scale_streams:
        # Many streams, sent as ready packets and counted without decoding (endpoint/packets.py),
        # so the load side stays light: the relay's cost per stream once fixed costs are shared.
        packets = replace(settings, video="packets")
        supply = MediaSupply.for_settings(packets)
        scale: dict[str, Any] = {"streams": args.scale_streams}
        scale["direct"] = await direct(args.scale_streams // 2, packets, supply, args.warmup,
                                       args.seconds)
        scale["forward"] = await through_relay("forward", args.scale_streams // 2, packets,
                                               supply, args.warmup, args.seconds)
        added_latency(scale)
        out["forward_at_scale"] = scale
    if args.hop_rounds:
        out["hop_figures_cost"] = await option_cost(args, settings, args.hop_rounds,
                                                    ("--no-hop-figures",))
    if args.cc_rounds:
        out["congestion_control_cost"] = await option_cost(
            args, settings, args.cc_rounds, ("--congestion-control", "off"))
    if "transcode" in out and "forward" in out and out["forward"]["cpu_pct_per_stream"]:
        out["transcode_to_forward_cpu_ratio"] = round(
            out["transcode"]["cpu_pct_per_stream"] / out["forward"]["cpu_pct_per_stream"], 1)
    return out


async def option_cost(args: argparse.Namespace, settings: DeviceSettings, rounds: int,
                      off: tuple[str, ...]) -> dict[str, Any]:
    """The price of a server feature on by default (the per-hop figures, congestion control):
    forwarding packet streams with it and without (the server options ``off``), ``rounds``
    times each, in ABBA order so drift in the machine's load falls on both; the medians of the
    runs each way. The packet devices write abs-send-time as aiortc's senders do, so the servers'
    bandwidth estimators run on every video packet."""
    packets = replace(settings, video="packets")
    supply = MediaSupply.for_settings(packets)
    pairs = max(1, args.scale_streams // 2)
    cpu: dict[bool, list[float]] = {True: [], False: []}
    counts: dict[bool, dict[str, float]] = {}
    split: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for i in range(rounds):
        # ABBA: each way goes first in half the rounds, so drift within a round (the
        # machine's own load, warming caches) falls on both alike
        for measured in ((False, True) if i % 2 == 0 else (True, False)):
            run = await through_relay("forward", pairs, packets, supply, args.warmup,
                                      args.seconds, () if measured else off)
            cpu[measured].append(run["cpu_pct_per_stream"])
            split[measured].append((run["relay_user_pct"], run["relay_system_pct"]))
            counts[measured] = run["per_stream_s"]
    # medians: one run disturbed by the machine moves a mean more than the feature does
    on, off_cpu = (statistics.median(cpu[m]) for m in (True, False))
    return {"streams": 2 * pairs, "rounds": rounds, "off": " ".join(off),
            "cpu_pct_per_stream_with": round(on, 3),
            "cpu_pct_per_stream_without": round(off_cpu, 3),
            "added_pct": round((on / off_cpu - 1) * 100, 1) if off_cpu else None,
            "runs_with": cpu[True], "runs_without": cpu[False],
            # each run's relay CPU (% of a core, all streams) in user and in system time
            "user_system_with": split[True], "user_system_without": split[False],
            # the last run's relay counters each way, a second per stream
            "per_stream_s_with": counts.get(True), "per_stream_s_without": counts.get(False)}


def table(out: dict[str, Any]) -> str:
    lines = []
    if "direct" in out:
        lines += [f"{out['streams']} streams of {out['size']}@{out['fps']:g} (~1 Mbit/s VP8 + "
                  f"Opus), decoded and stamp-read at the receivers, {out['seconds']:g} s "
                  f"measured per mode, one relay hop", *_rows(out)]
        if "transcode_to_forward_cpu_ratio" in out:
            lines.append(f"transcode / forward relay CPU per stream: "
                         f"{out['transcode_to_forward_cpu_ratio']}x")
    if "forward_at_scale" in out:
        scale = out["forward_at_scale"]
        lines += ["", f"{scale['streams']} streams of the same media sent as ready RTP packets "
                      f"and counted without decoding (latency: frame's first packet sent -> "
                      f"last packet received)", *_rows(scale)]
    for key, what, target in (("hop_figures_cost", "per-hop figures' cost", "at most +5 %"),
                              ("congestion_control_cost", "congestion control's cost",
                               "within the runs' noise")):
        if key in out:
            cost = out[key]
            lines += ["", f"{what}, {cost['streams']} packet streams, "
                          f"{cost['rounds']} rounds each way: relay CPU per stream "
                          f"{cost['cpu_pct_per_stream_without']:.3f} % without, "
                          f"{cost['cpu_pct_per_stream_with']:.3f} % with: "
                          f"{cost['added_pct']:+.1f} % (target: {target}; runs without "
                          f"{_spread(cost['runs_without'])}, with {_spread(cost['runs_with'])})"]
    return "\n".join(lines)


def _rows(out: dict[str, Any]) -> list[str]:
    lines = [f"{'mode':<10} {'relay CPU/stream':>17} {'added p50':>10} {'added p95':>10} "
             f"{'latency p50':>12} {'fps':>6} {'lost':>5}"]
    for mode in MODES:
        if mode not in out:
            continue
        m = out[mode]
        lines.append(
            f"{mode:<10} {m['cpu_pct_per_stream']:>15.2f} % {_ms(m['added_latency_ms_p50']):>10} "
            f"{_ms(m['added_latency_ms_p95']):>10} {_ms(m['latency_ms_p50']):>12} "
            f"{m['fps']:>6.1f} {m['frames_lost']:>5}")
    return lines


def _spread(runs: list[float]) -> str:
    return f"{min(runs):.3f}-{max(runs):.3f}" if runs else "-"


def _ms(value: float | None) -> str:
    return f"{value:.2f} ms" if value is not None else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=4,
                        help="streams (two per call) of the decoded comparison; 0 skips it")
    parser.add_argument("--scale-streams", type=int, default=32,
                        help="streams of the packet-level forwarding run at scale; 0 skips it")
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring window per mode")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--hop-rounds", type=int, default=4,
                        help="price the per-hop figures: forward with and without them this "
                             "many times each, alternated (0: skip)")
    parser.add_argument("--cc-rounds", type=int, default=0,
                        help="price congestion control: forward with and without it (servers' "
                             "--congestion-control off) this many times each (0: skip)")
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--modes", default=",".join(MODES),
                        help="which of direct,transcode,forward (direct always runs: it is the "
                             "latency baseline)")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args()
    if args.streams < 0 or args.streams % 2 or args.scale_streams < 0 or args.scale_streams % 2:
        parser.error("--streams and --scale-streams must be even numbers (0 skips)")
    args.modes = {m.strip() for m in args.modes.split(",")}
    if not args.modes <= set(MODES):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    setup_logging("benchmark", "error")
    out = asyncio.run(run(args))
    print(json.dumps(out) if args.json else table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
