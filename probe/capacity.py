"""Capacity search: per lower server, or for one server as a transit (``--via NAME``), raise the
call rate step by step until the objective is missed, then bisect between the last passing and the
first failing rate.

Each step is a whole open-loop load run (``probe/load.py``). Per lower server: every caller under
the server searched (callees elsewhere), judged on that server's figures only. With ``via``: every
call's path crosses the server under test, and the step is judged on the calls that crossed it. A
step also fails when starts were skipped (cap reached, or no idle pair of devices: the load was
not really offered), and a step in which the probe itself lagged stops the search as invalid.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from probe.histograms import percentiles
from probe.load import LoadReport, LoadSettings, run_load
from probe.objective import Objective
from probe.scrape import ServerWatch
from wire.client import Server, lower_servers


@dataclass(frozen=True)
class GiveWay:
    """Where a server is taken to have given way under load: past any of these at its hop."""

    transit_p99_ms: float = 20.0  #: its calls' transit p99 (the p99 over the step's calls)
    loop_lag_p99_ms: float = 50.0  #: its event loop's lag p99 (the /metrics bound)
    cpu_pct: float = 90.0  #: of one core (a server is one Python process)
    loss_in: float = 0.01  #: share of the video sent to it lost on the way

    def __post_init__(self) -> None:
        for signal in SIGNALS:
            if not self.limit(signal) > 0:
                raise ValueError(f"the give-way limit {signal} must be positive")

    def limit(self, signal: str) -> float:
        return float(getattr(self, signal))


@dataclass(frozen=True)
class CapacitySettings:
    start_rate: float = 1.0
    factor: float = 2.0
    max_rate: float = 1000.0
    bisect_steps: int = 3
    max_skipped: float = 0.01  #: fraction of scheduled starts that may be skipped
    pause_s: float = 1.0  #: between steps: devices settle
    give_way: GiveWay = field(default_factory=GiveWay)  #: which server gave way: its limits

    def __post_init__(self) -> None:
        if self.start_rate <= 0 or self.factor <= 1 or self.max_rate < self.start_rate:
            raise ValueError("need start_rate > 0, factor > 1, max_rate >= start_rate")


SIGNALS = ("transit_p99_ms", "loop_lag_p99_ms", "cpu_pct", "loss_in")


def signals(report: LoadReport, server_metrics: dict[str, dict[str, Any]]
            ) -> dict[str, dict[str, float | None]]:
    """Per server the calls of a step crossed, what says it is giving way (``SIGNALS``): from the
    hops the servers measured (probe/hopstats.py) and their /metrics over the step."""
    hops = report.recorder.hops.hops
    out: dict[str, dict[str, float | None]] = {}
    for name in sorted(report.recorder.crossing):
        totals = hops.get(name)
        transit = percentiles(totals.transit_p99_ms) if totals is not None else None
        metrics = server_metrics.get(name, {})
        out[name] = {"transit_p99_ms": transit["p99"] if transit else None,
                     "loop_lag_p99_ms": metrics.get("loop_lag_p99_ms_at_most"),
                     "cpu_pct": metrics.get("cpu_pct"),
                     "loss_in": totals.loss_in if totals is not None else None}
    return out


def gave_way(steps: list[Step], failed_rate: float | None, limits: GiveWay
             ) -> dict[str, Any] | None:
    """Which server gave way first: going up the steps' rates to the first failing one, the
    first step where a server is past a limit; in that step, the server furthest past one
    (value / limit). If none is past a limit even at the first failing rate, the one nearest
    to a limit there, with ``past_limit`` false. None without a failing rate."""
    if failed_rate is None:
        return None
    upto = sorted((s for s in steps if s.rate <= failed_rate), key=lambda s: s.rate)
    failing = next((s for s in upto if s.rate == failed_rate and not s.passed), None)
    if failing is None:
        return None

    def worst(step: Step) -> tuple[float, float, str, str, float] | None:
        """The server furthest past a limit; of two as far (the loop lag is read in coarse
        buckets), the one further past its limits altogether."""
        found = []
        for server, values in step.signals.items():
            ratios = [(value / limits.limit(signal), signal, value) for signal in SIGNALS
                      if (value := values.get(signal)) is not None]
            if ratios:
                ratio, signal, value = max(ratios)
                found.append((ratio, sum(r for r, _, _ in ratios), server, signal, value))
        return max(found) if found else None

    for step in upto:
        top = worst(step)
        if top is not None and top[0] >= 1.0:
            break
    else:
        step, top = failing, worst(failing)
        if top is None:
            return {"server": None, "rate": failed_rate, "past_limit": False,
                    "at_failing_rate": failing.signals}
    ratio, _, server, signal, value = top
    return {"server": server, "by": signal, "value": value, "limit": limits.limit(signal),
            "rate": step.rate, "past_limit": ratio >= 1.0, "at_failing_rate": failing.signals}


def describe_gave_way(found: dict[str, Any] | None) -> str | None:
    """One line for the console, or None."""
    if not found:
        return None
    if found["server"] is None:
        return f"at {found['rate']:g} calls/s no server's hop figures were measured"
    what = (f"{found['by']} {found['value']:g} (limit {found['limit']:g}) "
            f"at {found['rate']:g} calls/s")
    if found["past_limit"]:
        return f"gave way first: {found['server']}, {what}"
    return f"no server past a limit; nearest: {found['server']}, {what}"


@dataclass
class Step:
    server: str
    rate: float
    passed: bool
    why: list[str]
    report: LoadReport
    #: each server's /metrics over this step (probe/scrape.py), when they were watched
    server_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    via: bool = False  #: the server was searched as a transit: judged on calls crossing it

    @property
    def signals(self) -> dict[str, dict[str, float | None]]:
        """Per server crossed, whether it is giving way (see ``signals``)."""
        return signals(self.report, self.server_metrics)

    def row(self) -> dict[str, Any]:
        figures = _figures(self.report, self.server, self.via)
        phases = figures.summary()["phases"] if figures else {}

        def p95(name: str) -> float | None:
            found = phases.get(name)
            return found["p95"] if found else None

        return {"server": self.server, "as": "transit" if self.via else "caller",
                "rate": self.rate, "passed": self.passed, "why": self.why,
                "calls": figures.calls if figures else 0,
                "success_rate": figures.success_rate if figures else None,
                "response_p95_ms": p95("response_ms"), "setup_p95_ms": p95("setup_ms"),
                "media_latency_p95_ms": p95("media_latency_ms"),
                "max_concurrent": self.report.max_concurrent_seen,
                "valid": self.report.valid,
                # where the load went: every server's CPU and loop lag during the step
                "server_cpu_pct": {n: m.get("cpu_pct") for n, m in self.server_metrics.items()},
                "server_loop_lag_p99_ms_at_most": {
                    n: m.get("loop_lag_p99_ms_at_most") for n, m in self.server_metrics.items()},
                # per server crossed: transit p99 at its hop, loop lag, CPU, loss on arrival
                "signals": self.signals}


def _figures(report: LoadReport, server: str, via: bool) -> Any:
    recorder = report.recorder
    return (recorder.crossing if via else recorder.servers).get(server)


@dataclass
class Capacity:
    """What the search found for one server."""

    server: str
    via: bool = False  #: searched as a transit server
    rate: float | None = None  #: highest rate that met the objective
    concurrent: int | None = None  #: the most calls up at once at that rate
    failed_rate: float | None = None  #: lowest rate seen to miss it
    failed_because: list[str] = field(default_factory=list)
    invalid: bool = False
    steps: list[Step] = field(default_factory=list)
    limits: GiveWay = field(default_factory=GiveWay)

    @property
    def gave_way(self) -> dict[str, Any] | None:
        """Which server gave way first, by what (see ``gave_way``)."""
        return gave_way(self.steps, self.failed_rate, self.limits)

    def summary(self) -> dict[str, Any]:
        return {"server_under_test": self.server, "as": "transit" if self.via else "caller",
                "rate": self.rate, "concurrent": self.concurrent,
                "failed_rate": self.failed_rate, "failed_because": self.failed_because,
                "invalid": self.invalid, "gave_way": self.gave_way}


def judge(report: LoadReport, server: str, objective: Objective, media: bool,
          max_skipped: float, via: bool = False) -> list[str]:
    """Why a step fails for ``server`` (empty: it passed)."""
    why: list[str] = []
    figures = _figures(report, server, via)
    if figures is None:
        return ["no calls"]
    why += objective.missed(figures, media)
    skipped = report.skipped_cap + report.skipped_no_devices
    if report.scheduled and skipped > max_skipped * report.scheduled:
        why.append(f"{skipped} of {report.scheduled} starts skipped "
                   f"({report.skipped_cap} at the cap, {report.skipped_no_devices} without "
                   f"idle devices)")
    if report.fleet_problem is not None:
        why.append(f"the probes' shards do not make the whole load ({report.fleet_problem}): "
                   "run invalid")
    elif not report.valid:
        why.append("probe lagged: run invalid")
    return why


#: Runs one step's load and gives its report: by default this probe alone (``run_load``); a
#: fleet's leader runs its shard and merges the others' (probe/fleet.py ``Leader.run_step``).
RunStep = Callable[[LoadSettings], Awaitable[LoadReport]]


async def search(session: aiohttp.ClientSession, servers: list[Server], load: LoadSettings,
                 objective: Objective, settings: CapacitySettings,
                 on_step: Callable[[Step], None] | None = None,
                 watch: ServerWatch | None = None,
                 run_step: RunStep | None = None) -> dict[str, Capacity]:
    """``watch``: read every server's /metrics over each step (``Step.server_metrics``). With
    ``load.via``, one search: the rate the server ``load.via`` sustains as a transit. A step
    whose fleet of probes was not whole (a shard's result missing) ends the whole search."""
    if run_step is None:
        async def run_step(offered: LoadSettings) -> LoadReport:
            return await run_load(session, servers, offered)
    found: dict[str, Capacity] = {}
    if load.via is not None:
        found[load.via] = await _search_one(run_step, load.via, load, objective, settings,
                                            on_step, watch, via=True)
        return found
    for server in lower_servers(servers):
        if server.devices:
            found[server.name] = await _search_one(run_step, server.name, load, objective,
                                                   settings, on_step, watch)
            if any(step.report.fleet_problem for step in found[server.name].steps):
                break
    return found


async def _search_one(run_step: RunStep, name: str, load: LoadSettings, objective: Objective,
                      settings: CapacitySettings, on_step: Callable[[Step], None] | None,
                      watch: ServerWatch | None, via: bool = False) -> Capacity:
    capacity = Capacity(name, via, limits=settings.give_way)
    offered = replace(load, via=name) if via else replace(load, callers_on=name)

    async def step(rate: float) -> Step:
        async with (watch.window() if watch is not None
                    else contextlib.nullcontext({})) as tracks:
            report = await run_step(replace(offered, rate=rate))
        why = judge(report, name, objective, load.media == "full", settings.max_skipped, via)
        done = Step(name, rate, not why, why, report,
                    {server: track.summary() for server, track in tracks.items()}, via)
        capacity.steps.append(done)
        if on_step is not None:
            on_step(done)
        await asyncio.sleep(settings.pause_s)
        return done

    def passed(done: Step) -> None:
        if capacity.rate is None or done.rate > capacity.rate:
            capacity.rate = done.rate
            capacity.concurrent = done.report.max_concurrent_seen

    def failed(done: Step) -> None:
        if capacity.failed_rate is None or done.rate < capacity.failed_rate:
            capacity.failed_rate, capacity.failed_because = done.rate, done.why
        capacity.invalid = capacity.invalid or not done.report.valid

    rate = settings.start_rate
    while rate <= settings.max_rate:
        done = await step(rate)
        if not done.passed:
            failed(done)
            break
        passed(done)
        rate = round(rate * settings.factor, 3)
    if capacity.failed_rate is None or capacity.invalid:
        return capacity  # never failed up to max_rate, or the probe cannot be trusted
    low, high = capacity.rate or 0.0, capacity.failed_rate
    for _ in range(settings.bisect_steps):
        mid = round((low + high) / 2, 3)
        if mid <= 0 or mid in (low, high):
            break
        done = await step(mid)
        if done.passed:
            passed(done)
            low = mid
        else:
            failed(done)
            high = mid
            if not done.report.valid:
                break
    return capacity
