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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from probe.client import Server, lower_servers
from probe.load import LoadReport, LoadSettings, run_load
from probe.objective import Objective
from probe.scrape import ServerWatch


@dataclass(frozen=True)
class CapacitySettings:
    start_rate: float = 1.0
    factor: float = 2.0
    max_rate: float = 1000.0
    bisect_steps: int = 3
    max_skipped: float = 0.01  #: fraction of scheduled starts that may be skipped
    pause_s: float = 1.0  #: between steps: devices settle

    def __post_init__(self) -> None:
        if self.start_rate <= 0 or self.factor <= 1 or self.max_rate < self.start_rate:
            raise ValueError("need start_rate > 0, factor > 1, max_rate >= start_rate")


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
                    n: m.get("loop_lag_p99_ms_at_most") for n, m in self.server_metrics.items()}}


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

    def summary(self) -> dict[str, Any]:
        return {"server_under_test": self.server, "as": "transit" if self.via else "caller",
                "rate": self.rate, "concurrent": self.concurrent,
                "failed_rate": self.failed_rate, "failed_because": self.failed_because,
                "invalid": self.invalid}


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
    if not report.valid:
        why.append("probe lagged: run invalid")
    return why


async def search(session: aiohttp.ClientSession, servers: list[Server], load: LoadSettings,
                 objective: Objective, settings: CapacitySettings,
                 on_step: Callable[[Step], None] | None = None,
                 watch: ServerWatch | None = None) -> dict[str, Capacity]:
    """``watch``: read every server's /metrics over each step (``Step.server_metrics``). With
    ``load.via``, one search: the rate the server ``load.via`` sustains as a transit."""
    found: dict[str, Capacity] = {}
    if load.via is not None:
        found[load.via] = await _search_one(session, servers, load.via, load, objective,
                                            settings, on_step, watch, via=True)
        return found
    for server in lower_servers(servers):
        if server.devices:
            found[server.name] = await _search_one(session, servers, server.name, load,
                                                   objective, settings, on_step, watch)
    return found


async def _search_one(session: aiohttp.ClientSession, servers: list[Server], name: str,
                      load: LoadSettings, objective: Objective, settings: CapacitySettings,
                      on_step: Callable[[Step], None] | None,
                      watch: ServerWatch | None, via: bool = False) -> Capacity:
    capacity = Capacity(name, via)
    offered = replace(load, via=name) if via else replace(load, callers_on=name)

    async def step(rate: float) -> Step:
        async with (watch.window() if watch is not None
                    else contextlib.nullcontext({})) as tracks:
            report = await run_load(session, servers, replace(offered, rate=rate))
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
