"""One timed call, and the summary of several.

Times: ``t_sent`` and ``t_response`` are the probe's clock; every other event is stamped by the
server or device where it happened, on that host's clock. On one host (the local stack) they share
a clock; across hosts, keep the clocks synchronised (NTP/PTP) or read only same-host intervals.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from probe.bottleneck import bottleneck, budget, rate_limit
from probe.stats import Outcome, classify
from wire.client import ProbeError, Server, ServerClient, find_device
from wire.messages import DIRECTIONS, FIRST_FRAME, CallInfo
from wire.scenario import Plan
from wire.states import CallState, replay

#: Intervals reported per call, in ms from t_sent: name -> event.
INTERVALS = {
    "response_ms": "t_response",
    "caller_woken_ms": "t_caller_woken",
    "routed_ms": "t_routed",
    "callee_woken_ms": "t_callee_woken",
    "answered_ms": "t_answered",
    "media_up_ms": "t_media_up",
    "first_frame_callee_ms": "t_first_frame_callee",
    "first_frame_caller_ms": "t_first_frame_caller",
}


@dataclass
class CallResult:
    caller: str
    callee: str
    server: str
    call: str | None = None
    ok: bool = False
    reason: str | None = None  #: why it ended, or why it failed
    timeline: dict[str, float] = field(default_factory=dict)
    media: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None  #: the probe's error code when a request failed (ProbeError)
    active: bool = False  #: the call was up (media both ways, or woken with --media none)
    server_time_ms: float | None = None  #: the server's own time on the create command
    media_mode: str = "full"
    #: the servers the call crossed, from the caller's to the callee's
    path: list[str] = field(default_factory=list)
    #: each server's own figures, in path order, and each link's (relay/hops.py)
    hops: list[dict[str, Any]] = field(default_factory=list)
    links: list[dict[str, Any]] = field(default_factory=list)
    #: the sending device's own part of each direction (the receiver's is in ``media``)
    senders: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per direction, the call sampled while it was up (``sample_s``): see :func:`sample`
    series: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: in a load, the call's place in the run's schedule (every shard's: probe/load.py Shard)
    slot: int | None = None
    #: in a load, the servers the call was to cross (the tree path; ``path`` is how far it got)
    planned: list[str] = field(default_factory=list)
    #: in a load, how late the probe started it after its schedule (ms: its own lateness,
    #: which every interval from ``t_sent`` includes)
    late_ms: float | None = None
    #: in a soak, how the call stood at each server of its path once it had ended
    #: (probe/load.py ``check_ends``)
    ends: dict[str, str] = field(default_factory=dict)
    #: the directions the call carried (one only with a WHIP publisher or a WHEP player)
    directions: tuple[str, ...] = DIRECTIONS
    #: how the call's scenario meant it to end ("declined": the callee was to decline)
    expected_end: str = "hangup"
    #: the call's draws from its scenario (wire/scenario.py), when it had one
    plan: dict[str, Any] | None = None

    @property
    def rate(self) -> dict[str, dict[str, Any] | None]:
        """Per direction, which link limited the video's rate (probe/bottleneck.py): at the
        end, and, when the call was sampled, the link named most often while it was up
        (``link``; the estimates move, a second at a time)."""
        out = {}
        for direction in DIRECTIONS:
            found = rate_limit(self.hops, self.links, direction, self.senders)
            seen = Counter(r["limited_by"] for r in self.series.get(direction, [])
                           if r.get("limited_by"))
            if found is not None:
                found["link_at_end"] = found["link"]
                if seen:
                    found["link"] = seen.most_common(1)[0][0]
            out[direction] = found
        return out

    @property
    def not_adapting(self) -> list[str]:
        """The directions whose sender cannot follow the path's rate: it said so (pre-encoded,
        packets), or a server found its description of the stream cannot be steered (no
        abs-send-time, no REMB, transport-cc only). ``not_adapting_why`` says which."""
        return list(self.not_adapting_why)

    @property
    def not_adapting_why(self) -> dict[str, str]:
        out = {}
        for direction in DIRECTIONS:
            if (self.senders.get(direction) or {}).get("adapts") is False:
                out[direction] = ("the sending device's encoder does not follow the rate "
                                  "(a pre-encoded or packet source)")
                continue
            for hop in self.hops:
                video = (hop.get("streams") or {}).get(direction, {}).get("video") or {}
                if video.get("cannot_adapt"):
                    out[direction] = f"{hop.get('server')}: {video['cannot_adapt']}"
                    break
        return out

    @property
    def bottleneck(self) -> dict[str, dict[str, Any] | None]:
        return bottleneck(self.hops, self.links, self.media, self.senders)

    @property
    def latency_parts(self) -> dict[str, dict[str, float | None]]:
        return budget(self.hops, self.links, self.media, self.senders)

    @property
    def outcome(self) -> Outcome:
        if self.media_mode == "none":  # signalling only: no media direction to judge
            return classify(self.error, self.reason, self.active, {}, (),
                            expected=self.expected_end)
        woken = "t_caller_woken" in self.timeline and "t_callee_woken" in self.timeline
        return classify(self.error, self.reason, self.active, self.media, self.directions,
                        woken, self.expected_end)

    @property
    def intervals(self) -> dict[str, float]:
        sent = self.timeline.get("t_sent")
        if sent is None:
            return {}
        out = {name: round((self.timeline[ev] - sent) * 1000, 2)
               for name, ev in INTERVALS.items() if ev in self.timeline}
        needed = first_frames(self.directions)
        if all(m in self.timeline for m in needed):
            last = max(self.timeline[m] for m in needed)
            out["setup_ms"] = round((last - sent) * 1000, 2)
            if "t_answered" in self.timeline:  # the network's part once a person answered
                out["answered_to_media_ms"] = round(
                    (last - self.timeline["t_answered"]) * 1000, 2)
        elif self.media_mode == "none" and "t_callee_woken" in self.timeline:
            out["setup_ms"] = round((self.timeline["t_callee_woken"] - sent) * 1000, 2)
        if self.server_time_ms is not None:
            out["server_time_ms"] = self.server_time_ms
        return out

    def to_dict(self) -> dict[str, Any]:
        outcome = self.outcome
        return {"call": self.call, "caller": self.caller, "callee": self.callee,
                "server": self.server, "path": self.path, "ok": self.ok,
                "reason": self.reason,
                "failure": outcome.failure, "failure_detail": outcome.detail,
                "media_mode": self.media_mode,
                "timeline": dict(sorted(self.timeline.items(), key=lambda kv: kv[1])),
                "intervals": self.intervals, "media": self.media, "hops": self.hops,
                "links": self.links, "senders": self.senders,
                "latency_parts": self.latency_parts, "bottleneck": self.bottleneck,
                "rate": self.rate, "not_adapting": self.not_adapting,
                "not_adapting_why": self.not_adapting_why, "series": self.series,
                **({"slot": self.slot} if self.slot is not None else {}),
                **({"planned_path": self.planned} if self.planned else {}),
                **({"start_late_ms": self.late_ms} if self.late_ms is not None else {}),
                **({"ends": self.ends} if self.ends else {}),
                **({"plan": self.plan} if self.plan else {})}


def sample(info: CallInfo, t_s: float) -> dict[str, dict[str, Any]]:
    """One moment of a call, per direction: what the sender sent lately (as its server
    received it), the rate it was told (congestion control) and its encoder's target, which
    link limited it, and what the receiving device got in its last second."""
    hops = [hop.to_dict() for hop in info.hops]
    links = [link.to_dict() for link in info.links]
    senders = {d: part.to_dict() for d, part in info.senders.items()}
    out = {}
    for direction in DIRECTIONS:
        first = hops[0 if direction == "caller_to_callee" else -1] if hops else {}
        kinds = (first.get("streams") or {}).get(direction) or {}
        video, audio = kinds.get("video") or {}, kinds.get("audio") or {}
        media = info.media.get(direction)
        window = media.window if media is not None else None
        limit = rate_limit(hops, links, direction, senders)
        out[direction] = {
            "t_s": round(t_s, 2), "at": round(time.time(), 3),
            "sent_kbps": video.get("recent_kbps"), "audio_kbps": audio.get("recent_kbps"),
            "reported_kbps": video.get("reported_kbps"),
            "target_kbps": (senders.get(direction) or {}).get("target_kbps"),
            "limited_by": limit["link"] if limit else None,
            "frames": window.frames if window else None,
            "frames_lost": window.frames_lost if window else None,
            "gaps": window.gaps if window else None,
            "latency_ms_p50": window.latency_ms_p50 if window else None,
            "latency_ms_p95": window.latency_ms_p95 if window else None}
    return out


def _final(info: CallInfo) -> bool:
    """Every server of the path sent its figures since the call ended."""
    end = info.timeline.get("t_end")
    return end is not None and len(info.hops) == len(info.path) and all(
        hop.at >= end for hop in info.hops)


def first_frames(directions: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The first-frame events that make a call carrying ``directions`` active."""
    return tuple(FIRST_FRAME[d] for d in directions)


def _carried_media(info: CallInfo) -> bool:
    return all(d in info.media and info.media[d].frames > 0 for d in info.directions) and all(
        e in info.timeline for e in first_frames(info.directions))


async def run_call(session: aiohttp.ClientSession, servers: list[Server], caller: str,
                   callee: str, hold_s: float, setup_timeout_s: float = 20.0,
                   scheduled: float | None = None, media: str = "full",
                   request_timeout_s: float = 10.0, sample_s: float | None = None,
                   plan: Plan | None = None) -> CallResult:
    """Start a call at the caller's server, wait for media both ways (or, with ``media``
    "none", for both wake-ups), hold, hang up. ``scheduled``: the time the call was due to
    start (open-loop load), which ``t_sent`` then is, so every interval counts from it.
    ``sample_s``: read the call this often while it is held, into ``series``. ``plan``: one
    call of a scenario (wire/scenario.py): its script goes to the devices (ring, decline,
    who hangs up), and its hold replaces ``hold_s``."""
    server, device = find_device(servers, caller)
    client = ServerClient(session, server.url, request_timeout_s)
    result = CallResult(caller=device.address, callee=callee, server=server.name,
                        media_mode=media)
    script = None
    if plan is not None:
        hold_s = plan.hold_s
        result.expected_end = plan.expected_end
        result.plan = {"ring_s": plan.ring_s, "declines": plan.declines, "hold_s": plan.hold_s,
                       "hangup_by": plan.hangup_by, "dial_from": plan.dial_from}
        if plan != Plan(hold_s=plan.hold_s):  # anything but today's call: the devices' part
            script = plan.script
            # ringing is a person's time, not setup time: the servers stop the setup clock
            setup_timeout_s += plan.ring_s
    result.timeline["t_sent"] = scheduled if scheduled is not None else time.time()
    try:
        info = await client.create_call(device.address, callee, media=media, script=script,
                                        dial_from=plan.dial_from if plan else "api")
    except ProbeError as exc:
        result.timeline["t_response"] = time.time()
        result.reason = result.error = exc.code
        return result
    result.timeline["t_response"] = time.time()
    result.call, result.callee = info.call, info.callee
    result.server_time_ms = info.server_time_ms
    try:
        info = await client.call(info.call, wait="active", timeout_s=setup_timeout_s)
        if info.state == "active":
            if sample_s:
                began = time.time()
                while (left := hold_s - (time.time() - began)) > 0:
                    await asyncio.sleep(min(sample_s, left))
                    info = await client.call(info.call)
                    for direction, row in sample(info, time.time() - began).items():
                        result.series.setdefault(direction, []).append(row)
                    if info.state != "active":
                        break
            elif plan is not None and plan.hangup_by != "probe":
                # a device hangs up by itself after the hold; the probe waits for it (and
                # hangs up itself only if it never does)
                info = await client.call(info.call, wait="ended",
                                         timeout_s=min(120.0, hold_s + 10.0))
            else:
                await asyncio.sleep(hold_s)
            # Devices report every second: make sure both directions have reported.
            deadline = time.monotonic() + 3
            info = await client.call(info.call)
            while (media == "full" and info.state == "active" and not _carried_media(info)
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.2)
                info = await client.call(info.call)
        if info.state != "ended":
            info = await client.hangup(info.call)
        if media == "full" and all(e in info.timeline for e in first_frames(info.directions)):
            # the devices' last reports and every server's last hop figures follow the
            # hang-up along the path
            deadline = time.monotonic() + 1.0
            await asyncio.sleep(0.2)
            info = await client.call(info.call)
            while not _final(info) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                info = await client.call(info.call)
    except ProbeError as exc:
        result.reason = result.error = exc.code
        return result
    result.timeline.update(info.timeline)
    result.path = list(info.path)
    # up as the servers judge it: the same table (wire/states.py), over the same milestones
    needed = () if media == "none" else first_frames(info.directions)
    result.active = replay(info.timeline, needed) is CallState.ACTIVE
    result.directions = tuple(info.directions)
    result.media = {d: s.to_dict() for d, s in info.media.items()}
    result.hops = [hop.to_dict() for hop in info.hops]
    result.links = [link.to_dict() for link in info.links]
    result.senders = {d: part.to_dict() for d, part in info.senders.items()}
    result.reason = info.reason
    result.ok = result.outcome.ok
    return result


async def wait_idle(session: aiohttp.ClientSession, servers: list[Server], addresses: list[str],
                    timeout_s: float = 5.0) -> None:
    """Wait until the given devices show idle at their own servers again."""
    deadline = time.monotonic() + timeout_s
    for address in addresses:
        server, _ = find_device(servers, address)
        client = ServerClient(session, server.url)
        while time.monotonic() < deadline:
            devices = {d.address: d for d in await client.devices()}
            if address in devices and devices[address].state == "idle":
                break
            await asyncio.sleep(0.05)


def summarize(results: list[CallResult]) -> dict[str, Any]:
    """p50 and max of each interval and of each direction's latency p50, over the calls."""
    ok = [r for r in results if r.ok]
    out: dict[str, Any] = {"calls": len(results), "ok": len(ok),
                           "success_rate": round(len(ok) / len(results), 4) if results else 0.0,
                           "declined": sum(r.outcome.declined for r in results),
                           "failures": {}}
    for r in results:
        if not r.ok:
            out["failures"][r.reason or "unknown"] = out["failures"].get(r.reason or "unknown",
                                                                         0) + 1
    figures: dict[str, list[float]] = {}
    for r in ok:
        for name, value in r.intervals.items():
            figures.setdefault(name, []).append(value)
        for direction in DIRECTIONS:
            media = r.media.get(direction, {})
            for key, name in (("latency_ms_p50", "latency_ms"),
                              ("audio_latency_ms_p50", "audio_latency_ms"),
                              ("av_sync_ms", "av_sync_ms"), ("mos", "mos"),
                              ("psnr_db", "psnr_db")):
                if media.get(key) is not None:
                    figures.setdefault(f"{name}_{direction}", []).append(media[key])
    out["figures"] = {name: {"p50": round(statistics.median(values), 2),
                             "min": round(min(values), 2), "max": round(max(values), 2),
                             "n": len(values)}
                      for name, values in figures.items()}
    return out
