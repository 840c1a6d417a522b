"""``python -m endpoint``: host one or many devices under one or more lower servers.

With several ``--server``, each gets ``--count`` devices, numbered on from the previous server's
(``cam-1..cam-N`` under the first, ``cam-N+1..`` under the second): one process, so pre-encoded
and packet devices share their send log and measure latency between servers too."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import typing
from pathlib import Path

import aiohttp

from endpoint.capture import CaptureError, check_video, open_audio
from endpoint.device import Device, DeviceSettings, MediaSupply
from endpoint.phone import dial_and_hold, probe_headers, report, ring_then, to_json
from rtc.adapter import MediaSettings
from wire.config import split_list
from wire.logs import setup_logging
from wire.messages import AnswerMode
from wire.scenario import Scenario
from wire.tasks import Tasks

CODEC_CHOICES = {"any": ("video/VP8", "video/H264"), "vp8": ("video/VP8",),
                 "h264": ("video/H264",)}


def device_ids(prefix: str, count: int, start: int) -> list[str]:
    """``cam``, 1 -> [cam]; ``cam``, 3, start 1 -> [cam-1, cam-2, cam-3]."""
    if count == 1 and start == 0:
        return [prefix]
    first = start or 1
    return [f"{prefix}-{i}" for i in range(first, first + count)]


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like 640x480") from None
    return width, height


def _counts(text: str) -> list[int]:
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"counts {text!r} must be N,N,...") from None
    if any(n < 0 for n in counts):
        raise argparse.ArgumentTypeError("counts must not be negative")
    return counts


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m endpoint", description=__doc__)
    p.add_argument("--server", action="append", default=None,
                   help="the lower server, e.g. ws://127.0.0.1:8080 (repeatable; env "
                        "ENDPOINT_SERVER, comma-separated)")
    p.add_argument("--device", default=env("ENDPOINT_DEVICE", "cam"),
                   help="device id, or the prefix of the ids with --count")
    p.add_argument("--count", type=int, default=int(env("ENDPOINT_COUNT", "1")),
                   help="how many devices this process hosts")
    p.add_argument("--start", type=int, default=int(env("ENDPOINT_START", "0")),
                   help="first index with --count (ids PREFIX-START ...)")
    p.add_argument("--counts", type=_counts, default=None, metavar="N,N,...",
                   help="with several --server: how many devices each gets, in order "
                        "(default: --count each)")
    p.add_argument("--video", default=env("ENDPOINT_VIDEO", "synthetic"),
                   help="synthetic: drawn and encoded live per call; preencoded: a VP8 loop "
                        "encoded once and sent by every device, received decoded; packets: the "
                        "same loop as ready RTP packets, received without decoding (cheapest: "
                        "for load; latency of a loop is measured only by receivers in this "
                        "process); or a capture source: v4l2:/dev/videoN[:WxH@FPS], opencv:N, "
                        "file:PATH (loops), lavfi:GRAPH")
    p.add_argument("--stamp", action="store_true",
                   default=env("ENDPOINT_STAMP", "") not in ("", "0"),
                   help="draw the stamp into a capture source's frames (latency measurable)")
    p.add_argument("--audio", default=env("ENDPOINT_AUDIO", "tone"),
                   help="tone, none, alsa:DEVICE or file:PATH")
    p.add_argument("--token", default=env("ENDPOINT_TOKEN"),
                   help="the device's credential when its server has auth on (`python -m relay "
                        "token device:ID`); with VPHONE_AUTH_SECRET set it is signed here")
    p.add_argument("--show", action="store_true",
                   help="show the other party in a window with live figures (needs a display "
                        "and opencv-python); headless by default")
    p.add_argument("--record", default=env("ENDPOINT_RECORD"), metavar="PATH",
                   help="record received video: a .mp4/.mkv/.webm file, or a directory (one "
                        "file per call)")
    p.add_argument("--codec", default=env("ENDPOINT_CODEC", "any"), choices=list(CODEC_CHOICES),
                   help="video codecs this device takes: vp8, h264, or any (VP8 first)")
    p.add_argument("--size", type=parse_size, default=parse_size(env("ENDPOINT_SIZE", "640x480")))
    p.add_argument("--fps", type=float, default=float(env("ENDPOINT_FPS", "30")))
    p.add_argument("--rtp-payload", type=int, metavar="BYTES",
                   default=int(env("ENDPOINT_RTP_PAYLOAD", "0")) or None,
                   help="with --video packets: the most bytes of an RTP video payload (default "
                        "1300, as aiortc; 1400 is GStreamer's; up to ~1450 fits a 1,500-byte "
                        "path)")
    p.add_argument("--media-address", action="append", default=None,
                   help="address to gather ICE host candidates on (repeatable); default: all "
                        "but loopback (env ENDPOINT_MEDIA_ADDRESSES, comma-separated)")
    p.add_argument("--ice-server", action="append", default=None, help="stun:/turn: URL")
    p.add_argument("--log-level", default=env("ENDPOINT_LOG_LEVEL", "info"))
    p.add_argument("--min-bitrate", type=float,
                   default=float(env("ENDPOINT_MIN_BITRATE", "100")), metavar="KBPS",
                   help="the least a live encoder is set to when the path reports less "
                        "(REMB; aiortc's own floor is 250 kbit/s)")
    p.add_argument("--start-bitrate", type=float,
                   default=float(env("ENDPOINT_START_BITRATE", "300")), metavar="KBPS",
                   help="what a live video encoder sends before the path reports what it "
                        "carries (libwebrtc's start; aiortc's own: 500)")
    p.add_argument("--audio-bitrate", type=float,
                   default=float(env("ENDPOINT_AUDIO_BITRATE", "32")), metavar="KBPS",
                   help="Opus bitrate (aiortc's own: 96; the tone's timing marks need 24)")
    p.add_argument("--audio-buffer", type=int,
                   default=int(env("ENDPOINT_AUDIO_BUFFER", "1")), metavar="FRAMES",
                   help="20-ms audio frames held before playing, and how long a lost packet is "
                        "waited for (aiortc's own: 4, and until 16 are in)")
    p.add_argument("--call", metavar="ADDRESS", default=env("ENDPOINT_CALL"),
                   help="dial ADDRESS (server/device, or a device id the tree knows once) as "
                        "soon as the (first) device is registered, hold the call --hold "
                        "seconds, hang up, print the call's figures both ways, and exit: 0 "
                        "when it was up with media both ways, 1 otherwise")
    p.add_argument("--hold", type=float, default=float(env("ENDPOINT_HOLD", "10")),
                   metavar="S", help="with --call: how long to hold the call (0: until the "
                                     "other party hangs up)")
    p.add_argument("--json", action="store_true",
                   help="with --call: print the result as one JSON object")
    p.add_argument("--scenario", type=Path, default=env("ENDPOINT_SCENARIO"), metavar="FILE",
                   help="with --call: the call's scenario (JSON or TOML, docs/probe.md; dial "
                        "from \"device\"): the callee rings, answers or declines, and whoever "
                        "it names hangs up, as drawn; its hold replaces --hold")
    p.add_argument("--answer", default=env("ENDPOINT_ANSWER", "auto"),
                   choices=typing.get_args(AnswerMode),
                   help="as the callee: auto (answer as woken), ring (ring, then pick up after "
                        "--ring-for), decline (turn every call down: reason declined)")
    p.add_argument("--ring-for", type=float, default=float(env("ENDPOINT_RING_FOR", "2")),
                   metavar="S", help="with --answer ring: pick up after S seconds; negative: "
                                     "never (the server ends the call: no_answer)")
    p.add_argument("--connect-timeout", type=float,
                   default=float(env("ENDPOINT_CONNECT_TIMEOUT", "0")), metavar="S",
                   help="exit 1 (saying why) if the devices are not all registered within S "
                        "seconds; 0 (default): keep trying for ever")
    return p


async def run(args: argparse.Namespace) -> int:
    media = MediaSettings(
        addresses=tuple(args.media_address or split_list(os.environ.get(
            "ENDPOINT_MEDIA_ADDRESSES"))),
        ice_servers=tuple(args.ice_server or ()))
    settings = DeviceSettings(width=args.size[0], height=args.size[1], fps=args.fps,
                              audio=args.audio != "none", media=media,
                              codecs=CODEC_CHOICES[args.codec], video=args.video,
                              stamp=args.stamp, audio_source=args.audio, show=args.show,
                              record=args.record, token=args.token,
                              min_bitrate=int(args.min_bitrate * 1000),
                              start_bitrate=int(args.start_bitrate * 1000),
                              audio_bitrate=int(args.audio_bitrate * 1000),
                              audio_buffer_frames=args.audio_buffer, answer=args.answer,
                              rtp_payload=args.rtp_payload)
    supply = MediaSupply.for_settings(settings)
    devices = []
    counts = args.counts or [args.count] * len(args.server)
    # One server and no --start: a single device keeps its bare id. Otherwise ids are
    # numbered on across the servers, with no two alike.
    start = args.start or (1 if len(args.server) > 1 else 0)
    for server, count in zip(args.server, counts, strict=True):
        devices += [Device(server, d, settings, supply=supply)
                    for d in device_ids(args.device, count, start)]
        start += count if start else 0
    rings = [ring_then(d, args.ring_for) for d in devices]
    for device, on_ring in zip(devices, rings, strict=True):
        device.on_ring = on_ring
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    status = 0
    async with aiohttp.ClientSession() as session:
        tasks = Tasks("endpoint")
        for device in devices:
            tasks.spawn(device.run(session), device.id)
        try:
            if args.connect_timeout > 0 and not await all_registered(devices,
                                                                     args.connect_timeout):
                status = 1
            elif args.call:
                status = await call_once(devices[0], session, args, stop)
            else:
                await stop.wait()
        finally:
            await tasks.close()
            await asyncio.gather(*(r.tasks.close() for r in rings))
            await asyncio.gather(*(d.close() for d in devices))
    return status


async def call_once(device: Device, session: aiohttp.ClientSession, args: argparse.Namespace,
                    stop: asyncio.Event) -> int:
    """``--call``: dial once registered, hold, hang up, print the figures. Ctrl-C hangs up."""
    await device.registered.wait()
    async with aiohttp.ClientSession(headers=probe_headers()) as api:
        return await _call_once(device, api, args, stop)


async def _call_once(device: Device, api: aiohttp.ClientSession, args: argparse.Namespace,
                     stop: asyncio.Event) -> int:
    tasks = Tasks("endpoint --call")
    plan = args.scenario_plan
    dialing = tasks.spawn(dial_and_hold(device, api, args.call, args.hold, plan=plan), "dial")
    stopping = tasks.spawn(stop.wait(), "stop")
    await asyncio.wait({dialing, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not dialing.done():  # Ctrl-C: hang up what is up, then report it
        for call in list(device.calls):
            await device.hangup(call)
        await dialing
    await tasks.close()
    result = dialing.result()
    print(to_json(result) if args.json else report(result), flush=True)
    return 0 if result.ok else 1


async def all_registered(devices: list[Device], timeout_s: float) -> bool:
    """Wait until every device is registered; False (saying what each still waits for) if
    that takes longer than ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(d.registered.wait() for d in devices))
        return True
    except TimeoutError:
        for device in devices:
            if not device.registered.is_set():
                print(f"endpoint: {device.id} not registered within {timeout_s:g} s: "
                      f"{device.waiting_for or 'no answer yet'}", file=sys.stderr)
        return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.server = args.server or split_list(os.environ.get("ENDPOINT_SERVER"))
    if not args.server:
        parser.error("give --server (or ENDPOINT_SERVER)")
    if args.counts is not None and len(args.counts) != len(args.server):
        parser.error(f"--counts gives {len(args.counts)} numbers for {len(args.server)} "
                     "--server")
    setup_logging(f"endpoint:{args.device}", args.log_level)
    args.scenario_plan = None
    try:
        if args.scenario:
            if not args.call:
                raise ValueError("--scenario goes with --call (the call it describes)")
            args.scenario_plan = Scenario.load(args.scenario, dialers=("device",)).plan(
                random.Random())
        settings = DeviceSettings(width=args.size[0], height=args.size[1], fps=args.fps,
                                  video=args.video)
        if settings.capture is not None:
            check_video(args.video)  # a missing camera fails now, not at the first call
        if args.audio not in ("tone", "none"):
            open_audio(args.audio).stop()
    except (ValueError, CaptureError) as exc:
        print(f"endpoint: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
