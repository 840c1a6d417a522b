"""``python -m probe``: time calls between devices of the servers given.

- ``call``: one call (or --count sequential calls), each phase timed;
- ``load``: calls started open-loop at a fixed or Poisson rate, figures per server;
- ``capacity``: per lower server, the highest rate that meets an objective;
- ``merge``: several probes' output directories merged into one report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from lab.stack import LocalStack, StackError, StackSettings
from lab.topology import DEFAULT, TopologyError
from lab.topology import load as load_topology
from probe.bottleneck import describe as describe_hops
from probe.calls import CallResult, run_call, summarize, wait_idle
from probe.capacity import CapacitySettings, GiveWay, Step, describe_gave_way, search
from probe.fleet import FLEET_PORT, Follower, follow, leading
from probe.load import PAIRING_MODES, LoadReport, LoadSettings, Shard, run_load
from probe.nemesis import (
    DockerTarget,
    Fault,
    FaultError,
    LocalTarget,
    PlanError,
    Target,
    load_plan,
    seconds,
)
from probe.objective import RUN, Objective
from probe.report import CallLog, write_summary
from probe.scrape import ServerWatch
from probe.scrape import describe as describe_server_metrics
from probe.scrape import parse as parse_metrics
from probe.soak import Soak, SoakSettings, describe_stability, dump, print_line
from probe.stability import StabilitySettings
from probe.stats import Recorder
from probe.summary import build as build_summary
from probe.summary import merge as merge_summaries
from wire.client import ProbeError, Server, discover, find_device, pick_pair
from wire.credentials import Credentials
from wire.logs import setup_logging
from wire.loops import event_loop_factory
from wire.messages import DIRECTIONS
from wire.scenario import Scenario


def _common(c: argparse.ArgumentParser, devices: int, video: str, sample: float = 0.0) -> None:
    c.add_argument("--server", action="append", default=None,
                   help="a server URL (repeatable): any server of the tree; the probe finds "
                        "the rest (env PROBE_SERVERS, comma-separated)")
    c.add_argument("--trust-announced", action="store_true",
                   help="show the probe's token (PROBE_TOKEN) to servers found at the URLs the "
                        "tree announced, not only to those given (with the secret in the "
                        "environment each gets a token of its own anyway)")
    c.add_argument("--local", action="store_true",
                   help="start a local stack (upper, lower-a, lower-b, devices; or --topology) "
                        "for this run")
    c.add_argument("--topology", type=Path, default=None, metavar="FILE",
                   help="with --local: the tree's shape (JSON, as `relay stack --topology`)")
    c.add_argument("--via", default=None, metavar="SERVER",
                   help="only calls whose path crosses SERVER (capacity: the rate SERVER "
                        "sustains as a transit)")
    c.add_argument("--devices", type=int, default=devices,
                   help="with --local: devices per lower server")
    c.add_argument("--size", default="640x480", help="with --local: device picture size")
    c.add_argument("--video", default=video, choices=["synthetic", "preencoded", "packets"],
                   help="with --local: device video (see docs/endpoint.md)")
    c.add_argument("--hold", type=float, default=3.0, help="seconds to keep each call up")
    c.add_argument("--sample", type=float, default=sample,
                   metavar="S", help="read each call this often while it is up: per direction "
                                     "the video sent, the rate allowed, frames and latency "
                                     "(`series`; 0: off; default on for `call`)")
    c.add_argument("--setup-timeout", type=float, default=20.0)
    c.add_argument("--json", action="store_true", help="JSON output on stdout")
    c.add_argument("--log-level", default="warning")
    c.add_argument("--scrape-interval", type=float, default=5.0, metavar="S",
                   help="read every server's /metrics this often during the run (CPU, "
                        "memory, legs, loop lag, counters); 0: only at the start and end")


def _load_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("--duration", type=_duration, default=30.0,
                   help="how long calls are started: seconds, or with a unit (90s, 45m, 8h)")
    c.add_argument("--poisson", action="store_true", help="exponential gaps (same mean rate)")
    c.add_argument("--max-concurrent", type=int, default=100,
                   help="calls up at once at most; a start past it is skipped and counted")
    c.add_argument("--scenario", type=Path, default=None, metavar="FILE",
                   help="what each call does, step by step (JSON or TOML: dial, ring, answer "
                        "or decline, hold, hang up from either side; docs/probe.md); default: "
                        "answered at once, held --hold s, hung up by the probe")
    c.add_argument("--pairing", default="random", choices=list(PAIRING_MODES))
    c.add_argument("--pair", action="append", default=None, metavar="CALLER:CALLEE",
                   help="with --pairing explicit (repeatable)")
    c.add_argument("--media", default="full", choices=["full", "none"],
                   help="none: signalling only (devices woken, no media legs)")
    c.add_argument("--window", type=float, default=5.0, help="time-series window, seconds")
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--request-timeout", type=float, default=10.0,
                   help="seconds a command may go unanswered before it counts as a timeout")
    c.add_argument("--late-ms", type=float, default=10.0,
                   help="a start later than this after its schedule counts as late")
    c.add_argument("--max-lag-ms", type=float, default=50.0,
                   help="the probe's own loop lag p99 above this makes a run invalid")
    c.add_argument("--out", type=Path,
                   default=Path(os.environ["PROBE_OUT"]) if os.environ.get("PROBE_OUT") else None,
                   help="directory for calls.jsonl, summary.json, timeseries.csv, report.html "
                        "(env PROBE_OUT)")
    o = Objective()
    c.add_argument("--min-success", type=float, default=o.min_success_rate)
    c.add_argument("--max-response-p95", type=_limit, default=o.max_response_p95_ms,
                   metavar="MS", help="'none' to not check")
    c.add_argument("--max-setup-p95", type=_limit, default=o.max_setup_p95_ms, metavar="MS")
    c.add_argument("--max-media-latency-p95", type=_limit, default=o.max_media_latency_p95_ms,
                   metavar="MS")
    c.add_argument("--max-loss", type=_limit, default=o.max_frame_loss,
                   help="frames lost / frames sent")
    c.add_argument("--max-freeze-ratio", type=_limit, default=o.max_freeze_ratio,
                   help="freezes / frames received")
    c.add_argument("--min-psnr", type=_limit, default=o.min_psnr, metavar="DB",
                   help="the 5th percentile of the call directions' PSNR against the source "
                        "(synthetic pictures)")
    c.add_argument("--min-mos", type=_limit, default=o.min_mos, metavar="MOS",
                   help="the 5th percentile of the call directions' MOS (E-model, from the "
                        "synthetic tone's timing marks)")
    c.add_argument("--max-av-sync-ms", type=_limit, default=o.max_av_sync_ms, metavar="MS",
                   help="the 95th percentile of the call directions' lip-sync skew, either "
                        "side")


def _duration(text: str) -> float:
    try:
        return seconds(text)
    except PlanError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _limit(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("call", help="one call (or --count sequential calls), timed")
    c.add_argument("caller", nargs="?", help="SERVER/DEVICE or DEVICE (default: first idle)")
    c.add_argument("callee", nargs="?", help="SERVER/DEVICE or DEVICE (default: first idle "
                                             "under another lower server)")
    _common(c, devices=1, video="synthetic", sample=1.0)
    c.add_argument("--count", type=int, default=1, help="sequential calls to make")
    c.add_argument("--scenario", type=Path, default=None, metavar="FILE",
                   help="what each call does (as for load: docs/probe.md); its hold replaces "
                        "--hold")
    load = sub.add_parser("load", help="open-loop load at a rate, figures per server")
    load.add_argument("--rate", type=float, required=True, help="calls started per second")
    _common(load, devices=10, video="packets")
    _load_args(load)
    _shard_arg(load, "`probe merge` adds their outputs up")
    load.add_argument("--start-at", type=float, metavar="UNIX_TIME",
                      default=float(os.environ["PROBE_START_AT"])
                      if os.environ.get("PROBE_START_AT") else None,
                      help="start the schedule then (shards of one load: the same for all; "
                           "default for a shard: the next wall-clock multiple of 10 s at least "
                           "2 s away)")
    cap = sub.add_parser("capacity", help="per lower server, the highest rate meeting the "
                                          "objective (step up, then bisect)")
    _common(cap, devices=10, video="packets")
    _load_args(cap)
    cap.set_defaults(duration=10.0)
    cap.add_argument("--start-rate", type=float, default=1.0)
    cap.add_argument("--factor", type=float, default=2.0, help="rate multiplier per step")
    cap.add_argument("--max-rate", type=float, default=1000.0)
    cap.add_argument("--bisect", type=int, default=3, help="bisection steps after a failure")
    _shard_arg(cap, "shard 0 leads the search: it orders every step and judges the merged "
                    "calls (probe/fleet.py); the others follow --leader")
    cap.add_argument("--fleet-listen", default=os.environ.get("PROBE_FLEET_LISTEN",
                                                              f"0.0.0.0:{FLEET_PORT}"),
                     metavar="HOST:PORT", help="shard 0 of several: where the followers reach "
                                               "it (env PROBE_FLEET_LISTEN)")
    cap.add_argument("--leader", default=None, metavar="URL",
                     help="shard 1..N-1: shard 0's --fleet-listen address, e.g. "
                          f"http://probe-0:{FLEET_PORT} (env PROBE_LEADER, which shard 0 "
                          "ignores, so one environment serves every shard)")
    cap.add_argument("--leader-wait", type=float, default=120.0, metavar="S",
                     help="how long the leader waits for every shard to come, and a follower "
                          "for a leader it cannot reach")
    cap.add_argument("--fleet-grace", type=float, default=None, metavar="S",
                     help="the leader: how long after its own shard of a step it waits for the "
                          "others' results before the step is invalid (default: hold + setup "
                          "timeout + 35 s)")
    limits = GiveWay()
    cap.add_argument("--give-way-transit-p99", type=float, default=limits.transit_p99_ms,
                     metavar="MS", help="a server gave way when its calls' transit p99 is past "
                                        "this")
    cap.add_argument("--give-way-loop-lag", type=float, default=limits.loop_lag_p99_ms,
                     metavar="MS", help="... or its event-loop lag p99 (from /metrics)")
    cap.add_argument("--give-way-cpu", type=float, default=limits.cpu_pct, metavar="PCT",
                     help="... or its CPU, %% of one core (from /metrics)")
    cap.add_argument("--give-way-loss", type=float, default=limits.loss_in, metavar="F",
                     help="... or the share of the video sent to it lost on the way")
    soak = sub.add_parser(
        "soak", help="open-loop load for hours, faults on a schedule, each server judged on "
                     "its stability (trends, leaks, restarts, recovery, invariants)")
    soak.add_argument("--rate", type=float, default=None,
                      help="calls started per second (or --at with --capacity)")
    _common(soak, devices=10, video="packets")
    _load_args(soak)
    soak.set_defaults(duration=3600.0, window=30.0, scrape_interval=2.0, max_concurrent=100)
    soak.add_argument("--capacity", type=Path, default=None, metavar="FILE",
                      help="a capacity search's summary.json: the rate is --at of the least "
                           "sustainable rate it found")
    soak.add_argument("--at", type=float, default=None, metavar="FRACTION",
                      help="with --capacity: the share of the sustainable rate to run at")
    soak.add_argument("--warmup", type=_duration, default=None, metavar="DURATION",
                      help="resource trends are judged from this long after the start (and "
                           "after each restart); default: the servers' ended-call retention "
                           "(/metrics) plus 60 s, at least 120 s")
    soak.add_argument("--faults", type=Path, default=None, metavar="PLAN.json",
                      help="faults to make on a schedule (docs/probe.md): on the --local "
                           "stack, or on a compose lab with --compose-project")
    soak.add_argument("--compose-project", default=os.environ.get("PROBE_COMPOSE_PROJECT"),
                      metavar="NAME", help="make the plan's faults on this compose project's "
                                           "containers (Docker Engine API; env "
                                           "PROBE_COMPOSE_PROJECT)")
    soak.add_argument("--docker-socket", default="/var/run/docker.sock", metavar="PATH")
    soak.add_argument("--isolate", action="append", default=[], metavar="LOWER",
                      help="with --local: run this lower server and its devices in a network "
                           "namespace of its own, so a plan can cut or slow its link (root)")
    soak.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                      help="with --local: one more argument for every server (repeatable)")
    soak.add_argument("--max-recovery", type=_duration, default=60.0, metavar="DURATION",
                      help="a server slower than this to recover from an incident is "
                           "unstable")
    soak.add_argument("--no-end-check", action="store_true",
                      help="do not ask every server of each call's path how it ended there")
    soak.add_argument("--idle-timeout", type=_duration, default=60.0, metavar="DURATION",
                      help="how long the checks at the end wait for the tree to settle")
    merge = sub.add_parser("merge", help="merge probes' --out directories into one report")
    merge.add_argument("dirs", nargs="+", type=Path)
    merge.add_argument("--out", type=Path, required=True)
    merge.add_argument("--json", action="store_true")
    merge.add_argument("--log-level", default="warning")
    return p


@contextlib.asynccontextmanager
async def servers_for(args: argparse.Namespace) -> AsyncIterator[list[str]]:
    async with stack_for(args) as (urls, _):
        yield urls


@contextlib.asynccontextmanager
async def stack_for(args: argparse.Namespace
                    ) -> AsyncIterator[tuple[list[str], LocalStack | None]]:
    """The servers' URLs: those given, or a local stack's (started here, and yielded too)."""
    if args.local:
        try:
            topology = load_topology(args.topology) if args.topology else DEFAULT
            settings = StackSettings(devices=args.devices, size=args.size, video=args.video,
                                     topology=topology,
                                     isolate=tuple(getattr(args, "isolate", None) or ()),
                                     server_args=tuple(getattr(args, "server_arg", None)
                                                       or ()))
        except (TopologyError, ValueError) as exc:
            raise ProbeError("bad_arguments", str(exc)) from None
        async with LocalStack(settings) as stack:
            if not args.json:
                names = ", ".join(f"{c.name} {c.url}" for c in stack.servers if c.url)
                print(f"local stack: {names} (logs in {stack.log_dir})", flush=True)
            yield stack.urls, stack
        return
    if args.topology:
        raise ProbeError("bad_arguments", "--topology goes with --local")
    urls = args.server or [u for u in os.environ.get("PROBE_SERVERS", "").split(",") if u]
    if not urls:
        raise ProbeError("no_servers", "give --server URL (repeatable), PROBE_SERVERS, or --local")
    yield urls, None


def describe_audio(m: dict[str, Any]) -> str:
    """A direction's audio on one line: latency, losses, lip sync, the call score."""
    marks = m.get("audio_marks", 0) + m.get("audio_marks_lost", 0)
    text = (f"audio latency p50 {_ms(m['audio_latency_ms_p50'])} "
            f"p95 {_ms(m.get('audio_latency_ms_p95'))}  "
            f"{m.get('audio_frames_lost', 0)} frames lost, "
            f"{m.get('audio_marks_lost', 0)} of {marks} marks lost")
    skew = m.get("av_sync_ms")
    if skew is not None:
        side = "sound after picture" if skew >= 0 else "sound before picture"
        text += f"  lip sync {skew:+.0f} ms ({side})"
    if m.get("mos") is not None:
        text += f"  MOS {m['mos']:.2f}"
    return text


def describe(result: CallResult) -> str:
    lines = [f"call {result.call or '-'}  {result.caller} -> {result.callee}  via {result.server}"
             f"  {'OK' if result.ok else 'FAILED'}  (ended: {result.reason})"]
    if result.path:
        lines.append(f"  path: {' -> '.join(result.path)}")
    labels = {"response_ms": "response", "caller_woken_ms": "caller woken",
              "routed_ms": "routed to callee's server", "callee_woken_ms": "callee woken (rung)",
              "answered_ms": "callee answered",
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
                     f"{m['gaps']} freezes"
                     + (f" ({m['gaps_source']} the sender's)" if m.get("gaps_source") else "")
                     + f"  audio {m['audio_frames']} frames"
                     + (f"  PSNR {m['psnr_db']:.1f} dB SSIM {m['ssim']:.3f}"
                        if m.get("psnr_db") is not None and m.get("ssim") is not None else ""))
        if m.get("audio_latency_ms_p50") is not None:
            lines.append(f"  {'':<28} " + describe_audio(m))
    if result.links:
        lines.append("  hops (video, both directions: devices' own parts, server transit, "
                     "link RTT/2 est.; means):")
        lines += describe_hops(result.hops, result.links, result.media, result.senders)
        for direction, split in result.latency_parts.items():
            if split["sum_ms"] is not None and split["glass_to_glass_ms"] is not None:
                lines.append(f"    {direction}: parts add up to {split['sum_ms']:.1f} ms of "
                             f"{split['glass_to_glass_ms']:.1f} ms glass-to-glass")
    lines += describe_rate(result)
    return "\n".join(lines)


def describe_rate(result: CallResult) -> list[str]:
    """Per direction, the rate the path allowed, which link set it, and whether the sender
    followed (congestion control: docs/relay.md)."""
    lines = []
    cannot = result.not_adapting_why
    for direction in result.directions:
        sender = result.senders.get(direction) or {}
        limit = result.rate.get(direction)
        if direction in cannot:
            lines.append(f"  {direction:<28} rate: the sender cannot adapt ({cannot[direction]})"
                         ": the path's reports go unheard")
        elif limit is not None:
            target = sender.get("target_kbps")
            by = (f"set by {limit['link']}" if limit["link"] is not None
                  else "no link holds it back yet (the estimates are still rising)")
            lines.append(f"  {direction:<28} rate: {limit['kbps']:.0f} kbit/s allowed, {by}; "
                         "the encoder's target "
                         + (f"{target:.0f} kbit/s" if target is not None else "unknown"))
    return lines


def _ms(value: float | None) -> str:
    return f"{value:.1f} ms" if value is not None else "-"


def describe_summary(summary: dict[str, Any]) -> str:
    declined = summary.get("declined", 0)
    lines = [f"{summary['ok'] - declined} of {summary['calls']} calls carried media both ways"
             + (f"; {declined} declined as their scenario said" if declined else "")
             + (f"; failures: {summary['failures']}" if summary["failures"] else "")]
    for name, fig in summary["figures"].items():
        digits = 2 if name.startswith("mos") else 1
        lines.append(f"  {name:<36} p50 {fig['p50']:9.{digits}f}   min {fig['min']:9.{digits}f}"
                     f"   max {fig['max']:9.{digits}f}")
    return "\n".join(lines)


def watch_servers(session: aiohttp.ClientSession, servers: list[Server],
                  args: argparse.Namespace) -> ServerWatch:
    return ServerWatch(session, {s.name: s.url for s in servers},
                       interval_s=args.scrape_interval if args.scrape_interval > 0 else None)


async def command_call(args: argparse.Namespace) -> int:
    results: list[CallResult] = []
    async with servers_for(args) as urls, probe_session(args, urls) as (session, credentials):
        servers: list[Server] = await discover(session, urls, credentials)
        async with watch_servers(session, servers, args) as watch:
            await _calls(args, session, urls, servers, results, credentials)
    server_metrics = watch.summary()
    if args.count > 1:
        summary = {**summarize(results), "server_metrics": server_metrics}
        print(json.dumps({"summary": summary}) if args.json else describe_summary(summary))
    if not args.json:
        print("\n".join(describe_server_metrics(server_metrics)))
    return 0 if results and all(r.ok for r in results) else 1


async def _calls(args: argparse.Namespace, session: aiohttp.ClientSession, urls: list[str],
                 servers: list[Server], results: list[CallResult],
                 credentials: Credentials) -> None:
    try:
        scenario = Scenario.load(args.scenario) if args.scenario else None
    except ValueError as exc:
        raise ProbeError("bad_arguments", str(exc)) from None
    rng = random.Random()
    for i in range(args.count):
        if i:
            servers = await discover(session, urls, credentials)
        if args.caller and args.callee:
            caller, callee = args.caller, args.callee
        elif args.caller or args.callee:
            raise ProbeError("bad_arguments", "give both caller and callee, or neither")
        else:
            caller, callee = pick_pair(servers, args.via)
        result = await run_call(session, servers, caller, callee, args.hold,
                                args.setup_timeout, sample_s=args.sample or None,
                                plan=scenario.plan(rng) if scenario is not None else None)
        results.append(result)
        print(json.dumps(result.to_dict()) if args.json else describe(result), flush=True)
        await wait_idle(session, servers,
                        [find_device(servers, caller)[1].address, result.callee])


def objective_of(args: argparse.Namespace) -> Objective:
    return Objective(min_success_rate=args.min_success,
                     max_response_p95_ms=args.max_response_p95,
                     max_setup_p95_ms=args.max_setup_p95,
                     max_media_latency_p95_ms=args.max_media_latency_p95,
                     max_frame_loss=args.max_loss, max_freeze_ratio=args.max_freeze_ratio,
                     min_psnr=args.min_psnr, min_mos=args.min_mos,
                     max_av_sync_ms=args.max_av_sync_ms)


def _shard_arg(parser: argparse.ArgumentParser, then: str) -> None:
    parser.add_argument("--shard", default=_shard_from_env(), metavar="I/N",
                        help="be shard I (from 0) of N probes sharing one load: each starts "
                             "every N-th call of the same schedule, on every N-th device "
                             "(env PROBE_SHARD=I/N; or PROBE_SHARDS=N with a Kubernetes "
                             "indexed Job's JOB_COMPLETION_INDEX, or with PROBE_SHARD_SLOT, "
                             "1..N, as Swarm's {{.Task.Slot}} gives it); " + then)


def _shard_from_env() -> str:
    """PROBE_SHARD (I/N); or PROBE_SHARDS (N) with a Kubernetes indexed Job's
    JOB_COMPLETION_INDEX (0..N-1) or Swarm's task slot as PROBE_SHARD_SLOT (1..N); 0/1 (the
    whole load) when none is set."""
    if os.environ.get("PROBE_SHARD"):
        return os.environ["PROBE_SHARD"]
    count = os.environ.get("PROBE_SHARDS")
    if count and os.environ.get("JOB_COMPLETION_INDEX"):
        return f"{os.environ['JOB_COMPLETION_INDEX']}/{count}"
    if count and os.environ.get("PROBE_SHARD_SLOT", "").isdigit():
        return f"{int(os.environ['PROBE_SHARD_SLOT']) - 1}/{count}"
    return "0/1"


def load_settings_of(args: argparse.Namespace, rate: float) -> LoadSettings:
    pairs = []
    for text in args.pair or []:
        caller, sep, callee = text.partition(":")
        if not sep or not caller or not callee:
            raise ProbeError("bad_arguments", f"--pair {text!r}: want CALLER:CALLEE")
        pairs.append((caller, callee))
    try:
        scenario = Scenario.load(args.scenario) if getattr(args, "scenario", None) else None
        return LoadSettings(scenario=scenario, rate=rate, duration_s=args.duration,
                            poisson=args.poisson,
                            max_concurrent=args.max_concurrent, hold_s=args.hold,
                            setup_timeout_s=args.setup_timeout, late_ms=args.late_ms,
                            request_timeout_s=args.request_timeout,
                            pairing=args.pairing, pairs=tuple(pairs), media=args.media,
                            via=args.via,
                            window_s=args.window, seed=args.seed, max_lag_ms=args.max_lag_ms,
                            sample_s=args.sample or None,
                            shard=Shard.parse(getattr(args, "shard", "0/1")),
                            start_at=getattr(args, "start_at", None))
    except ValueError as exc:
        raise ProbeError("bad_arguments", str(exc)) from None


def full_addresses(servers: list[Server], pairs: tuple[tuple[str, str], ...]
                   ) -> tuple[tuple[str, str], ...]:
    return tuple((find_device(servers, a)[1].address, find_device(servers, b)[1].address)
                 for a, b in pairs)


@contextlib.asynccontextmanager
async def probe_session(args: argparse.Namespace, urls: list[str]
                        ) -> AsyncIterator[tuple[aiohttp.ClientSession, Credentials]]:
    """The probe's HTTP session, and its credentials: its token goes only where
    wire/credentials.py says (the servers in ``urls``, and what discovery finds)."""
    credentials = Credentials.from_env(trust_announced=args.trust_announced)
    credentials.given(urls)
    # No connection cap: each call holds a long poll, and a capped pool would make the probe
    # itself queue starts (coordinated omission inside the client).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     middlewares=(credentials.middleware,)) as session:
        yield session, credentials


async def command_load(args: argparse.Namespace) -> int:
    objective = objective_of(args)
    progress = Progress(enabled=not args.json)
    async with servers_for(args) as urls, probe_session(args, urls) as (session, credentials):
        servers = await discover(session, urls, credentials)
        settings = load_settings_of(args, args.rate)
        settings = replace(settings, pairs=full_addresses(servers, settings.pairs))
        log = CallLog(args.out) if args.out else None
        began = time.monotonic()
        try:
            async with watch_servers(session, servers, args) as watch:
                report = await run_load(
                    session, servers, settings,
                    on_result=lambda r: log.write(r.to_dict()) if log else None,
                    on_tick=progress.tick)
        except ValueError as exc:  # the run's own settings against the tree found
            raise ProbeError("bad_arguments", str(exc)) from None
        finally:
            if log is not None:
                log.close()
        progress.done()
    run = {**report.summary(), "offset_s": 0.0}
    missed = objective.missed_by_server(
        report.recorder.crossing, settings.media == "full",
        why_none=f"no call started: {report.scheduled} scheduled, {report.skipped_cap} skipped "
                 f"at the cap, {report.skipped_no_devices} without idle devices")
    summary = summary_of("load", [run], servers, objective, missed, settings.window_s)
    summary["server_metrics"] = watch.summary()
    summary["elapsed_s"] = round(time.monotonic() - began, 1)
    return finish(args, summary)


async def command_capacity(args: argparse.Namespace) -> int:
    objective = objective_of(args)
    progress = Progress(enabled=not args.json)
    try:
        cap_settings = CapacitySettings(
            start_rate=args.start_rate, factor=args.factor, max_rate=args.max_rate,
            bisect_steps=args.bisect, give_way=GiveWay(
                transit_p99_ms=args.give_way_transit_p99,
                loop_lag_p99_ms=args.give_way_loop_lag, cpu_pct=args.give_way_cpu,
                loss_in=args.give_way_loss))
    except ValueError as exc:
        raise ProbeError("bad_arguments", str(exc)) from None
    try:
        shard = Shard.parse(args.shard)
    except ValueError as exc:
        raise ProbeError("bad_arguments", str(exc)) from None
    if shard.index > 0:
        return await follow_capacity(args, shard)
    if args.leader:
        raise ProbeError("bad_arguments", f"--leader goes with shard 1..N-1; this is shard "
                                          f"{shard.index}/{shard.count}, the leader itself")
    runs: list[dict[str, Any]] = []
    began = time.monotonic()

    def on_step(step: Step) -> None:
        row = step.row()
        runs.append({**step.report.summary(), "offset_s": round(time.monotonic() - began, 3),
                     "step": row, "server_metrics": step.server_metrics})
        cpu = cpu_line(row["server_cpu_pct"])
        progress.line(f"{step.server} at {step.rate:g} calls/s: "
                      f"{'pass' if step.passed else 'FAIL: ' + '; '.join(step.why)} "
                      f"(max {step.report.max_concurrent_seen} concurrent"
                      + (f"; CPU {cpu})" if cpu else ")"))

    async with (servers_for(args) as urls,
                probe_session(args, urls) as (session, credentials),
                leading(shard, args.fleet_listen, credentials.own_token,
                        args.leader_wait, args.fleet_grace) as leader):
        servers = await discover(session, urls, credentials)
        load = load_settings_of(args, args.start_rate)
        async with watch_servers(session, servers, args) as watch:
            found = await search(
                session, servers, load, objective, cap_settings, on_step, watch,
                run_step=None if leader is None else functools.partial(
                    leader.run_step, session, servers))
        # Offsets were taken when each step ended: make them the steps' starts.
        for run in runs:
            run["offset_s"] = max(0.0, run["offset_s"] - run["duration_s"] - run["hold_s"])
        missed = {name: ([] if c.rate is not None and not c.invalid else
                         [f"no rate met the objective (first failure: {c.failed_because})"])
                  for name, c in found.items()}
        summary = summary_of("capacity", runs, servers, objective, missed, load.window_s)
        summary["capacity"] = {name: c.summary() for name, c in found.items()}
        summary["capacity_steps"] = {name: [s.row() for s in c.steps]
                                     for name, c in found.items()}
        summary["server_metrics"] = watch.summary()
        if leader is not None:
            summary["fleet"] = {"role": "leader", "shard": 0, "count": shard.count,
                                "listen": f"{leader.host}:{leader.port}"}
            leader.finish({key: summary[key] for key in VERDICT})
    summary["elapsed_s"] = round(time.monotonic() - began, 1)
    return finish(args, summary)


async def command_soak(args: argparse.Namespace) -> int:
    objective = objective_of(args)
    rate = soak_rate(args)
    plan: list[Fault] = []
    if args.faults is not None:  # a wrong plan is said before anything starts
        try:
            plan = load_plan(args.faults)
        except PlanError as exc:
            raise ProbeError("bad_arguments", str(exc)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set() and main is not None:
            main.cancel()  # a second signal: stop now
        else:
            print_line("stopping: no new calls; the calls up end, then the checks and the "
                       "report (again to stop at once)")
            stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    began = time.monotonic()
    try:
        async with (stack_for(args) as (urls, stack),
                    probe_session(args, urls) as (session, credentials)):
            servers = await discover(session, urls, credentials)
            names = {s.name for s in servers}
            target: Target | None = None
            if args.faults is not None:
                unknown = sorted({f.server for f in plan} - names)
                if unknown:
                    raise ProbeError("bad_arguments", f"{args.faults}: no server "
                                     f"{unknown[0]!r} in the tree (there are "
                                     f"{', '.join(sorted(names))})")
                if stack is not None:
                    target = LocalTarget(stack)
                elif args.compose_project:
                    target = DockerTarget(args.compose_project, args.docker_socket)
                else:
                    raise ProbeError("bad_arguments", "--faults needs a place to make them: "
                                     "--local, or --compose-project NAME")
                for fault in plan:
                    try:
                        target.check(fault)
                    except FaultError as exc:
                        raise ProbeError("bad_arguments", str(exc)) from None
            load = replace(load_settings_of(args, rate), start_at=None)
            warmup = args.warmup if args.warmup is not None else await default_warmup(
                session, servers)
            stability = StabilitySettings(
                window_s=args.window, warmup_s=warmup, max_recovery_s=args.max_recovery,
                recover_by_s=args.setup_timeout,
                close_after_s=args.hold + args.setup_timeout + args.request_timeout + 15.0)
            settings = SoakSettings(load=load, stability=stability,
                                    scrape_s=args.scrape_interval or 2.0,
                                    ends=not args.no_end_check, idle_timeout_s=args.idle_timeout)
            print_line(f"{len(servers)} servers, {sum(len(s.devices) for s in servers)} "
                       f"devices; {rate:g} calls/s for {load.duration_s:g} s, windows of "
                       f"{args.window:g} s, warm-up {warmup:g} s"
                       + (f", {len(plan)} faults planned" if plan else ""))

            def finish_summary(summary: dict[str, Any]) -> dict[str, Any]:
                runs = summary.get("runs") or []
                missed = {}
                if runs:
                    figures = Recorder.from_summary(runs[0]["figures"])
                    missed = objective.missed_by_server(figures.crossing, load.media == "full")
                built = summary_of("soak", runs, servers, objective, missed, load.window_s)
                built.update({k: v for k, v in summary.items() if k not in built
                              or k in ("runs",)})
                built["valid"] = all(run["valid"] for run in runs)
                built["elapsed_s"] = round(time.monotonic() - began, 1)
                return built

            soak = Soak(session, servers, settings, plan, target, args.out, stop,
                        line=print_line, finish_summary=finish_summary)
            summary = await soak.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if args.json:
        print(dump(summary))
    else:
        print(describe_run(summary))
        print("\n".join(describe_stability(summary["stability"])))
        if args.out:
            print(f"report: {args.out / 'report.html'}")
    if not summary["valid"]:
        return 3
    return 0 if summary["stability"]["stable"] else 1


def soak_rate(args: argparse.Namespace) -> float:
    """--rate, or --at of the least sustainable rate a capacity search found (--capacity)."""
    if args.capacity is None:
        if args.at is not None:
            raise ProbeError("bad_arguments", "--at goes with --capacity FILE")
        if args.rate is None:
            raise ProbeError("bad_arguments", "give --rate, or --capacity FILE --at FRACTION")
        return float(args.rate)
    if args.rate is not None or args.at is None:
        raise ProbeError("bad_arguments", "--capacity FILE takes --at FRACTION (not --rate)")
    if not 0 < args.at <= 10:
        raise ProbeError("bad_arguments", f"--at {args.at:g}: a share of the capacity, e.g. "
                                          "0.7")
    try:
        found = json.loads(args.capacity.read_text()).get("capacity") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise ProbeError("bad_arguments", f"--capacity {args.capacity}: {exc}") from None
    rates = {name: c["rate"] for name, c in found.items()
             if isinstance(c, dict) and isinstance(c.get("rate"), int | float) and c["rate"] > 0}
    if not rates:
        raise ProbeError("bad_arguments", f"--capacity {args.capacity}: no server has a "
                                          "sustainable rate in it (a capacity summary.json?)")
    return args.at * min(rates.values())


async def default_warmup(session: aiohttp.ClientSession, servers: list[Server]) -> float:
    """The servers' ended-call retention (their memory grows that long under steady load,
    relay_ended_calls_keep_seconds) plus 60 s, at least 120 s."""
    kept: list[float] = []
    for server in servers:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with session.get(f"{server.url}/metrics",
                                   timeout=aiohttp.ClientTimeout(total=3)) as response:
                found = parse_metrics(await response.text()).get(
                    "relay_ended_calls_keep_seconds")
            if found is not None:
                kept.append(found)
    return max(120.0, (max(kept) if kept else 120.0) + 60.0)


#: What a fleet's leader tells its followers at the end (they write it as their own verdict).
VERDICT = ("capacity", "capacity_steps", "valid", "objective_met", "objective_missed")


async def follow_capacity(args: argparse.Namespace, shard: Shard) -> int:
    """Shard 1..N-1 of a capacity search: run the leader's steps (probe/fleet.py)."""
    leader = args.leader or os.environ.get("PROBE_LEADER")
    if not leader:
        raise ProbeError("bad_arguments",
                         f"shard {shard.index}/{shard.count} of a capacity search follows a "
                         f"leader: give --leader URL (shard 0's --fleet-listen, e.g. "
                         f"http://probe-0:{FLEET_PORT}; env PROBE_LEADER)")
    objective = objective_of(args)
    runs: list[dict[str, Any]] = []
    began = time.monotonic()

    def on_run(step: int, report: LoadReport) -> None:
        runs.append({**report.summary(), "offset_s": max(
            0.0, time.monotonic() - began - report.settings.duration_s - report.settings.hold_s),
            "fleet_step": step})

    async with (servers_for(args) as urls,
                probe_session(args, urls) as (session, credentials),
                Follower(leader, shard, credentials.own_token,
                         args.leader_wait) as follower):
        servers = await discover(session, urls, credentials)
        load = load_settings_of(args, args.start_rate)
        last = await follow(follower, session, servers, load, on_run)
    verdict = last.verdict
    summary = summary_of("capacity", runs, servers, objective,
                         verdict.get("objective_missed") or {}, load.window_s)
    summary["capacity"] = verdict.get("capacity") or {}
    summary["capacity_steps"] = verdict.get("capacity_steps") or {}
    summary["valid"] = bool(summary["valid"] and verdict.get("valid"))
    summary["objective_met"] = bool(verdict.get("objective_met"))
    summary["fleet"] = {"role": "follower", "shard": shard.index, "count": shard.count,
                        "leader": leader, "steps": last.step,
                        "error": verdict.get("error")}
    if verdict.get("error"):
        summary["objective_missed"].setdefault(RUN, []).append(verdict["error"])
    summary["elapsed_s"] = round(time.monotonic() - began, 1)
    return finish(args, summary)


def summary_of(command: str, runs: list[dict[str, Any]], servers: list[Server],
               objective: Objective, missed: dict[str, list[str]],
               window_s: float) -> dict[str, Any]:
    return build_summary(command, runs, [s.name for s in servers], objective, missed, window_s)


def finish(args: argparse.Namespace, summary: dict[str, Any]) -> int:
    if args.out:
        write_summary(args.out, summary)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    else:
        print(describe_run(summary))
        if args.out:
            print(f"report: {args.out / 'report.html'}")
    if not summary["valid"]:
        return 3
    return 0 if summary["objective_met"] else 1


def describe_run(summary: dict[str, Any]) -> str:
    lines = [f"{summary['command']}: objective {summary['objective']}: "
             f"{'met' if summary['objective_met'] else 'MISSED'}"
             + ("" if summary["valid"] else "  (INVALID: the probe itself lagged)")]
    if run_missed := summary["objective_missed"].get(RUN):
        lines.append(f"  {'; '.join(run_missed)}")
    for name, found in (summary.get("capacity") or {}).items():
        role = " (as a transit: every call crossed it)" if found.get("as") == "transit" else ""
        lines.append(f"  {name}{role}: sustainable {found['rate']} calls/s with up to "
                     f"{found['concurrent']} calls at once; first failing "
                     f"{found['failed_rate']} calls/s ({'; '.join(found['failed_because'])})")
        if (gave := describe_gave_way(found.get("gave_way"))) is not None:
            lines.append(f"    {gave}")
        for step in summary.get("capacity_steps", {}).get(name, []):
            cpu = cpu_line(step.get("server_cpu_pct", {}))
            if cpu and step["rate"] in (found["rate"], found["failed_rate"]):
                verdict = "pass" if step["passed"] else "fail"
                lines.append(f"    at {step['rate']:g} calls/s ({verdict}): CPU {cpu}")
    for run in summary["runs"] if summary["command"] != "capacity" else []:
        err = run.get("schedule_error_ms") or {}
        lines.append(f"  {run['rate']:g} calls/s for {run['duration_s']:g} s: {run['started']} "
                     f"of {run['scheduled']} started, skipped {run['skipped_cap']} (cap) + "
                     f"{run['skipped_no_devices']} (no idle devices), late "
                     f"{run['late_starts']}, schedule error p99 {err.get('p99')} ms, probe "
                     f"lag p99 {run['probe'].get('loop_lag_ms_p99')} ms"
                     + (f", PROBE ERRORS {run['probe_errors']} (see its log)"
                        if run.get("probe_errors") else ""))
        scenario = run.get("scenario") or {}
        if scenario.get("name", "call") != "call":
            total = run["figures"]["total"]
            answered = total["phases"].get("answered_ms") or {}
            media = total["phases"].get("answered_to_media_ms") or {}
            lines.append(f"    scenario {scenario['name']}: {total.get('declined', 0)} of "
                         f"{total['calls']} declined as planned; answered p50 "
                         f"{answered.get('p50')} ms, p95 {answered.get('p95')} ms; answer to "
                         f"media both ways p50 {media.get('p50')} ms, p95 {media.get('p95')} ms")
    callers = summary["figures"]["servers"]
    crossing = summary["figures"].get("crossing") or callers
    for name, figures in crossing.items():
        lines.append(describe_server(name, figures, callers.get(name)))
        missed = summary["objective_missed"].get(name)
        if missed and summary["command"] != "capacity":
            lines.append(f"    objective missed: {'; '.join(missed)}")
    lines.extend(describe_hop_totals(summary["figures"].get("hops", {})))
    lines.extend(describe_server_metrics(summary.get("server_metrics", {})))
    return "\n".join(lines)


def describe_server(name: str, crossing: dict[str, Any], as_caller: dict[str, Any] | None
                    ) -> str:
    """One server's line: the calls that crossed it (its objective is judged on them), their
    setup, media latency (the typical frame, and the tail: each call direction's own p95 and
    worst frame) and freezes; as the callers' server, its response time."""
    def p(figures: dict[str, Any] | None, phase: str, key: str) -> str:
        found = (figures or {}).get("phases", {}).get(phase)
        return f"{found[key]:.1f}" if found else "-"

    media = crossing.get("media") or {}
    text = (f"  {name}: {crossing['ok']}/{crossing['calls']} calls crossing it ok, setup p50/p95 "
            f"{p(crossing, 'setup_ms', 'p50')}/{p(crossing, 'setup_ms', 'p95')} ms, media "
            f"latency p50/p95 {p(crossing, 'media_latency_ms', 'p50')}/"
            f"{p(crossing, 'media_latency_ms', 'p95')} ms (tail: the calls' p95 at their p95 "
            f"{p(crossing, 'media_latency_p95_ms', 'p95')}, worst frame "
            f"{p(crossing, 'media_latency_max_ms', 'max')} ms), freezes "
            f"{media.get('freezes', 0)}")
    if media.get("freezes_per_minute"):
        text += f" ({media['freezes_per_minute']:g}/min)"
    if as_caller and as_caller.get("calls"):
        text += (f"; as the callers' server: response p50/p95/p99 "
                 f"{p(as_caller, 'response_ms', 'p50')}/{p(as_caller, 'response_ms', 'p95')}/"
                 f"{p(as_caller, 'response_ms', 'p99')} ms, server time p50 "
                 f"{p(as_caller, 'server_time_ms', 'p50')} ms")
    if crossing["failures"]:
        text += f"; failures {crossing['failures']}"
    return text


def describe_hop_totals(hops: dict[str, Any]) -> list[str]:
    """Every hop of the run's calls: its latency part p50/p95, loss, and how often it was the
    call's bottleneck (probe/hopstats.py)."""
    if not hops:
        return []
    lines = ["  hops over the run (video latency part p50/p95 ms, loss, bottleneck of calls):"]
    for name, hop in sorted(hops.items(), key=lambda kv: -(kv[1]["latency_ms"] or {}).get(
            "p50", 0.0)):
        latency = hop["latency_ms"] or {}
        loss = f", loss {hop['loss']:.2%}" if hop.get("loss") else ""
        worst = ", ".join(f"{m} {n}" for m, n in hop["bottleneck"].items())
        lines.append(f"    {name:<34} {latency.get('p50', 0.0):7.2f} / "
                     f"{latency.get('p95', 0.0):7.2f}{loss}"
                     + (f"  bottleneck: {worst}" if worst else ""))
    return lines


def cpu_line(cpu_pct: dict[str, float | None]) -> str:
    """``lower-a 12 %, upper 8 %`` for the servers whose CPU is known."""
    return ", ".join(f"{name} {value:g} %" for name, value in cpu_pct.items()
                     if value is not None)


def command_merge(args: argparse.Namespace) -> int:
    summaries = []
    for directory in args.dirs:
        path = directory / "summary.json"
        try:
            summaries.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise ProbeError("bad_input", f"{path}: {exc}") from None
    try:
        summary = merge_summaries(summaries)
    except (KeyError, ValueError) as exc:
        raise ProbeError("bad_input", f"cannot merge: {exc!r}") from None
    if args.out:
        merge_call_logs(args.dirs, args.out)
    return finish(args, summary)


def merge_call_logs(dirs: list[Path], out: Path) -> int:
    """The probes' calls.jsonl as one, in schedule order (a shard's calls carry their place in
    the shared schedule, ``slot``); how many calls."""
    records = []
    for directory in dirs:
        path = directory / "calls.jsonl"
        if not path.exists():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise ProbeError("bad_input", f"{path}:{number}: {exc}") from None
    records.sort(key=lambda r: (r.get("slot") is None, r.get("slot") or 0,
                                (r.get("timeline") or {}).get("t_sent") or 0.0))
    out.mkdir(parents=True, exist_ok=True)
    with (out / "calls.jsonl").open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return len(records)


class Progress:
    """A one-line live view on a terminal; silent when not a TTY or under CI."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty() and not os.environ.get("CI")
        self._last = 0.0

    def tick(self, report: LoadReport, n: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < 0.5:
            return
        self._last = now
        total = report.recorder.total
        sys.stderr.write(f"\r{report.settings.rate:g}/s  started {report.started}/"
                         f"{report.scheduled}  done {total.calls}  ok {total.ok}  failed "
                         f"{total.calls - total.ok}  skipped "
                         f"{report.skipped_cap + report.skipped_no_devices}  late {report.late}  ")
        sys.stderr.flush()

    def line(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write("\r" + text + " " * 20 + "\n")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("probe", args.log_level)
    commands = {"call": command_call, "load": command_load, "capacity": command_capacity,
                "soak": command_soak}
    try:
        if args.command == "merge":
            return command_merge(args)
        with asyncio.Runner(loop_factory=event_loop_factory("auto")) as runner:
            return runner.run(commands[args.command](args))
    except (ProbeError, StackError) as exc:
        code = getattr(exc, "code", "stack_failed")
        print(f"probe: {code}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
