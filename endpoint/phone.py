"""A person's use of a device from the command line: dial once, hold, hang up, and print the
call's figures both ways (``python -m endpoint --call ADDRESS``); pick up a ringing call after a
while (``--answer ring --ring-for S``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from endpoint.device import CallEnd, Device, DialError
from wire.auth import probe_identity, token_for
from wire.client import ProbeError, ServerClient
from wire.logs import event
from wire.messages import DIRECTIONS, CallInfo, Script, Wake
from wire.scenario import Plan
from wire.tasks import Tasks

log = logging.getLogger("endpoint.phone")


def http_url(server: str) -> str:
    """``ws://h:p[/v1/device]`` -> ``http://h:p``: where the device's server answers HTTP."""
    parts = urlsplit(server)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "", "", ""))


@dataclass
class DialResult:
    """What ``--call`` did, as it prints it."""

    callee: str
    call: str | None = None
    #: "hangup" for a call that was up and was hung up; else the refusal or end reason
    reason: str | None = None
    error: str | None = None
    held_s: float = 0.0
    #: the caller's server's record of the call (both directions' figures, the timeline)
    info: dict[str, Any] | None = None
    #: this device's own final figures for what it received, when the server's are missing
    received: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    #: how the call was meant to end ("declined": its scenario had the callee decline)
    expected: str = "hangup"

    @property
    def ok(self) -> bool:
        if self.expected == "declined":
            return self.reason == "declined"
        media = (self.info or {}).get("media", {})
        return self.reason == "hangup" and all(
            media.get(d, {}).get("frames", 0) > 0 for d in DIRECTIONS)

    def to_dict(self) -> dict[str, Any]:
        return {"callee": self.callee, "call": self.call, "ok": self.ok, "reason": self.reason,
                "error": self.error, "held_s": round(self.held_s, 3), "info": self.info,
                "received": self.received, "notes": self.notes}


async def dial_and_hold(device: Device, session: aiohttp.ClientSession, callee: str,
                        hold_s: float, setup_timeout_s: float = 60.0,
                        plan: Plan | None = None) -> DialResult:
    """Dial ``callee`` from ``device`` (registered), wait until the call is up (or ends: a
    refusal, a decline, no answer), hold it ``hold_s`` seconds (0: until the other party hangs
    up), hang up, and read the call's figures from the caller's server. ``plan``: one call of
    a scenario (wire/scenario.py, dialled from the device): the callee gets its part (ring,
    answer or decline, and the hang-up if the callee's), and its hold replaces ``hold_s``."""
    result = DialResult(callee=callee)
    script = None
    if plan is not None:
        result.expected = plan.expected_end
        hold_s = plan.hold_s
        # this program hangs up for the caller (and for "probe": it is the probe here)
        script = Script(ring_s=plan.ring_s, decline=plan.declines, hold_s=plan.hold_s,
                        hangup_by="callee" if plan.hangup_by == "callee" else "probe")
        result.notes.append(f"scenario: ring {plan.ring_s:g} s, "
                            f"{'decline' if plan.declines else 'answer'}, hold {hold_s:g} s, "
                            f"hung up by the {plan.hangup_by}")
        if plan.hangup_by == "callee":
            hold_s = 0  # until the callee hangs up
    try:
        result.call = await device.dial(callee, script=script)
    except DialError as exc:
        result.reason, result.error = exc.code, exc.message
        return result
    except (ConnectionError, TimeoutError) as exc:
        result.reason, result.error = "no_dial", str(exc) or "no reply to the dial"
        return result
    client = ServerClient(session, http_url(device.url))
    call = result.call
    try:
        info: CallInfo | None = await client.call(call, wait="active",
                                                  timeout_s=setup_timeout_s)
    except ProbeError as exc:
        info, problem = None, f"{exc.code}: {exc}"
    if info is not None and info.state == "active":
        began = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await device.wait_end(call, hold_s if hold_s > 0 else None)
        result.held_s = time.monotonic() - began
    if call not in device.ended:
        with contextlib.suppress(KeyError):
            await device.hangup(call)
    end: CallEnd = await device.wait_end(call, 10)
    try:
        info = await final_call(client, call)
    except ProbeError as exc:
        info, problem = None, f"{exc.code}: {exc}"
    result.reason = info.reason if info is not None and info.reason else end.reason
    if end.stats is not None:
        result.received = end.stats.media.to_dict()
    if info is not None:
        result.info = info.to_dict()
    else:
        result.notes.append(f"the server's record of the call was not read ({problem})")
    return result


def probe_headers(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What reading a call at the device's own server needs with auth on: the probe's token,
    PROBE_TOKEN, or one signed here from VPHONE_AUTH_SECRET (none with auth off)."""
    token = token_for(probe_identity(), environ.get("PROBE_TOKEN"), environ)
    return {"Authorization": f"Bearer {token}"} if token else {}


async def final_call(client: ServerClient, call_id: str, within_s: float = 3.0) -> CallInfo:
    """The ended call, once both devices' last figures are in (or ``within_s`` passed)."""
    deadline = time.monotonic() + within_s
    info = await client.call(call_id, wait="ended", timeout_s=within_s)
    while info.media.keys() < set(DIRECTIONS) and "t_first_frame_callee" in info.timeline \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        info = await client.call(call_id)
    return info


def ring_then(device: Device, ring_for_s: float) -> Any:
    """An ``on_ring`` for scripted tests: pick up each ringing call after ``ring_for_s``
    seconds (negative: never, so the server ends it with ``no_answer``)."""
    tasks = Tasks(f"{device.id} pickups")

    async def pick_up(wake: Wake) -> None:
        await asyncio.sleep(ring_for_s)
        with contextlib.suppress(KeyError):
            await device.pickup(wake.call)

    def on_ring(wake: Wake) -> None:
        event(log, "device.ringing", call=wake.call, device=device.id, peer=wake.peer,
              pickup_after_s=ring_for_s if ring_for_s >= 0 else None)
        if ring_for_s >= 0:
            tasks.spawn(pick_up(wake), f"{wake.call}-pickup")

    on_ring.tasks = tasks  # type: ignore[attr-defined]  # owned here, cancelled by the caller
    return on_ring


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def report(result: DialResult) -> str:
    """The call's figures, as a person reads them."""
    lines = [f"call {result.call or '-'} to {result.callee}: {result.reason}"
             + (f" ({result.error})" if result.error else "")
             + (f", held {result.held_s:.1f} s" if result.held_s else "")]
    info = result.info or {}
    timeline = info.get("timeline", {})
    t0 = timeline.get("t_received")
    if t0 is not None:
        steps = [(name, timeline[key]) for name, key in (
            ("callee rung", "t_callee_woken"), ("answered", "t_answered"),
            ("media up", "t_media_up"), ("first frame at callee", "t_first_frame_callee"),
            ("first frame here", "t_first_frame_caller")) if key in timeline]
        if steps:
            lines.append("  setup: " + ", ".join(f"{n} +{(t - t0) * 1000:.0f} ms"
                                                 for n, t in steps))
    if info.get("path"):
        lines.append(f"  path: {' > '.join(info['path'])}"
                     + (f", codec {info['codec']}" if info.get("codec") else ""))
    media = dict(info.get("media", {}))
    if "callee_to_caller" not in media and result.received:
        media["callee_to_caller"] = result.received
    for direction in DIRECTIONS:
        m = media.get(direction)
        if not m:
            lines.append(f"  {direction}: no figures")
            continue
        text = (f"  {direction}: {m.get('frames', 0)} frames at {m.get('fps', 0):.1f} fps, "
                f"{m.get('frames_lost', 0)} lost, {m.get('gaps', 0)} freezes, latency p50 "
                f"{_ms(m.get('latency_ms_p50'))} p95 {_ms(m.get('latency_ms_p95'))}; audio "
                f"{m.get('audio_frames', 0)} frames, latency {_ms(m.get('audio_latency_ms_p50'))}")
        if m.get("mos") is not None:
            text += f", MOS {m['mos']:.2f}"
        if m.get("psnr_db") is not None:
            text += f"; PSNR {m['psnr_db']:.1f} dB"
        lines.append(text)
    lines += [f"  note: {n}" for n in result.notes]
    return "\n".join(lines)


def to_json(result: DialResult) -> str:
    return json.dumps(result.to_dict(), sort_keys=True)
