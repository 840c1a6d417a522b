"""Each server's stability over a long run (``probe soak``), as pure logic: the history in (calls
as they end, every /metrics scrape, the faults the probe made, each with its time), windows and
verdicts out. Time is an argument; nothing here does I/O.

The shape is Jepsen's: the load and a nemesis write a history; a checker judges it against
stated rules and says which were broken, with what shows it. Here the history is kept bounded
(an hours-long run must fit): calls go into the window of their scheduled start and are folded
into that window's figures when it closes; scrapes keep only what the trends need.

- **Windows** (``window_s``): per server, what its calls did (the calls that crossed it: setup,
  media tail, freezes, failures charged to it; as the callers' server: response time; its own
  transit) and what its /metrics said (memory, open files, tasks, legs, calls, event-loop lag,
  CPU, scrapes that failed, restarts). A window closes once every call started in it must
  have ended (``close_after_s``).
- **Incidents**: a restart (``process_start_time_seconds`` changed), a server the probe could
  not scrape (unreachable), a run of unstable windows (degraded), and each fault the probe made.
  For each: the calls it hit and how they ended, the time to detect (the calls up through it
  ended) and to recover (a call through it succeeding again, every directory whole again,
  every device back).
- **Blame**: a failed call is charged to one server: the one on its path with an incident at the
  time, else the one that turned it away, else the one holding its media back most, else its
  caller's server. So an outage is the server's that failed, not its neighbours'.
- **Verdicts**: ``stable``, or ``unstable`` with reasons: restarts, time unreachable, unstable
  windows (a judged figure above its band: :data:`JUDGED`), leaks and drifts (probe/trend.py),
  slow recovery, an invariant broken there.
"""

from __future__ import annotations

import bisect
import itertools
import math
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from probe.scrape import CPU, START, lag_bound_of, total
from probe.trend import MAX_POINTS, Growth, leak, outside, theil_sen

#: what decides an unstable window: per signal, the smallest excursion above the band of the
#: server's own windows that counts (median + max(K sigmas, this)), in the signal's units, and
#: what it says in words. Loop lag is read in the relay's histogram buckets (0.5 .. 1000 ms).
#: The figures are each window's typical bad moment, not its single worst one (a lone garbage
#: collection, or a burst of keyframes, is not a server giving way): loop lag's p95, the
#: median call's transit p99.
JUDGED: dict[str, tuple[float, str]] = {
    "loop_lag_p95_ms": (30.0, "event-loop lag p95"),
    "transit_p99_ms": (25.0, "transit p99 of its median call (its own hold on packets)"),
    "response_p95_ms": (50.0, "response p95 (as the callers' server)"),
    "blamed": (2.0, "failures charged to it"),
}
K_SIGMA = 5.0
#: a window with failures charged to a server counts only if they are at least this share of
#: the calls that crossed it (a lone failure in a busy window is noise)
BLAMED_SHARE = 0.1
#: leaks: the least growth over the judged span that counts, per resource (its own noise: a
#: malloc arena, a task or a socket coming and going with the calls)
LEAK_FLOORS = {"rss_mb": 2.0, "open_fds": 4.0, "tasks": 5.0}
#: ... and for memory, this share of the process's own (its median over the span) if more:
#: a server's resident memory climbs for minutes after its warm-up as the garbage of closed
#: calls waits for the collector and the allocator keeps its highest mark (measured: 1-2 MB in
#: three minutes on 125 MB servers that do not leak; 19 MB for a leak of 64 KB a call)
LEAK_SHARE_RSS = 0.05
#: the probe's own memory (it keeps no per-call list: flat after warm-up)
PROBE_LEAK_FLOOR_MB = 4.0
#: seconds around an incident inside which a failed call is charged to it
BLAME_SLACK_S = 2.0
#: recent calls kept for an incident found later than the calls it hit (seconds: a failed
#: scrape finds an outage within a scrape interval or two)
RECENT_S = 300.0
EXAMPLES = 10
#: points per slope in a window's report while the run goes on (the final one: MAX_POINTS)
LIVE_POINTS = 150
MAX_END_PROBLEMS = 1000
#: incidents a failure can be charged to (a degraded window is judged, not a cause)
CAUSES = ("kill", "restart", "unreachable", "stop", "duty", "cut", "limit", "loss")


def _p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


@dataclass(slots=True)
class CallRecord:
    """What the checker keeps of a call (the rest is in calls.jsonl)."""

    t_sent: float  #: scheduled start, UNIX time
    t_end: float  #: when it ended (or the probe gave up on it)
    ok: bool
    failure: str | None
    detail: str | None
    caller_server: str
    planned: tuple[str, ...]  #: the tree path it was to cross
    reached: tuple[str, ...]  #: the servers it reached (as the caller's server recorded it)
    call: str | None = None
    response_ms: float | None = None
    setup_ms: float | None = None
    media_p95_ms: float | None = None  #: the worse direction's own p95
    media_max_ms: float | None = None
    freezes: int = 0
    media_s: float = 0.0
    frames: int = 0
    frames_lost: int = 0
    mos: float | None = None  #: the worse direction's
    #: per server of the path, its own transit p99 (video, the slower direction)
    transit: dict[str, float] = field(default_factory=dict)
    #: per server of the reached path, how the call stood there after it ended ("ended:REASON",
    #: "unknown", "state:STATE", "unreachable": the end check, probe/soak.py)
    ends: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, result: Any, planned: Iterable[str], ends: Mapping[str, str] | None = None
           ) -> CallRecord:
        """From a probe/calls.py CallResult."""
        outcome = result.outcome
        intervals = result.intervals
        media = [m for m in result.media.values() if m]
        p95 = [m["latency_ms_p95"] for m in media if m.get("latency_ms_p95") is not None]
        worst = [m["latency_ms_max"] for m in media if m.get("latency_ms_max") is not None]
        mos = [m["mos"] for m in media if m.get("mos") is not None]
        transit: dict[str, float] = {}
        for hop in result.hops:
            slowest = [video["transit_ms_p99"] for kinds in hop.get("streams", {}).values()
                       if (video := kinds.get("video") or {}).get("transit_ms_p99") is not None]
            if slowest:
                transit[hop["server"]] = max(slowest)
        end = result.timeline.get("t_end") or result.timeline.get("t_response") or \
            result.timeline.get("t_sent", 0.0)
        # a server is judged on its own answer: from when the probe sent the command, not from
        # its schedule (a probe that started it late, busy with its own report, is not the
        # server's doing; the load's figures keep the schedule's intervals)
        response = intervals.get("response_ms")
        if response is not None and result.late_ms:
            response = max(0.0, response - result.late_ms)
        return cls(
            t_sent=result.timeline.get("t_sent", 0.0), t_end=end, ok=outcome.ok,
            failure=outcome.failure, detail=outcome.detail, caller_server=result.server,
            planned=tuple(planned), reached=tuple(result.path), call=result.call,
            response_ms=response, setup_ms=intervals.get("setup_ms"),
            media_p95_ms=max(p95) if p95 else None, media_max_ms=max(worst) if worst else None,
            freezes=sum(m.get("gaps") or 0 for m in media),
            media_s=sum(m.get("duration_s") or 0.0 for m in media),
            frames=sum(m.get("frames") or 0 for m in media),
            frames_lost=sum(m.get("frames_lost") or 0 for m in media),
            mos=min(mos) if mos else None, transit=transit, ends=dict(ends or {}))

    def crosses(self, server: str) -> bool:
        return server in self.planned or server in self.reached


@dataclass(slots=True)
class Point:
    """What the checker keeps of one scrape of one server."""

    t: float
    rss_mb: float | None
    open_fds: float | None
    tasks: float | None
    legs: float | None
    calls: float | None
    cpu_s: float | None
    started: float | None  #: process_start_time_seconds
    directory_servers: float | None
    directory_devices: float | None
    lag: dict[float, float]  #: the loop-lag histogram's cumulative buckets

    @classmethod
    def of(cls, t: float, sample: Mapping[str, float]) -> Point:
        lag = {}
        prefix = "relay_event_loop_lag_seconds_bucket{le="
        for key, value in sample.items():
            if key.startswith(prefix):
                lag[float(key[len(prefix):-1])] = value
        rss = total(sample, "process_resident_memory_bytes")
        return cls(t, rss / 1e6 if rss is not None else None,
                   total(sample, "process_open_fds"), total(sample, "relay_asyncio_tasks"),
                   total(sample, "relay_legs"), total(sample, "relay_calls"),
                   total(sample, CPU), sample.get(START),
                   total(sample, "relay_directory_servers"),
                   total(sample, "relay_directory_devices"), lag)


@dataclass(frozen=True, slots=True)
class EndProblem:
    """A server of a call's path that did not say the call had ended with a reason."""

    call: str | None
    server: str
    was: str  #: "unknown", "unreachable" or "state:STATE"
    t_sent: float
    t_end: float


@dataclass
class Incident:
    """Something that happened to one server: found in the history, or made by the probe."""

    server: str
    #: restart | unreachable | degraded | a fault's kind (kill, stop, duty, cut, limit, loss)
    kind: str
    start: float
    end: float | None = None  #: None: still going
    made: bool = False  #: a fault of the probe's plan
    detail: str = ""
    #: what found it, besides (a fault made and the restart or gap it caused)
    seen_as: list[str] = field(default_factory=list)
    last_seen: float | None = None  #: unreachable/restart: the last scrape before it
    #: a found incident that a fault made: the fault's own incident
    cause: Incident | None = None
    # -- what it did, filled as calls come in
    calls_hit: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)
    up_ended_at: float | None = None  #: the last end of the calls up through it at its start
    #: when a call through it worked again: the first call that succeeded and was set up
    #: (media both ways) after the incident began
    first_ok_after: float | None = None
    #: when every directory was whole again after it (None: they never broke, or not yet)
    whole_at: float | None = None

    def blame_window(self, now: float, recover_by: float) -> tuple[float, float]:
        """When a failed call through this server is charged to it: from a little before the
        incident until it recovered (or ``recover_by`` after its end: a restarted server's
        children and devices come back only after it)."""
        end = self.end if self.end is not None else now
        back = [t for t in (self.first_ok_after, self.whole_at) if t is not None]
        stop = max(end, *back) if back else end + recover_by
        return (self.last_seen if self.last_seen is not None else self.start) - BLAME_SLACK_S, \
            stop + BLAME_SLACK_S

    def hit(self, record: CallRecord, now: float, recover_by: float) -> bool:
        """Take a call that crossed this server; whether the incident hit it."""
        if record.ok:
            # set up, not started: a call started while the server was stopped and set up
            # once it went on says when it went on
            up = record.t_sent + (record.setup_ms or 0.0) / 1000
            if up > self.start and (self.first_ok_after is None or up < self.first_ok_after):
                self.first_ok_after = up
        begin, stop = self.blame_window(now, recover_by)
        if record.t_end < begin or record.t_sent > stop:
            return False
        if not self.made and not record.ok and self.last_seen is not None and \
                self.last_seen < record.t_end < self.start:
            # found by a scrape that failed: it began no later than the first call through it
            # that failed after the last good scrape
            self.start = record.t_end
        self.calls_hit += 1
        how = "ok" if record.ok else f"{record.failure}:{record.detail}"
        self.outcomes[how] += 1
        since = self.last_seen if self.last_seen is not None else self.start
        if record.t_sent < self.start and record.t_end >= since:  # up through it as it began
            self.up_ended_at = max(self.up_ended_at or record.t_end, record.t_end)
        if not record.ok and len(self.examples) < EXAMPLES:
            self.examples.append({"call": record.call, "t_sent": round(record.t_sent, 3),
                                  "ended": how})
        return True


@dataclass
class _Acc:
    """One server's window as it fills."""

    calls: int = 0
    ok: int = 0
    response: list[float] = field(default_factory=list)
    setup: list[float] = field(default_factory=list)
    media_p95: list[float] = field(default_factory=list)
    media_max: list[float] = field(default_factory=list)
    transit: list[float] = field(default_factory=list)
    mos: list[float] = field(default_factory=list)
    freezes: int = 0
    media_s: float = 0.0
    frames: int = 0
    frames_lost: int = 0
    points: list[Point] = field(default_factory=list)
    prev: Point | None = None  #: the last scrape before the window (its deltas span it)
    failed_scrapes: int = 0
    restarts: int = 0


@dataclass
class _Window:
    index: int
    servers: dict[str, _Acc] = field(default_factory=dict)
    failed: list[CallRecord] = field(default_factory=list)  #: charged when the window closes
    probe_rss_mb: float | None = None
    probe_lag_ms: float | None = None

    def acc(self, server: str) -> _Acc:
        found = self.servers.get(server)
        if found is None:
            found = self.servers[server] = _Acc()
        return found


def _floats() -> array[float]:
    return array("d")


@dataclass
class _Server:
    """What is kept of one server for the whole run: its trend points, compactly (8 bytes a
    figure: 40 bytes a scrape, 72 KB an hour at one scrape every 2 s)."""

    t: array[float] = field(default_factory=_floats)
    rss_mb: array[float] = field(default_factory=_floats)
    open_fds: array[float] = field(default_factory=_floats)
    tasks: array[float] = field(default_factory=_floats)
    started: array[float] = field(default_factory=_floats)
    last: Point | None = None
    baseline: Point | None = None  #: its first scrape (idle, before the load)
    unreachable: Incident | None = None  #: open while it cannot be scraped


@dataclass
class StabilitySettings:
    window_s: float = 30.0
    #: a window is judged once every call started in it must have ended
    close_after_s: float = 60.0
    #: resource trends are read from this long after each process's start (or the run's)
    warmup_s: float = 180.0
    #: recovery slower than this (incident start -> everything back) makes a server unstable
    max_recovery_s: float = 60.0
    #: the setup timeout: a call may fail this long after an incident's end and still be its
    recover_by_s: float = 20.0


class StabilityRecorder:
    """The checker's bounded history of one soak, fed as the run goes (see the module's
    docstring); ``rows`` are the closed windows' figures per server."""

    def __init__(self, servers: Iterable[str], t0: float, settings: StabilitySettings,
                 expected_servers: int | None = None,
                 expected_devices: Mapping[str, int] | None = None) -> None:
        self.names = list(servers)
        self.t0 = t0
        self.s = settings
        self.servers = {name: _Server() for name in self.names}
        self.windows: dict[int, _Window] = {}
        self.closed_upto = -1  #: windows up to this index are closed
        #: closed windows: per server, one row each, in order
        self.rows: dict[str, list[dict[str, Any]]] = {name: [] for name in self.names}
        self.probe_rows: list[dict[str, Any]] = []
        self.incidents: list[Incident] = []
        self.recent: deque[CallRecord] = deque()
        self.late_records = 0  #: calls that came after their window had closed
        self.blamed: Counter[str] = Counter()  #: failures charged, by server, over the run
        self.failures: Counter[str] = Counter()
        self.calls = 0
        self.expected_servers = expected_servers or len(self.names)
        #: devices each lower server had at the start (and the root's whole tree's)
        self.expected_devices = dict(expected_devices or {})
        #: (t, whole): when the directories as the scrapes read them became whole or not
        self.convergence: list[tuple[float, bool]] = []
        #: the probe's own memory: times and RSS (MB)
        self.probe_t: array[float] = array("d")
        self.probe_rss: array[float] = array("d")
        #: the end check (every server of a call's path asked after it ended): how many asked,
        #: and the answers that were not "ended with a reason"
        self.ends_checked = 0
        self.end_problems: list[EndProblem] = []
        self.end_problems_dropped = 0
        #: when the load stopped (the scrapes after it are idle, not steady load): set by the
        #: runner; None while it goes on
        self.load_ended: float | None = None
        self._most = MAX_POINTS  #: points per slope (judge)

    # ------------------------------------------------------------------ input

    def window_of(self, t: float) -> int:
        return max(0, int((t - self.t0) // self.s.window_s))

    def _window(self, index: int) -> _Window | None:
        if index <= self.closed_upto:
            return None
        found = self.windows.get(index)
        if found is None:
            found = self.windows[index] = _Window(index)
        return found

    def add_call(self, record: CallRecord, now: float) -> None:
        self.calls += 1
        if not record.ok:
            self.failures[f"{record.failure}:{record.detail}"] += 1
        for server, how in record.ends.items():
            self.ends_checked += 1
            if not how.startswith("ended:"):
                if len(self.end_problems) < MAX_END_PROBLEMS:
                    self.end_problems.append(EndProblem(record.call, server, how,
                                                        record.t_sent, record.t_end))
                else:
                    self.end_problems_dropped += 1
        self.recent.append(record)
        while self.recent and self.recent[0].t_end < now - RECENT_S:
            self.recent.popleft()
        for incident in self.incidents:
            if record.crosses(incident.server):
                incident.hit(record, now, self.s.recover_by_s)
        window = self._window(self.window_of(record.t_sent))
        if window is None:
            self.late_records += 1
            return
        for server in dict.fromkeys([*record.planned, *record.reached]):
            if server not in self.servers:
                continue
            acc = window.acc(server)
            acc.calls += 1
            acc.ok += int(record.ok)
            if record.setup_ms is not None and record.ok:
                acc.setup.append(record.setup_ms)
            if record.media_p95_ms is not None:
                acc.media_p95.append(record.media_p95_ms)
            if record.media_max_ms is not None:
                acc.media_max.append(record.media_max_ms)
            if record.mos is not None:
                acc.mos.append(record.mos)
            acc.freezes += record.freezes
            acc.media_s += record.media_s
            acc.frames += record.frames
            acc.frames_lost += record.frames_lost
            if server in record.transit:
                acc.transit.append(record.transit[server])
        if record.response_ms is not None and record.caller_server in self.servers:
            window.acc(record.caller_server).response.append(record.response_ms)
        if not record.ok:
            window.failed.append(record)

    def add_scrape(self, server: str, t: float, sample: Mapping[str, float] | None,
                   error: str | None = None) -> None:
        """One scrape of one server: its /metrics parsed, or why it failed."""
        seen = self.servers[server]
        window = self._window(self.window_of(t))
        if sample is None:
            if window is not None:
                window.acc(server).failed_scrapes += 1
            if seen.unreachable is None:
                seen.unreachable = self._open(Incident(
                    server, "unreachable", t, detail=error or "its /metrics did not answer",
                    last_seen=seen.last.t if seen.last is not None else None))
            return
        point = Point.of(t, sample)
        if seen.baseline is None:
            seen.baseline = point
        restarted = seen.last is not None and point.started is not None and \
            seen.last.started is not None and point.started != seen.last.started
        if seen.unreachable is not None:
            incident, seen.unreachable = seen.unreachable, None
            incident.end = t
            if restarted:
                incident.kind = "restart"
                if incident.cause is not None:
                    incident.cause.seen_as.append("restart")
                incident.detail = (f"a new process started {point.started - self.t0:.1f} s "
                                   f"into the run; {incident.detail}")
        elif restarted:
            assert seen.last is not None
            self._open(Incident(server, "restart", seen.last.t, end=point.started or t,
                                detail=f"a new process started {point.started - self.t0:.1f} "
                                       "s into the run, between two scrapes",
                                last_seen=seen.last.t))
        if restarted and window is not None:
            window.acc(server).restarts += 1
        previous, seen.last = seen.last, point
        for name, value in (("rss_mb", point.rss_mb), ("open_fds", point.open_fds),
                            ("tasks", point.tasks)):
            getattr(seen, name).append(value if value is not None else math.nan)
        seen.t.append(t)
        seen.started.append(point.started if point.started is not None else math.nan)
        if window is not None:
            acc = window.acc(server)
            if not acc.points:
                acc.prev = previous
            acc.points.append(point)

    def sampled(self, t: float) -> None:
        """Every server has just been scraped: are the directories whole as they read?"""
        whole = True
        for name, seen in self.servers.items():
            point = seen.last
            if point is None or seen.unreachable is not None:
                whole = False
                break
            if point.directory_servers is not None and \
                    point.directory_servers < self.expected_servers:
                whole = False
            expected = self.expected_devices.get(name)
            if expected is not None and point.directory_devices is not None and \
                    point.directory_devices < expected:
                whole = False
        if not self.convergence or self.convergence[-1][1] != whole:
            self.convergence.append((t, whole))
            broke_at = self.convergence[-2][0] if len(self.convergence) > 1 else None
            if whole and broke_at is not None:
                # whole again: the end of the incidents the break is put down to
                for incident in self._broken_by(broke_at):
                    if incident.whole_at is None:
                        incident.whole_at = t

    def _broken_by(self, at: float) -> list[Incident]:
        """The incidents a break of the directories that began at ``at`` is put down to: those
        on then; with none on, those that ended up to ``recover_by_s`` before it (a parent
        notices a child gone only when its heartbeats stop). Not one that ended before another
        began: a fault on one server is not slow to recover because the next, on another
        server, broke the directories after it."""
        began = [i for i in self.incidents
                 if i.kind != "degraded" and i.start - BLAME_SLACK_S <= at]
        on = [i for i in began if i.end is None or at <= i.end]
        return on or [i for i in began if i.end + self.s.recover_by_s >= at]

    def add_fault(self, server: str, kind: str, start: float, end: float | None,
                  detail: str) -> Incident:
        """A fault the probe made (its end: when it was undone; None while it is on)."""
        return self._open(Incident(server, kind, start, end=end, made=True, detail=detail))

    def probe_sample(self, t: float, rss_mb: float, lag_ms: float | None = None) -> None:
        """The probe's own memory (and loop lag) now."""
        self.probe_t.append(t)
        self.probe_rss.append(rss_mb)
        window = self._window(self.window_of(t))
        if window is not None:
            window.probe_rss_mb = rss_mb
            if lag_ms is not None:
                window.probe_lag_ms = max(window.probe_lag_ms or 0.0, lag_ms)

    def _open(self, incident: Incident) -> Incident:
        """A new incident takes the recent calls that crossed its server. One found on a
        server the probe has just made a fault on is what that fault did: said so."""
        if not incident.made:
            # the server's latest fault on (or just undone) when it was found
            fault = max((f for f in self.incidents if f.made and f.server == incident.server
                         and f.start - 1 <= incident.start
                         <= (f.end or incident.start) + self.s.recover_by_s),
                        key=lambda f: f.start, default=None)
            if fault is not None:
                fault.seen_as.append(incident.kind)
                incident.cause = fault
                incident.detail += (f" (the fault made: {fault.kind} at "
                                    f"{fault.start - self.t0:.1f} s)")
        self.incidents.append(incident)
        now = max((r.t_end for r in self.recent), default=incident.start)
        for record in self.recent:
            if record.crosses(incident.server):
                incident.hit(record, now, self.s.recover_by_s)
        return incident

    # ------------------------------------------------------------------ windows

    def tick(self, now: float) -> list[int]:
        """Close the windows whose calls must all have ended by ``now``; their indexes."""
        closed = []
        while True:
            index = self.closed_upto + 1
            end = self.t0 + (index + 1) * self.s.window_s
            if end + self.s.close_after_s > now:
                return closed
            self._close(self.windows.pop(index, None) or _Window(index), now)
            closed.append(index)

    def finish(self, now: float) -> None:
        """Close every window up to ``now`` (the run is over and its calls have ended)."""
        last = self.window_of(now)
        while self.closed_upto < last:
            index = self.closed_upto + 1
            self._close(self.windows.pop(index, None) or _Window(index), now)

    def charge(self, record: CallRecord, now: float) -> str:
        """The server a failed call is charged to (see the module's docstring)."""
        causes = []
        for order, incident in enumerate(self.incidents):
            if incident.kind not in CAUSES or not record.crosses(incident.server):
                continue
            begin, stop = incident.blame_window(now, self.s.recover_by_s)
            if record.t_end >= begin and record.t_sent <= stop:
                rank = (0 if incident.made else 1 if incident.kind == "restart" else 2)
                causes.append((rank, order, incident.server))
        if causes:
            return min(causes)[2]
        if record.reached and record.failure in ("rejected", "busy_device", "unknown_device",
                                                 "server_unreachable"):
            return record.reached[-1]  # it was turned away there
        if record.transit:
            return max(record.transit, key=lambda s: record.transit[s])
        return record.caller_server

    def _close(self, window: _Window, now: float) -> None:
        self.closed_upto = window.index
        blamed: Counter[str] = Counter()
        for record in window.failed:
            blamed[self.charge(record, now)] += 1
        self.blamed.update(blamed)
        start = window.index * self.s.window_s
        for name in self.names:
            acc = window.servers.get(name) or _Acc()
            self.rows[name].append(self._row(acc, start, blamed[name]))
        self.probe_rows.append({"t_s": start, "rss_mb": _r(window.probe_rss_mb, 1),
                                "loop_lag_ms": _r(window.probe_lag_ms, 1)})

    def _row(self, acc: _Acc, start: float, blamed: int) -> dict[str, Any]:
        points = acc.points
        row: dict[str, Any] = {
            "t_s": start, "calls": acc.calls, "ok": acc.ok, "failed": acc.calls - acc.ok,
            "blamed": blamed,
            "success_rate": _r(acc.ok / acc.calls, 4) if acc.calls else None,
            "response_p95_ms": _r(_p(acc.response, 95)), "setup_p95_ms": _r(_p(acc.setup, 95)),
            "media_p95_ms": _r(_p(acc.media_p95, 95)),
            "media_max_ms": _r(max(acc.media_max)) if acc.media_max else None,
            # the median call's: a server that stalls holds every call's packets, a burst
            # from one sender only that call's
            "transit_p99_ms": _r(_p(acc.transit, 50)),
            "freezes": acc.freezes,
            "freezes_per_min": _r(acc.freezes / acc.media_s * 60, 2) if acc.media_s else None,
            "frame_loss": _r(acc.frames_lost / (acc.frames + acc.frames_lost), 5)
            if acc.frames + acc.frames_lost else None,
            "mos_p5": _r(_p(acc.mos, 5), 2),
            "failed_scrapes": acc.failed_scrapes, "restarts": acc.restarts}
        for key in ("rss_mb", "open_fds", "tasks"):
            values = sorted(getattr(p, key) for p in points if getattr(p, key) is not None)
            row[key] = _r(values[len(values) // 2], 2) if values else None
        for key in ("legs", "calls"):
            values = [getattr(p, key) for p in points if getattr(p, key) is not None]
            row[f"{key}_max"] = max(values) if values else None
        row["loop_lag_p95_ms"] = row["cpu_pct"] = None
        if points:
            first = acc.prev if acc.prev is not None else points[0]
            last = points[-1]
            if first.started == last.started and last.t > first.t:
                if first.cpu_s is not None and last.cpu_s is not None:
                    row["cpu_pct"] = _r((last.cpu_s - first.cpu_s) / (last.t - first.t) * 100, 1)
                moved = {b: c - first.lag.get(b, 0.0) for b, c in last.lag.items()}
                # p95, not p99: a garbage collection or one burst of keyframes is a few of a
                # window's samples; a server that stalls is many
                row["loop_lag_p95_ms"] = lag_bound_of(moved, 0.95)
        return row

    # ------------------------------------------------------------------ the verdict

    def judge(self, now: float, invariants: Mapping[str, Any] | None = None,
              final: bool = True) -> dict[str, Any]:
        """The verdict per server over the windows closed so far (see the module's docstring),
        the incidents with what they did, and the probe's own memory. Not ``final`` (a window's
        report while the run goes on): the trends from fewer points, quicker (the probe's loop
        runs the judgement; 400 points cost it 90 ms for seven servers, 150 points 20)."""
        invariants = invariants or {}
        self._most = MAX_POINTS if final else LIVE_POINTS
        self._degraded()
        out: dict[str, Any] = {}
        for name in self.names:
            out[name] = self._verdict(name, now, invariants)
        return {"window_s": self.s.window_s, "warmup_s": self.s.warmup_s,
                "windows": self.closed_upto + 1, "servers": out,
                "incidents": [self._incident(i, now) for i in self.incidents],
                "blamed": dict(sorted(self.blamed.items())),
                "probe": self._probe(), "late_records": self.late_records}

    def judged(self, name: str, signal: str) -> list[float | None]:
        """A server's figure per window as it is judged. The response is timed by the probe:
        a window's worst stall of the probe's own loop is taken off it (a probe busy with its
        report reads an answer late; that is not the server's doing)."""
        values = [row.get(signal) for row in self.rows[name]]
        if signal != "response_p95_ms":
            return values
        lags = [row.get("loop_lag_ms") or 0.0 for row in self.probe_rows]
        return [None if v is None else max(0.0, v - (lags[i] if i < len(lags) else 0.0))
                for i, v in enumerate(values)]

    def unstable_windows(self, name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """A server's unstable windows (start/end offsets, which signals and their values),
        and the band of each judged signal."""
        rows = self.rows[name]
        flagged: dict[int, dict[str, Any]] = {}
        bands = {}
        for signal, (floor, _) in JUDGED.items():
            values = self.judged(name, signal)
            found, flags = outside(values, K_SIGMA, floor)
            if found is None:
                continue
            bands[signal] = {"median": _r(found.median), "sigma": _r(found.sigma),
                             "top": _r(found.upper(K_SIGMA, floor))}
            for i, flag in enumerate(flags):
                if not flag:
                    continue
                if signal == "blamed" and rows[i]["calls"] and \
                        rows[i]["blamed"] < BLAMED_SHARE * rows[i]["calls"]:
                    continue
                flagged.setdefault(i, {"start_s": rows[i]["t_s"],
                                       "end_s": rows[i]["t_s"] + self.s.window_s,
                                       "signals": {}})["signals"][signal] = values[i]
        return [flagged[i] for i in sorted(flagged)], bands

    def _degraded(self) -> None:
        """Runs of unstable windows become a server's ``degraded`` incidents."""
        kept = [i for i in self.incidents if i.kind != "degraded"]
        for name in self.names:
            windows, _ = self.unstable_windows(name)
            spans: list[list[float]] = []
            for w in windows:
                if spans and abs(spans[-1][1] - w["start_s"]) < 1e-6:
                    spans[-1][1] = w["end_s"]
                else:
                    spans.append([w["start_s"], w["end_s"]])
            for start, end in spans:
                kept.append(Incident(name, "degraded", self.t0 + start, end=self.t0 + end,
                                     detail="unstable windows"))
        self.incidents = kept

    def _restarts(self, name: str) -> int:
        started = {s for s in self.servers[name].started if not math.isnan(s)}
        return max(0, len(started) - 1)

    def _leaks(self, name: str) -> dict[str, Any]:
        """Each resource's trend in the longest stretch of one process after its warm-up
        (outside its incidents), and whether it leaks (probe/trend.py ``leak``)."""
        seen = self.servers[name]
        segments: list[list[int]] = []
        for i, started in enumerate(seen.started):
            if segments and (started == seen.started[segments[-1][0]] or (
                    math.isnan(started) and math.isnan(seen.started[segments[-1][0]]))):
                segments[-1].append(i)
            else:
                segments.append([i])
        best: list[int] = []
        disturbed = self._disturbed(name)
        until = self.load_ended if self.load_ended is not None else math.inf
        for indexes in segments:
            began = seen.started[indexes[0]]
            since = max(seen.t[indexes[0]], began if not math.isnan(began) else 0.0,
                        self.t0) + self.s.warmup_s
            usable = [i for i in indexes if since <= seen.t[i] <= until
                      and not disturbed(seen.t[i])]
            if len(usable) > len(best):
                best = usable
        if len(best) < 6:
            return {"judged": False, "why": f"{len(best)} samples after warm-up "
                                            f"({self.s.warmup_s:g} s): too few"}
        ts = [seen.t[i] for i in best]
        out: dict[str, Any] = {"judged": True, "since_s": _r(ts[0] - self.t0, 1),
                               "span_s": _r(ts[-1] - ts[0], 1)}
        for key, floor in LEAK_FLOORS.items():
            values = [getattr(seen, key)[i] for i in best]
            if key == "rss_mb":
                floor = max(floor, LEAK_SHARE_RSS * sorted(values)[len(values) // 2])
            found = leak(ts, values, floor, most=self._most)
            if found is not None:
                out[key] = _growth(found)
        return out

    def _disturbed(self, name: str) -> Callable[[float], bool]:
        """Whether a moment is inside one of this server's incidents (not steady load): a
        binary search over the incidents' spans, sorted once per judgement."""
        spans = sorted((i.start, i.end if i.end is not None else math.inf)
                       for i in self.incidents if i.server == name and i.kind != "degraded")
        starts = [start for start, _ in spans]
        reach = list(itertools.accumulate((end for _, end in spans), max))

        def inside(t: float) -> bool:
            # of the spans that began by t, the furthest end: is t before it?
            began = bisect.bisect_right(starts, t)
            return began > 0 and reach[began - 1] >= t
        return inside

    def _drifts(self, name: str, unstable: list[dict[str, Any]]) -> dict[str, Any]:
        """Each judged figure's slope over the steady windows after warm-up; a drift is one
        that adds up to its floor over the run with a range above zero."""
        bad = {round(w["start_s"], 6) for w in unstable}
        out: dict[str, Any] = {}
        for signal, (floor, _) in JUDGED.items():
            if signal == "blamed":
                continue
            pts = [(row["t_s"], value) for row, value in zip(
                       self.rows[name], self.judged(name, signal), strict=True)
                   if value is not None and row["t_s"] >= self.s.warmup_s
                   and round(row["t_s"], 6) not in bad]
            slope = theil_sen([p[0] for p in pts], [p[1] for p in pts]) if len(pts) >= 6 \
                else None
            if slope is None:
                continue
            out[signal] = {"per_hour": _r(slope.slope * 3600),
                           "range": [_r(slope.low * 3600), _r(slope.high * 3600)],
                           "over_run": _r(slope.growth),
                           "drifting": slope.low > 0 and slope.growth >= floor}
        return out

    def _verdict(self, name: str, now: float, invariants: Mapping[str, Any]) -> dict[str, Any]:
        reasons: list[str] = []
        unstable, bands = self.unstable_windows(name)
        incidents = [i for i in self.incidents if i.server == name and i.kind != "degraded"]
        restarts = self._restarts(name)
        if restarts:
            reasons.append(f"restarted {restarts} time{'s' if restarts > 1 else ''}")
        for incident in incidents:
            if incident.made:
                reasons.append(f"fault made: {incident.kind} ({incident.detail})")
        down = sum((i.end if i.end is not None else now) - (i.last_seen or i.start)
                   for i in incidents if i.kind == "unreachable")
        if down > 0:
            reasons.append(f"unreachable for {down:.0f} s")
        if unstable:
            spans = ", ".join(f"{w['start_s']:g}-{w['end_s']:g} s" for w in unstable[:6])
            more = f" and {len(unstable) - 6} more" if len(unstable) > 6 else ""
            which = sorted({JUDGED[s][1] for w in unstable for s in w["signals"]})
            reasons.append(f"{len(unstable)} unstable window{'s' if len(unstable) > 1 else ''}"
                           f" ({spans}{more}): {'; '.join(which)} above its band")
        leaks = self._leaks(name)
        for key, unit in (("rss_mb", "MB"), ("open_fds", "open files"), ("tasks", "tasks")):
            found = leaks.get(key)
            if not found or not found["leaking"]:
                continue
            if key != "rss_mb" and not _not_back(invariants, name, key):
                found["leaking"] = False
                found["why"] = "back to its start at idle: it follows the calls"
                continue
            reasons.append(f"{key} leaks: {found['per_hour']:+.3g} {unit}/h "
                           f"({found['range'][0]:.3g} to {found['range'][1]:.3g})")
        drifts = self._drifts(name, unstable)
        for signal, found in drifts.items():
            if found["drifting"]:
                reasons.append(f"{JUDGED[signal][1]} drifts: {found['per_hour']:+.3g} ms/h")
        recovery = [self._recovery(i, now) for i in incidents]
        slowest = max((r["recovery_s"] for r in recovery if r["recovery_s"] is not None),
                      default=None)
        if slowest is not None and slowest > self.s.max_recovery_s:
            reasons.append(f"slow recovery: {slowest:.0f} s (more than "
                           f"{self.s.max_recovery_s:g} s)")
        if any(r["recovered"] is False for r in recovery):
            reasons.append("did not recover before the run ended")
        reasons.extend(f"invariant broken: {b}"
                       for b in (invariants.get("broken_at") or {}).get(name, []))
        return {"verdict": "unstable" if reasons else "stable", "reasons": reasons,
                "restarts": restarts, "unstable_windows": unstable, "bands": bands,
                "leaks": leaks, "drifts": drifts, "recovery_s": slowest,
                "blamed_failures": self.blamed.get(name, 0),
                "incidents": [f"{i.kind}@{i.start - self.t0:.1f}s" for i in incidents]}

    def _whole_after(self, incident: Incident) -> tuple[float | None, bool]:
        """When the directories were whole again after the first break put down to this
        incident (None: none was), and whether one still is at the end. From the whole
        history: a restart is found only once the server answers again, maybe after the
        directories were whole (then ``whole_at``, set as the scrapes come, missed it)."""
        for (broke_at, whole), (at, _) in itertools.zip_longest(
                self.convergence, self.convergence[1:], fillvalue=(None, None)):
            if whole or not any(i is incident for i in self._broken_by(broke_at)):
                continue
            return at, at is None
        return None, False

    def _recovery(self, incident: Incident, now: float) -> dict[str, Any]:
        start = incident.start
        if incident.kind == "degraded":  # back once its windows are steady again
            end = incident.end if incident.end is not None else now
            done = end < self.t0 + (self.closed_upto + 1) * self.s.window_s
            return {"first_ok_call_s": None, "directory_whole_s": None,
                    "recovery_s": _r(end - start, 1) if done else None, "recovered": done}
        first_ok = incident.first_ok_after
        back, broke = self._whole_after(incident)
        parts = [first_ok - start if first_ok is not None else None,
                 back - start if back is not None else None]
        never = (first_ok is None and incident.calls_hit > 0) or (broke and back is None)
        known = [p for p in parts if p is not None]
        return {"first_ok_call_s": _r(parts[0], 1), "directory_whole_s": _r(parts[1], 1),
                "recovery_s": _r(max(known), 1) if known and not never else None,
                "recovered": False if never else (True if known else None)}

    def _incident(self, incident: Incident, now: float) -> dict[str, Any]:
        detect = (max(0.0, incident.up_ended_at - incident.start)
                  if incident.up_ended_at is not None else None)
        out = {"server": incident.server, "kind": incident.kind, "made": incident.made,
               "start_s": _r(incident.start - self.t0, 1),
               "end_s": _r(incident.end - self.t0, 1) if incident.end is not None else None,
               "detail": incident.detail, "seen_as": incident.seen_as,
               "calls_hit": incident.calls_hit,
               "outcomes": dict(incident.outcomes.most_common()),
               "detect_s": _r(detect, 2), **self._recovery(incident, now),
               "examples": incident.examples,
               "lost": [{"call": p.call, "server": p.server, "was": p.was}
                        for p in self.end_problems
                        if self._excused(p, now) is None and p.server == incident.server
                        and incident.start - BLAME_SLACK_S <= p.t_end
                        and p.t_sent <= (incident.end or now)][:EXAMPLES]}
        if incident.last_seen is not None:
            out["last_seen_s"] = _r(incident.last_seen - self.t0, 1)
        return out

    def _probe(self) -> dict[str, Any]:
        if not self.probe_t:
            return {}
        until = self.load_ended if self.load_ended is not None else math.inf
        pts = [(t, rss) for t, rss in zip(self.probe_t, self.probe_rss, strict=True)
               if self.t0 + self.s.warmup_s <= t <= until]
        out: dict[str, Any] = {"memory_mb": {"start": _r(self.probe_rss[0], 1),
                                             "end": _r(self.probe_rss[-1], 1),
                                             "peak": _r(max(self.probe_rss), 1)}}
        found = leak([p[0] for p in pts], [p[1] for p in pts], PROBE_LEAK_FLOOR_MB,
                     most=self._most)
        if found is not None:
            out["memory_mb"]["trend"] = _growth(found)
        return out

    def _excused(self, problem: EndProblem, now: float) -> Incident | None:
        """The incident that explains a call's missing end at a server: the server restarted
        (its record went with the process) or could not be asked (it was down, or cut off),
        during the call or just after. None: nothing explains it, an invariant is broken."""
        if problem.was not in ("unknown", "unreachable"):
            return None
        for incident in self.incidents:
            if incident.server != problem.server or incident.kind not in CAUSES:
                continue
            begin, stop = incident.blame_window(now, self.s.recover_by_s)
            if problem.t_end + 10.0 >= begin and problem.t_sent <= stop:
                return incident
        return None

    def ends(self, now: float) -> dict[str, Any]:
        """The invariant "every call ended with a reason at every server of its path", over
        every call checked: the answers that break it, and those an incident explains."""
        broken = [p for p in self.end_problems if self._excused(p, now) is None]
        by_server = Counter(p.server for p in broken)
        return {"ok": not broken and not self.end_problems_dropped,
                "checked": self.ends_checked,
                "excused": len(self.end_problems) - len(broken),
                "broken": len(broken) + self.end_problems_dropped,
                "by_server": dict(sorted(by_server.items())),
                "examples": [{"call": p.call, "server": p.server, "was": p.was,
                              "t_sent_s": _r(p.t_sent - self.t0, 1)}
                             for p in broken[:EXAMPLES]]}


def _growth(found: Growth) -> dict[str, Any]:
    return {"per_hour": _r(found.per_hour()), "range": [_r(found.slope.low * 3600),
                                                        _r(found.slope.high * 3600)],
            "over_span": _r(found.slope.growth), "samples": found.slope.n,
            "leaking": found.leaking, "why": found.why}


def _not_back(invariants: Mapping[str, Any], server: str, key: str) -> bool:
    """The idle check at the end found this server's ``key`` (tasks, open_fds) above its start
    (True when there was no idle check: the slope alone decides)."""
    idle = (invariants.get("idle") or {}).get("servers", {}).get(server)
    if not idle:
        return True
    return bool(idle.get(f"{key}_not_back"))
