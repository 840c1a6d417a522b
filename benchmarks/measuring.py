#!/usr/bin/env python3
"""What measuring costs a synthetic device: its CPU with and without the measuring.

One call between two synthetic devices in this process, straight from one to the other (no
server between: only the devices' work is timed), run with measuring on and off in turn
(ABBA: on, off, off, on, ... so a drift in the machine's speed falls on both alike), after one
call not counted (a process's first call costs more: codecs opened, threads made). Measuring
is everything a device does only to measure: the stamp drawn into each frame sent and the
timing mark into the tone; on what it receives, the stamp read back (latency, loss, freezes),
the picture compared with its source (PSNR/SSIM, one frame in 30), the audio's marks read
(Goertzel filters on every frame), loss, jitter, lip sync and the call score. Off, frames and
audio are only counted. The process's CPU (every thread: aiortc decodes and encodes in
threads) over each measured window, per device, is what is compared.

    .venv/bin/python benchmarks/measuring.py [--seconds 12] [--rounds 2] [--size 640x480] [--json]

Prints per device CPU % with and without, what measuring adds (``added_pct``: on / off - 1,
in %; the target is at most 10), and what the measuring run measured (so it is seen to work).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from endpoint.device import DeviceCall, DeviceSettings, MediaSupply
from wire.messages import Offer


async def one_run(measure: bool, size: tuple[int, int], warmup: float,
                  seconds: float) -> dict[str, Any]:
    settings = DeviceSettings(width=size[0], height=size[1], measure=measure)
    supply = MediaSupply.for_settings(settings)
    a = DeviceCall("bench", "caller", "b", settings, None, time.time, "a", supply)
    b = DeviceCall("bench", "callee", "a", settings, None, time.time, "b", supply)
    try:
        sdp = await a.offer()
        await a.accept(await b.answer(Offer(call="bench", leg="bench", sdp=sdp)))
        await asyncio.sleep(warmup)
        frames = [c.video.frames for c in (a, b)]
        cpu, began = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - began
        cpu = time.process_time() - cpu
        frames = [c.video.frames - f for c, f in zip((a, b), frames, strict=True)]
        stats = b.video.stats(time.time(), b.audio)
        targets = [c.bitrate.target / 1000 if c.bitrate is not None else None for c in (a, b)]
    finally:
        await asyncio.gather(a.close(), b.close(), return_exceptions=True)
    return {"measure": measure, "cpu_pct_per_device": round(cpu / elapsed * 100 / 2, 2),
            "fps": round(sum(frames) / elapsed / 2, 2), "video_target_kbps": targets,
            "measured": {k: getattr(stats, k) for k in (
                "latency_ms_p50", "frames_lost", "psnr_db", "ssim", "quality_samples",
                "audio_marks", "audio_latency_ms_p50", "av_sync_ms", "mos")}}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    size = tuple(int(v) for v in args.size.split("x"))
    order = [True, False, False, True] * args.rounds
    # A first call in a process costs more than the next ones (codecs opened, threads made,
    # numpy's first passes): one not counted, before the counted ones.
    await one_run(True, size, args.warmup, min(args.seconds, 3.0))
    runs = [await one_run(measure, size, args.warmup, args.seconds) for measure in order]
    on = [r["cpu_pct_per_device"] for r in runs if r["measure"]]
    off = [r["cpu_pct_per_device"] for r in runs if not r["measure"]]
    on_mean, off_mean = statistics.fmean(on), statistics.fmean(off)
    return {
        "size": args.size, "seconds": args.seconds, "runs": len(runs),
        "cpu_pct_per_device_on": round(on_mean, 2), "cpu_pct_per_device_off": round(off_mean, 2),
        "cpu_pct_on_runs": on, "cpu_pct_off_runs": off,
        "runs_in_order": [{k: r[k] for k in ("measure", "cpu_pct_per_device",
                                              "video_target_kbps")} for r in runs],
        "added_pct": round((on_mean / off_mean - 1) * 100, 1) if off_mean else None,
        "target_added_pct_at_most": 10,
        "fps_on": round(statistics.fmean(r["fps"] for r in runs if r["measure"]), 2),
        "fps_off": round(statistics.fmean(r["fps"] for r in runs if not r["measure"]), 2),
        "measured": next(r["measured"] for r in runs if r["measure"]),
        "measured_off": next(r["measured"] for r in runs if not r["measure"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (4 runs each)")
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = asyncio.run(run(args))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"synthetic device, {out['size']}, {out['runs']} runs of {out['seconds']:g} s "
              f"(ABBA): CPU per device {out['cpu_pct_per_device_on']} % measuring, "
              f"{out['cpu_pct_per_device_off']} % not: measuring adds {out['added_pct']} % "
              f"(target at most {out['target_added_pct_at_most']} %)")
        print(f"  fps {out['fps_on']} measuring, {out['fps_off']} not; measured: "
              + ", ".join(f"{k} {v}" for k, v in out["measured"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
