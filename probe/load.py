"""Open-loop load: calls start on a schedule whatever the servers do.

The schedule (fixed rate or Poisson) is made before the run. Each call's ``t_sent`` is its
*scheduled* start, so a server that slows the probe down shows up in every latency instead of
hiding in fewer, later calls (no coordinated omission). A start later than its schedule by more
than a threshold is counted late; a start that would pass the concurrency cap, or that finds no
idle pair of devices, is skipped and counted, never delayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from hdrh.histogram import HdrHistogram

from probe.calls import CallResult, run_call
from probe.histograms import encode, new_histogram, percentiles, record_ms
from probe.stats import Recorder
from probe.watch import LoopWatch
from wire.client import (
    ProbeError,
    Server,
    ServerClient,
    TreePaths,
    find_device,
    lower_servers,
)
from wire.logs import event
from wire.messages import split_address
from wire.scenario import Plan, Scenario
from wire.tasks import Tasks

log = logging.getLogger("probe.load")

#: calls whose samples a run's summary keeps (every call's are in calls.jsonl)
SAMPLED_CALLS_KEPT = 4

PairingMode = Literal["random", "every-pair", "same-server", "explicit"]
PAIRING_MODES: tuple[str, ...] = ("random", "every-pair", "same-server", "explicit")


def schedule(rate: float, duration_s: float, poisson: bool = False,
             rng: random.Random | None = None) -> list[float]:
    """Start offsets (s from the run's start) for ``rate`` calls/s over ``duration_s``:
    evenly spaced, or with exponential gaps (a Poisson process) of the same mean."""
    return list(iter_schedule(rate, duration_s, poisson, rng))


def iter_schedule(rate: float, duration_s: float, poisson: bool = False,
                  rng: random.Random | None = None) -> Iterator[float]:
    """:func:`schedule`, one offset at a time (an hours-long soak keeps no list of them)."""
    if rate <= 0 or duration_s <= 0:
        return
    if not poisson:
        for i in range(int(rate * duration_s + 1e-9)):
            yield i / rate
        return
    rng = rng or random.Random()
    t = rng.expovariate(rate)
    while t < duration_s:
        yield t
        t += rng.expovariate(rate)


@dataclass(frozen=True)
class Shard:
    """This probe's part of a load shared by ``count`` probes (``--shard I/N``).

    Every probe builds the same schedule (same rate, duration and seed) from the same
    wall-clock start, and this one starts the calls whose place in it is ``index`` modulo
    ``count``: together they make one open-loop load, started call for call as one probe
    would. Each takes the devices whose place in their server's list is ``index`` modulo
    ``count``, so no two probes ever pick the same device (their busy sets are their own).
    ``probe merge`` adds their outputs up exactly."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``I/N``: shard I (from 0) of N."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"shard {text!r}: expected I/N, e.g. 0/2") from None
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"shard {text!r}: I must be in 0..N-1 and N at least 1")
        return cls(index, count)

    def mine(self, n: int) -> bool:
        return n % self.count == self.index

    def devices(self, devices: list[str]) -> list[str]:
        return [d for k, d in enumerate(devices) if self.mine(k)]

    def start_at(self, now: float, align_s: float = 10.0, lead_s: float = 2.0) -> float:
        """Where shards started apart meet without being told: the next wall-clock multiple
        of ``align_s`` at least ``lead_s`` away (probes started within ``align_s - lead_s`` of
        each other, on clocks in step, start together)."""
        at = (int(now // align_s) + 1) * align_s
        return at if at - now >= lead_s else at + align_s


class Pairing:
    """Chooses (caller, callee) among idle devices.

    - ``random``: caller and callee under two different lower servers, both at random;
    - ``every-pair``: each ordered pair of lower servers in turn (A→B, B→A, A→C ...);
    - ``same-server``: both under one lower server (bridged there alone), servers in turn;
    - ``explicit``: the pairs given, in turn.
    ``callers_on`` keeps callers on one server (the capacity search targets one server);
    ``via`` keeps the routes whose path (``path(a, b)``: the servers a call from server a to
    server b crosses) crosses that server.
    """

    def __init__(self, mode: PairingMode, devices: dict[str, list[str]],
                 pairs: list[tuple[str, str]] | None = None, rng: random.Random | None = None,
                 callers_on: str | None = None, via: str | None = None,
                 path: Callable[[str, str], list[str]] | None = None) -> None:
        if mode not in PAIRING_MODES:
            raise ValueError(f"pairing must be one of {', '.join(PAIRING_MODES)}")
        if mode == "explicit" and not pairs:
            raise ValueError("explicit pairing needs pairs")
        self.mode = mode
        self.devices = {s: list(d) for s, d in devices.items() if d}
        self.pairs = list(pairs or [])
        self.rng = rng or random.Random()
        self.callers_on = callers_on
        self._turn = 0  #: explicit pairs: the next to try
        self._served: dict[tuple[str, str], int] = {}  #: calls started per route
        servers = sorted(self.devices)
        if mode == "same-server":
            self._routes = [(s, s) for s in servers if len(self.devices[s]) > 1]
        else:
            self._routes = [(a, b) for a in servers for b in servers if a != b]
        if callers_on is not None:
            self._routes = [r for r in self._routes if r[0] == callers_on]
        if via is not None:
            def crosses(a: str, b: str) -> bool:
                return path is not None and via in path(a, b)
            self._routes = [r for r in self._routes if crosses(*r)]
            self.pairs = [p for p in self.pairs if crosses(split_address(p[0])[0] or "",
                                                           split_address(p[1])[0] or "")]
        if (not self._routes if mode != "explicit" else not self.pairs):
            where = f" through {via}" if via is not None else ""
            raise ValueError(f"no {mode} route{where} between the servers' devices: "
                             f"{ {s: len(d) for s, d in self.devices.items()} }")

    def pick(self, busy: set[str]) -> tuple[str, str] | None:
        """The next pair with both devices idle, or None if there is none now."""
        if self.mode == "explicit":
            for i in range(len(self.pairs)):
                pair = self.pairs[(self._turn + i) % len(self.pairs)]
                if pair[0] not in busy and pair[1] not in busy and pair[0] != pair[1]:
                    self._turn = (self._turn + i + 1) % len(self.pairs)
                    return pair
            return None
        routes = list(self._routes)
        if self.mode == "random":
            self.rng.shuffle(routes)
        else:
            # In turn, cycle by cycle: only the routes served least so far may start, so a
            # route whose devices were busy when its turn came is not passed over for routes
            # that share one of its servers (they would keep its devices busy for ever).
            # Until it starts, a start finds no route and is counted as skipped.
            lowest = min(self._served.get(r, 0) for r in routes)
            routes = [r for r in routes if self._served.get(r, 0) == lowest]
        for a, b in routes:
            callers = [d for d in self.devices[a] if d not in busy]
            callees = [d for d in self.devices[b] if d not in busy]
            if not callers or not callees:
                continue
            caller = self.rng.choice(callers) if self.mode == "random" else callers[0]
            callees = [d for d in callees if d != caller]
            if not callees:
                continue
            callee = self.rng.choice(callees) if self.mode == "random" else callees[0]
            self._served[a, b] = self._served.get((a, b), 0) + 1
            return caller, callee
        return None


@dataclass(frozen=True)
class LoadSettings:
    rate: float  #: calls started per second
    duration_s: float
    poisson: bool = False
    max_concurrent: int = 50
    hold_s: float = 3.0
    setup_timeout_s: float = 20.0
    request_timeout_s: float = 10.0  #: a command not answered in this long is a timeout
    late_ms: float = 10.0  #: a start later than this after its schedule counts as late
    pairing: PairingMode = "random"
    pairs: tuple[tuple[str, str], ...] = ()
    callers_on: str | None = None
    #: only calls whose path crosses this server (a transit server under test)
    via: str | None = None
    media: Literal["full", "none"] = "full"
    window_s: float = 5.0
    cooldown_s: float = 0.05  #: a device rests this long after its call before the next
    seed: int | None = None
    max_lag_ms: float = 50.0  #: the probe's own event-loop lag p99 above this: run invalid
    #: read each call this often while it is up (probe/calls.py ``sample``); None: never
    sample_s: float | None = None
    shard: Shard = Shard()
    #: the schedule's start, UNIX time (shards of one load share it); None: now, or for a
    #: shard of several the next aligned moment (Shard.start_at)
    start_at: float | None = None
    #: what each call does (wire/scenario.py); None: today's call, held ``hold_s``
    scenario: Scenario | None = None

    @property
    def the_scenario(self) -> Scenario:
        return self.scenario if self.scenario is not None else Scenario.default(self.hold_s)

    def plan(self, slot: int, rng: random.Random) -> Plan:
        """Call ``slot``'s draws: the same in every shard for a seeded run."""
        draws = random.Random(f"{self.seed}:{slot}") if self.seed is not None else rng
        return self.the_scenario.plan(draws)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.duration_s <= 0:
            raise ValueError("rate and duration must be positive")
        if self.max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")


@dataclass
class LoadReport:
    """What a load run did, besides the per-call figures in its recorder."""

    settings: LoadSettings
    recorder: Recorder
    scheduled: int = 0
    started: int = 0
    skipped_cap: int = 0  #: not started: the concurrency cap was reached
    skipped_no_devices: int = 0  #: not started: no idle pair of devices
    late: int = 0
    max_concurrent_seen: int = 0
    schedule_error: HdrHistogram = field(default_factory=new_histogram)
    watch: dict[str, float | None] = field(default_factory=dict)
    results: list[CallResult] = field(default_factory=list)
    probe_errors: int = 0  #: calls on which the probe itself failed (each counted, as failed)
    scheduled_total: int = 0  #: the whole schedule's calls, every shard's
    started_at: float | None = None  #: the schedule's start, UNIX time
    #: a fleet's shards merged into this report (probe/fleet.py): which, and what is wrong
    #: with them if they do not make the load whole (probe/summary.py ``shards_of``)
    shards: dict[str, Any] | None = None

    @property
    def fleet_problem(self) -> str | None:
        """Why the shards merged here are not the whole load (a shard missing, twice, ...)."""
        return self.shards.get("problem") if self.shards else None

    @property
    def valid(self) -> bool:
        """False when the probe itself lagged past its threshold, or failed on a call, or a
        fleet's shards do not add up to the load: blame the probes, not a server."""
        lag = self.watch.get("loop_lag_ms_p99")
        return ((lag is None or lag <= self.settings.max_lag_ms) and not self.probe_errors
                and self.fleet_problem is None)

    def summary(self) -> dict[str, object]:
        s = self.settings
        return {
            "scenario": s.the_scenario.to_dict(),
            "rate": s.rate, "poisson": s.poisson, "duration_s": s.duration_s,
            "max_concurrent": s.max_concurrent, "hold_s": s.hold_s, "pairing": s.pairing,
            "media": s.media, "callers_on": s.callers_on, "via": s.via,
            "scheduled": self.scheduled, "started": self.started,
            "skipped_cap": self.skipped_cap, "skipped_no_devices": self.skipped_no_devices,
            "late_starts": self.late, "max_concurrent_seen": self.max_concurrent_seen,
            "probe_errors": self.probe_errors,
            "shard": self.shards if self.shards is not None else {
                "index": s.shard.index, "count": s.shard.count,
                "scheduled_total": self.scheduled_total},
            "schedule_started_at": self.started_at,
            "schedule_error_ms": percentiles(self.schedule_error),
            "schedule_error_hist": encode(self.schedule_error),
            "probe": self.watch, "valid": self.valid,
            "figures": self.recorder.summary(),
            "timeseries": self.recorder.timeseries(),
            # the first few calls sampled while up (--sample), for report.html's plots
            "sampled_calls": [{"call": r.call, "series": r.series}
                              for r in self.results if r.series][:SAMPLED_CALLS_KEPT],
        }


async def check_ends(session: aiohttp.ClientSession, servers: list[Server],
                     result: CallResult, timeout_s: float = 5.0) -> dict[str, str]:
    """Ask every other server of a call's path how the call stands there now that it has
    ended at the caller's: ``ended:REASON``, ``state:STATE`` (still not ended after
    ``timeout_s``), ``unknown`` (it has no record of it) or ``unreachable``. The invariant
    "every call ended with a reason at every server of its path" (probe/stability.py)."""
    if result.call is None:
        return {}
    urls = {s.name: s.url for s in servers}
    call = result.call

    async def ask(name: str) -> tuple[str, str]:
        client = ServerClient(session, urls[name])
        try:
            info = await client.call(call, wait="ended", timeout_s=timeout_s)
        except ProbeError as exc:
            if exc.code == "unknown_call":
                return name, "unknown"
            return name, "unreachable" if exc.code in ("server_unreachable", "timeout") \
                else f"error:{exc.code}"
        if info.state == "ended":
            return name, f"ended:{info.reason}"
        return name, f"state:{info.state}"

    others = [name for name in dict.fromkeys(result.path)
              if name != result.server and name in urls]
    found = dict(await asyncio.gather(*(ask(name) for name in others)))
    if result.server in urls:
        found[result.server] = (f"ended:{result.reason}" if result.timeline.get("t_end")
                                else "state:unknown")
    return found


async def run_load(session: aiohttp.ClientSession, servers: list[Server],
                   settings: LoadSettings,
                   on_result: Callable[[CallResult], None] | None = None,
                   on_tick: Callable[[LoadReport, int], None] | None = None,
                   stop: asyncio.Event | None = None, keep_results: bool = True,
                   windowed: bool = True, ends: bool = False,
                   watch: LoopWatch | None = None) -> LoadReport:
    """Start calls on schedule for ``settings.duration_s`` (or until ``stop`` is set), then
    wait for the last to finish. For a long run (``probe soak``): ``keep_results`` False keeps
    only the few sampled calls, ``windowed`` False keeps no per-window figures (the caller
    keeps its own), and ``ends`` asks every server of each call's path how it ended there
    (:func:`check_ends`, in ``CallResult.ends``)."""
    shard = settings.shard
    if shard.count > 1 and settings.poisson and settings.seed is None:
        raise ValueError("shards of a Poisson schedule need one --seed (they must build the "
                         "same schedule)")
    rng = random.Random(settings.seed)
    scenario_rng = random.Random(settings.seed)  # each call's draws (unseeded runs)
    # Load pairs devices that speak the protocol both ways; a WHIP publisher or a WHEP player
    # (one way, and one call at a time) is called by name (``--pair``), not drawn at random.
    devices = {s.name: shard.devices([d.address for d in s.devices if d.kind == "device"])
               for s in lower_servers(servers)}
    path = TreePaths(servers)
    if settings.via is not None and not any(s.name == settings.via for s in servers):
        raise ValueError(f"--via {settings.via}: no such server in the tree")
    pairing = Pairing(settings.pairing, devices, list(settings.pairs), rng, settings.callers_on,
                      settings.via, path)
    everyone = iter_schedule(settings.rate, settings.duration_s, settings.poisson, rng)
    report = LoadReport(settings, Recorder(settings.window_s, windowed=windowed))
    busy: set[str] = set()
    calls = Tasks("load calls")  #: one task per call in progress
    loop = asyncio.get_running_loop()
    watch = watch if watch is not None else LoopWatch()

    async def one(caller: str, callee: str, scheduled: float, offset: float, late_ms: float,
                  slot: int) -> None:
        late = late_ms > settings.late_ms
        try:
            try:
                result = await run_call(session, servers, caller, callee, settings.hold_s,
                                        settings.setup_timeout_s, scheduled=scheduled,
                                        media=settings.media,
                                        request_timeout_s=settings.request_timeout_s,
                                        sample_s=settings.sample_s,
                                        plan=settings.plan(slot, scenario_rng))
            except Exception as exc:  # the probe's own bug: the call is counted, not lost
                report.probe_errors += 1
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                event(log, "probe_error", logging.ERROR, caller=caller, callee=callee,
                      error=f"{type(exc).__name__}: {exc}",
                      where=f"{frame.filename}:{frame.lineno} in {frame.name}")
                result = CallResult(caller=caller, callee=callee,
                                    server=split_address(caller)[0] or "",
                                    reason="probe_error", error="probe_error")
                result.timeline["t_sent"] = scheduled
            result.slot = slot
            result.late_ms = round(late_ms, 3)
            if keep_results or (result.series and sum(
                    1 for r in report.results if r.series) < SAMPLED_CALLS_KEPT):
                report.results.append(result)
            # every server the call was routed through (the tree path: the servers route
            # exactly on it), whether or not it got that far
            try:
                planned = path(split_address(caller)[0] or "", split_address(callee)[0] or "")
            except ProbeError:
                planned = list(result.path)  # the tree as discovered did not join them
            result.planned = list(planned)
            if ends:
                result.ends = await check_ends(session, servers, result)
            report.recorder.add(result.server, offset, result.outcome, result.intervals,
                                result.media, late, planned, result.hops, result.links,
                                result.senders)
            if on_result is not None:
                on_result(result)
            # The callee's server frees the callee when the hang-up reaches it; then the
            # directories settle for a moment before the pair may be used again.
            if result.call is not None:
                with contextlib.suppress(ProbeError, aiohttp.ClientError):
                    await ServerClient(session, find_device(servers, callee)[0].url).call(
                        result.call, wait="ended", timeout_s=3.0)
            await asyncio.sleep(settings.cooldown_s)
        finally:
            busy.discard(caller)
            busy.discard(callee)

    async with watch:
        now = time.time()
        start_wall = settings.start_at if settings.start_at is not None else (
            shard.start_at(now) if shard.count > 1 else now + 0.05)
        if start_wall < now - 1.0:
            raise ValueError(f"the schedule's start {start_wall:.3f} is {now - start_wall:.1f} s "
                             "in the past")
        start_mono = loop.time() + (start_wall - now)
        report.started_at = start_wall
        try:
            n = -1
            for slot, offset in enumerate(everyone):
                report.scheduled_total += 1
                if not shard.mine(slot):
                    continue
                n += 1
                report.scheduled += 1
                delay = start_mono + offset - loop.time()
                if stop is not None:
                    if not stop.is_set() and delay > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), delay)
                    if stop.is_set():
                        report.scheduled -= 1
                        report.scheduled_total -= 1
                        break
                elif delay > 0:
                    await asyncio.sleep(delay)
                error_ms = max(0.0, (loop.time() - start_mono - offset) * 1000)
                record_ms(report.schedule_error, error_ms)
                if on_tick is not None:
                    on_tick(report, n)
                if len(calls) >= settings.max_concurrent:
                    report.skipped_cap += 1
                    continue
                pair = pairing.pick(busy)
                if pair is None:
                    report.skipped_no_devices += 1
                    continue
                late = error_ms > settings.late_ms
                report.late += int(late)
                busy.update(pair)
                calls.spawn(one(*pair, start_wall + offset, offset, error_ms, slot),
                            f"call-{slot}")
                report.started += 1
                report.max_concurrent_seen = max(report.max_concurrent_seen, len(calls))
            if len(calls):
                scenario = settings.the_scenario
                ring = scenario.ring.high if scenario.ring is not None else 0.0
                await calls.wait(timeout=scenario.hold.high + ring
                                 + settings.setup_timeout_s + 30)
        finally:
            await calls.close()
    report.watch = watch.figures()
    return report
