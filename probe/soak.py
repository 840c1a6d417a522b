"""``probe soak``: open-loop load for hours, faults on a schedule, and each server judged on its
stability (probe/stability.py).

What runs at once, each an owned task of :class:`Soak`:

- the load (probe/load.py ``run_load``, streaming: no per-call list, no per-window histograms),
  every call's record into the history as it ends, and every server of its path asked how it
  ended there;
- a scraper reading every server's /metrics every ``scrape_s`` (and the probe's own memory);
- the nemesis (probe/nemesis.py), when a plan is given;
- a ticker that closes each window once its calls are in, prints a line for it, and rewrites
  the outputs (summary.json, report.html, timeseries.csv) so a run cut short keeps them.

Then the invariants are checked at idle (every call ended everywhere, no call or leg left,
tasks and open files back, every device back, every directory the same) and each server gets
its verdict. Stopping early (SIGINT/SIGTERM: ``stop``) ends the schedule, lets the calls up end,
undoes the faults still on, and still checks and reports everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from probe.calls import CallResult
from probe.load import LoadReport, LoadSettings, run_load
from probe.nemesis import Fault, Nemesis, Target
from probe.report import CallLog, write_soak
from probe.scrape import ServerWatch, parse, total
from probe.stability import CallRecord, Incident, StabilityRecorder, StabilitySettings
from probe.watch import LoopWatch
from wire.client import ProbeError, Server, ServerClient, lower_servers
from wire.logs import event
from wire.tasks import Tasks

log = logging.getLogger("probe.soak")


@dataclass(frozen=True)
class SoakSettings:
    load: LoadSettings
    stability: StabilitySettings = field(default_factory=StabilitySettings)
    scrape_s: float = 2.0  #: every server's /metrics this often
    ends: bool = True  #: ask every server of each call's path how it ended there
    idle_timeout_s: float = 60.0  #: how long the checks at the end wait for things to settle
    task_slack: int = 5  #: tasks at idle may be this many above the start's
    fd_slack: int = 4  #: open files too (a connection or two)


def rss_mb() -> float:
    """This process's resident memory now, MB (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def expected_devices(servers: list[Server]) -> dict[str, int]:
    """How many devices each server's directory holds when the tree is whole: a lower server
    its own, an upper server its subtree's."""
    parents = {s.name: s.parent for s in servers}
    out = {s.name: 0 for s in servers}
    for lower in lower_servers(servers):
        name: str | None = lower.name
        seen = 0
        while name is not None and seen <= len(parents):
            out[name] = out.get(name, 0) + len(lower.devices)
            name = parents.get(name)
            seen += 1
    return out


class Soak:
    def __init__(self, session: aiohttp.ClientSession, servers: list[Server],
                 settings: SoakSettings, plan: list[Fault] | None = None,
                 target: Target | None = None, out: Path | None = None,
                 stop: asyncio.Event | None = None,
                 line: Callable[[str], None] | None = None,
                 finish_summary: Callable[[dict[str, Any]], dict[str, Any]] | None = None
                 ) -> None:
        self.session = session
        self.servers = servers
        self.s = settings
        self.plan = plan or []
        self.target = target
        self.out = out
        self.stop = stop or asyncio.Event()
        self.line = line or (lambda text: None)
        #: the caller's part of the summary (objective, server metrics...): applied to every
        #: summary written
        self.finish_summary = finish_summary or (lambda summary: summary)
        self.t0 = 0.0
        self.recorder: StabilityRecorder | None = None
        self.loop_watch = LoopWatch()
        self.report: LoadReport | None = None
        self.faults: list[dict[str, Any]] = []
        self.nemesis_errors: list[str] = []
        self.ok_calls = 0
        self.done_calls = 0
        self._call_log: CallLog | None = None
        #: the outputs being rewritten in a thread (the last one is awaited before the final)
        self._writing: asyncio.Future[None] | None = None
        #: the soak's own tasks: its ticker, its summary writes, the waits at its end
        self._tasks = Tasks("soak")

    # ------------------------------------------------------------------ the run

    async def run(self) -> dict[str, Any]:
        load = self.s.load
        lead = 1.0
        self.t0 = time.time() + lead
        names = [s.name for s in self.servers]
        self.recorder = StabilityRecorder(names, self.t0, self.s.stability,
                                          expected_servers=len(self.servers),
                                          expected_devices=expected_devices(self.servers))
        recorder = self.recorder
        if self.out is not None:
            self._call_log = CallLog(self.out)
        watch = ServerWatch(self.session, {s.name: s.url for s in self.servers},
                            interval_s=self.s.scrape_s, on_sample=self._sample,
                            on_round=self._round)
        event(log, "soak.start", servers=len(self.servers), rate=load.rate,
              duration_s=load.duration_s, window_s=self.s.stability.window_s,
              faults=len(self.plan))
        try:
            async with watch:
                if self.out is not None:  # at once: t0 and the plan are known from the start
                    write_soak(self.out, self.finish_summary(self.summary(time.time(), None,
                                                                          final=False)))
                ticker = self._tasks.spawn(self._ticker(), "soak-ticker")
                try:
                    nemesis = (Nemesis(self.plan, self.target, self.t0, self._fault)
                               if self.plan and self.target is not None else None)
                    async with (nemesis if nemesis is not None else contextlib.nullcontext()):
                        self.report = await run_load(
                            self.session, self.servers, replace(load, start_at=self.t0),
                            on_result=self._result, stop=self.stop, keep_results=False,
                            windowed=False, ends=self.s.ends, watch=self.loop_watch)
                        recorder.load_ended = time.time()
                        if nemesis is not None and not self.stop.is_set():
                            # a fault planned past the load's end is still made and undone
                            waiting = self._tasks.spawn(nemesis.wait(), "faults")
                            stopped = self._tasks.spawn(self.stop.wait(), "stop")
                            try:
                                await asyncio.wait({waiting, stopped},
                                                   return_when=asyncio.FIRST_COMPLETED)
                            finally:
                                for task in (waiting, stopped):
                                    task.cancel()
                                await asyncio.gather(waiting, stopped, return_exceptions=True)
                    if nemesis is not None:
                        self.nemesis_errors = nemesis.errors
                    invariants = await self.invariants()
                    # the idle period's scrapes belong to the run: take one more round
                    await watch.sample()
                finally:
                    ticker.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await ticker
                    if self._writing is not None:  # its thread goes on: let it finish first
                        await asyncio.gather(self._writing, return_exceptions=True)
        finally:
            if self._call_log is not None:
                self._call_log.close()
        now = time.time()
        recorder.finish(now)
        summary = self.summary(now, invariants, final=True)
        summary["server_metrics"] = watch.summary()
        summary = self.finish_summary(summary)
        if self.out is not None:
            write_soak(self.out, summary)
        event(log, "soak.end", calls=recorder.calls, windows=recorder.closed_upto + 1,
              unstable=[n for n, v in summary["stability"]["servers"].items()
                        if v["verdict"] != "stable"],
              invariants_ok=invariants["ok"])
        return summary

    def _result(self, result: CallResult) -> None:
        assert self.recorder is not None
        self.done_calls += 1
        self.ok_calls += int(result.ok)
        if self._call_log is not None:
            self._call_log.write(result.to_dict())
        self.recorder.add_call(CallRecord.of(result, result.planned or result.path,
                                             result.ends), time.time())

    def _sample(self, server: str, t: float, sample: dict[str, float] | None,
                error: str | None) -> None:
        assert self.recorder is not None
        self.recorder.add_scrape(server, t, sample, error)

    def _round(self, t: float) -> None:
        assert self.recorder is not None
        self.recorder.sampled(t)
        self.recorder.probe_sample(t, rss_mb(), self.loop_watch.recent_max_ms())

    def _fault(self, fault: Fault, started: float, ended: float | None) -> None:
        assert self.recorder is not None
        if ended is None:
            incident = self.recorder.add_fault(fault.server, fault.kind, started, None,
                                               fault.describe())
            self.faults.append({"server": fault.server, "kind": fault.kind,
                                "what": fault.describe(), "start_s": round(started - self.t0, 1),
                                "end_s": None, "_incident": incident})
            self.line(f"fault at {started - self.t0:.0f} s: {fault.server} {fault.describe()}")
            return
        for made in self.faults:
            if made["server"] == fault.server and made["kind"] == fault.kind and \
                    made["end_s"] is None:
                made["end_s"] = round(ended - self.t0, 1)
                incident: Incident = made["_incident"]
                incident.end = ended
                break

    async def _ticker(self) -> None:
        assert self.recorder is not None
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            closed = self.recorder.tick(now)
            if not closed:
                continue
            for index in closed:
                self.line(self._window_line(index, now))
            if self.out is not None:
                summary = self.finish_summary(self.summary(now, None, final=False))
                self._writing = self._tasks.spawn(asyncio.to_thread(write_soak, self.out,
                                                                    summary), "write")
                await asyncio.shield(self._writing)

    def _window_line(self, index: int, now: float) -> str:
        assert self.recorder is not None
        recorder = self.recorder
        w = recorder.s.window_s
        rows = {name: rows[index] for name, rows in recorder.rows.items() if len(rows) > index}
        calls = max((r["calls"] for r in rows.values()), default=0)
        failed = {n: r["failed"] for n, r in rows.items() if r["failed"]}
        worst_lag = max(((r["loop_lag_p95_ms"] or 0, n) for n, r in rows.items()),
                        default=(0, "-"))
        down = [n for n, r in rows.items() if r["failed_scrapes"]]
        restarted = [n for n, r in rows.items() if r["restarts"]]
        probe = recorder.probe_rows[index] if index < len(recorder.probe_rows) else {}
        text = (f"window {index} [{index * w:g}-{(index + 1) * w:g} s]: up to {calls} calls "
                f"a server, {self.done_calls} done so far ({self.ok_calls} ok); worst loop lag "
                f"{worst_lag[0]:g} ms ({worst_lag[1]}); probe {probe.get('rss_mb')} MB")
        if failed:
            text += f"; failed by server {failed}"
        if down:
            text += f"; not scraped: {', '.join(down)}"
        if restarted:
            text += f"; restarted: {', '.join(restarted)}"
        return text

    # ------------------------------------------------------------------ the end: invariants

    async def _metrics(self) -> dict[str, dict[str, float] | None]:
        async def one(server: Server) -> tuple[str, dict[str, float] | None]:
            try:
                async with self.session.get(f"{server.url}/metrics",
                                            timeout=aiohttp.ClientTimeout(total=3)) as r:
                    return server.name, parse(await r.text()) if r.status == 200 else None
            except (aiohttp.ClientError, TimeoutError, ValueError):
                return server.name, None
        return dict(await asyncio.gather(*(one(s) for s in self.servers)))

    async def invariants(self) -> dict[str, Any]:
        """The checks at idle (see the module's docstring), each waiting up to
        ``idle_timeout_s`` for the tree to settle; which servers broke which."""
        assert self.recorder is not None
        deadline = time.monotonic() + self.s.idle_timeout_s
        broken: dict[str, list[str]] = {}
        idle = await self._idle(deadline)
        for name, seen in idle["servers"].items():
            broken.setdefault(name, []).extend(seen["broken"])
        devices = await self._devices_back(deadline)
        for name, missing in devices["missing"].items():
            broken.setdefault(name, []).append(
                f"{len(missing)} device(s) not back: {', '.join(missing[:5])}")
        directories = await self._directories(deadline)
        for name in directories["differ"]:
            broken.setdefault(name, []).append("its directory differs from the others'")
        ends = self.recorder.ends(time.time())
        for name, count in ends["by_server"].items():
            broken.setdefault(name, []).append(f"{count} call(s) not ended with a reason there")
        broken = {n: b for n, b in broken.items() if b}
        return {"ok": not broken and ends["ok"], "broken_at": broken,
                "calls_ended_everywhere": ends, "idle": idle, "devices_back": devices,
                "directories_agree": directories}

    async def _idle(self, deadline: float) -> dict[str, Any]:
        """0 calls and 0 legs at every server; tasks and open files back near the start."""
        assert self.recorder is not None
        while True:
            found = await self._metrics()
            servers: dict[str, Any] = {}
            for name, sample in found.items():
                base = self.recorder.servers[name].baseline
                if sample is None or base is None:
                    servers[name] = {"readable": False, "broken": ["its /metrics could not be "
                                                                   "read at the end"]}
                    continue
                calls, legs = total(sample, "relay_calls"), total(sample, "relay_legs")
                tasks, fds = total(sample, "relay_asyncio_tasks"), \
                    total(sample, "process_open_fds")
                seen: dict[str, Any] = {
                    "calls": calls, "legs": legs, "tasks": tasks, "tasks_start": base.tasks,
                    "open_fds": fds, "open_fds_start": base.open_fds}
                seen["tasks_not_back"] = (tasks is not None and base.tasks is not None
                                          and tasks > base.tasks + self.s.task_slack)
                seen["open_fds_not_back"] = (fds is not None and base.open_fds is not None
                                             and fds > base.open_fds + self.s.fd_slack)
                why = []
                if calls:
                    why.append(f"{calls:g} call(s) left at idle")
                if legs:
                    why.append(f"{legs:g} leg(s) left at idle")
                if seen["tasks_not_back"]:
                    why.append(f"{tasks:g} tasks at idle, {base.tasks:g} at the start")
                if seen["open_fds_not_back"]:
                    why.append(f"{fds:g} open files at idle, {base.open_fds:g} at the start")
                seen["broken"] = why
                servers[name] = seen
            ok = all(not s["broken"] for s in servers.values())
            if ok or time.monotonic() > deadline:
                return {"ok": ok, "servers": servers}
            await asyncio.sleep(1.0)

    async def _device_sets(self) -> dict[str, set[str] | None]:
        async def one(server: Server) -> tuple[str, set[str] | None]:
            try:
                devices = await ServerClient(self.session, server.url, 5.0).devices()
            except ProbeError:
                return server.name, None
            return server.name, {d.address for d in devices}
        return dict(await asyncio.gather(*(one(s) for s in lower_servers(self.servers))))

    async def _devices_back(self, deadline: float) -> dict[str, Any]:
        """Every device registered at the start is registered again."""
        start = {s.name: {d.address for d in s.devices} for s in lower_servers(self.servers)}
        while True:
            now = await self._device_sets()
            missing = {name: sorted(start[name] - (now.get(name) or set()))
                       for name in start}
            missing = {n: m for n, m in missing.items() if m}
            if not missing or time.monotonic() > deadline:
                return {"ok": not missing, "missing": missing,
                        "devices": sum(len(d) for d in start.values())}
            await asyncio.sleep(1.0)

    async def _directories(self, deadline: float) -> dict[str, Any]:
        """Every server lists the same servers with the same parents as at the start, and
        the root's devices are the lower servers' own."""
        start = {(s.name, s.role, s.parent) for s in self.servers}
        root = next((s for s in self.servers if s.parent is None), None)

        async def listing(server: Server) -> tuple[str, set[tuple[str, str, str | None]] | None]:
            try:
                entries = await ServerClient(self.session, server.url, 5.0).servers()
            except ProbeError:
                return server.name, None
            return server.name, {(e.name, e.role, e.parent) for e in entries}

        while True:
            lists = dict(await asyncio.gather(*(listing(s) for s in self.servers)))
            differ = sorted(n for n, found in lists.items() if found != start)
            devices_ok = True
            if root is not None:
                try:
                    at_root = {d.address for d in await ServerClient(
                        self.session, root.url, 5.0).devices()}
                    own = await self._device_sets()
                    devices_ok = at_root == set().union(*(d or set() for d in own.values()))
                except ProbeError:
                    devices_ok = False
                if not devices_ok and root.name not in differ:
                    differ.append(root.name)
            if not differ or time.monotonic() > deadline:
                return {"ok": not differ, "differ": differ,
                        "servers": len(start), "root_devices_match": devices_ok}
            await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ outputs

    def summary(self, now: float, invariants: dict[str, Any] | None, final: bool
                ) -> dict[str, Any]:
        assert self.recorder is not None
        recorder = self.recorder
        stability = recorder.judge(now, invariants, final=final)
        stability["faults"] = [{k: v for k, v in f.items() if not k.startswith("_")}
                               for f in self.faults]
        stability["fault_errors"] = list(self.nemesis_errors)
        stability["invariants"] = invariants
        stability["final"] = final
        unstable = [n for n, v in stability["servers"].items() if v["verdict"] != "stable"]
        stability["stable"] = not unstable and (invariants is None or invariants["ok"]) \
            and not self.nemesis_errors
        run = self.report.summary() if self.report is not None else {
            "rate": self.s.load.rate, "duration_s": self.s.load.duration_s, "valid": True,
            "probe": {}, "figures": None}
        return {"command": "soak", "t0": self.t0, "elapsed_s": round(now - self.t0, 1),
                "runs": [{**run, "offset_s": 0.0}] if self.report is not None else [],
                "stability": stability,
                "trends": {"window_s": recorder.s.window_s, "servers": recorder.rows,
                           "probe": recorder.probe_rows}}


def describe_stability(stability: dict[str, Any]) -> list[str]:
    """The verdicts, incidents and invariants for the console."""
    lines = [f"stability over {stability['windows']} windows of {stability['window_s']:g} s "
             f"(warm-up {stability['warmup_s']:g} s): "
             + ("every server stable" if stability.get("stable") else "NOT STABLE")]
    for name, found in stability["servers"].items():
        text = f"  {name:<12} {found['verdict']}"
        if found["reasons"]:
            text += ": " + "; ".join(found["reasons"])
        if found.get("recovery_s") is not None:
            text += f" (recovered in {found['recovery_s']:g} s)"
        lines.append(text)
        rss = (found.get("leaks") or {}).get("rss_mb")
        if rss is not None:
            lines.append(f"  {'':<12} memory {rss['per_hour']:+.3g} MB/h ({rss['range'][0]:.3g}"
                         f" to {rss['range'][1]:.3g}) after warm-up: {rss['why']}")
    for incident in stability["incidents"]:
        if incident["kind"] == "degraded":
            lines.append(f"  incident: {incident['server']} degraded {incident['start_s']:g}-"
                         f"{incident['end_s']:g} s")
            continue
        made = "made by the plan" if incident["made"] else "found"
        lines.append(
            f"  incident: {incident['server']} {incident['kind']} at {incident['start_s']:g} s "
            f"({made}; {incident['detail']}): {incident['calls_hit']} calls hit "
            f"{incident['outcomes']}"
            + "".join(f"; {what} {incident[key]} s" for key, what in (
                ("detect_s", "detected in"), ("first_ok_call_s", "first call through it ok after"),
                ("directory_whole_s", "directories whole after")) if incident[key] is not None)
            + (f"; LOST {incident['lost']}" if incident["lost"] else ""))
    invariants = stability.get("invariants")
    if invariants is not None:
        ends = invariants["calls_ended_everywhere"]
        lines.append(f"  invariants: {'all hold' if invariants['ok'] else 'BROKEN'} (calls "
                     f"ended everywhere: {ends['checked']} answers, {ends['broken']} broken, "
                     f"{ends['excused']} explained by an incident; idle clean: "
                     f"{invariants['idle']['ok']}; devices back: "
                     f"{invariants['devices_back']['ok']}; directories agree: "
                     f"{invariants['directories_agree']['ok']})")
        for name, broken in invariants["broken_at"].items():
            lines.append(f"    {name}: {'; '.join(broken)}")
    for error in stability.get("fault_errors") or []:
        lines.append(f"  FAULT NOT MADE: {error}")
    probe = (stability.get("probe") or {}).get("memory_mb") or {}
    if probe:
        trend = probe.get("trend") or {}
        lines.append(f"  probe memory: {probe['start']} -> {probe['end']} MB, peak "
                     f"{probe['peak']} MB"
                     + (f", {trend['per_hour']:+.3g} MB/h after warm-up ({trend['why']})"
                        if trend else ""))
    return lines


def print_line(text: str) -> None:
    sys.stderr.write(f"soak: {text}\n")
    sys.stderr.flush()


def dump(summary: dict[str, Any]) -> str:
    """The summary as one JSON line, without what only the files need (the trends, the runs'
    encoded figures: summary.json has them)."""
    out = {k: v for k, v in summary.items() if k != "trends"}
    out["runs"] = [{k: v for k, v in run.items() if k not in ("figures", "timeseries")}
                   for run in summary.get("runs", [])]
    return json.dumps(out)
