"""What each server says about itself during a probe run: its ``/metrics``, read at the start,
every few seconds, and at the end.

The probe's own figures say how a server looked from outside; these say what it was doing: its
CPU, memory, legs and tasks (peaks included), how late its event loop ran, and what its counters
moved by over the run (calls started and ended by reason, refusals by code, packets forwarded,
NACKs, retransmissions, keyframe requests, transcoding). A server whose /metrics cannot be read
is reported as such; the run goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from wire.logs import event
from wire.tasks import Tasks

log = logging.getLogger("probe.scrape")

#: (server, UNIX time, the parsed sample or None, why it could not be read or None)
SampleHook = Callable[[str, float, "dict[str, float] | None", "str | None"], None]

#: gauges whose peak over the run is kept (summed over their labels)
PEAKS = {"process_resident_memory_bytes": "memory_mb", "relay_asyncio_tasks": "tasks",
         "relay_legs": "legs", "relay_calls": "calls"}
#: labelled gauges a relay exposes with no sample when there is nothing to count
EMPTY_IS_ZERO = ("relay_legs", "relay_calls")
LAG = "relay_event_loop_lag_seconds"
CPU = "process_cpu_seconds_total"
START = "process_start_time_seconds"
#: labels every sample of one server carries: left out of the keys
OWN_LABELS = ("server", "role")


def parse(text: str) -> dict[str, float]:
    """Prometheus text → ``{"name{label=value,...}": value}`` (the server's own labels left
    out); raises ValueError on text that is not the exposition format."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())
                              if k not in OWN_LABELS)
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return out


def total(sample: dict[str, float], name: str) -> float | None:
    """The sum of one metric over its labels (None when the server has no such metric)."""
    values = [v for k, v in sample.items() if k == name or k.startswith(name + "{")]
    if values:
        return sum(values)
    return 0.0 if name in EMPTY_IS_ZERO else None


def lag_bound_ms(first: dict[str, float], last: dict[str, float], q: float = 0.99
                 ) -> float | None:
    """The histogram bucket bound under which ``q`` of the event-loop lag samples taken during
    the run fell (milliseconds; inf if beyond the last bucket; None with no samples)."""
    return lag_bound_of(lag_buckets(first, last), q)


def lag_buckets(first: dict[str, float], last: dict[str, float]) -> dict[float, float]:
    """The event-loop lag histogram's cumulative bucket counts that moved between two samples
    of one process (a restart in between: since the restart), by bound in seconds."""
    since = {} if restarted_between(first, last) else first
    out: dict[float, float] = {}
    for key, value in last.items():
        if key.startswith(LAG + "_bucket{le="):
            bound = float(key[len(LAG + "_bucket{le="):-1])
            out[bound] = value - since.get(key, 0.0)
    return out


def lag_bound_of(buckets: dict[float, float], q: float = 0.99) -> float | None:
    """The bound (ms) under which ``q`` of a lag histogram's samples fell (cumulative counts
    by bound); inf past the last finite bucket; None with no sample."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    count = ordered[-1][1]  # le=+Inf: every sample
    for bound, cumulative in ordered:
        if cumulative >= q * count:
            return round(bound * 1000, 3)
    return float("inf")


def counter_deltas(first: dict[str, float], last: dict[str, float]) -> dict[str, float]:
    """How much every relay counter moved between two samples (the unmoved left out). A server
    restarted in between counts from zero again: what it counted since is what moved."""
    restarted = restarted_between(first, last)
    out = {}
    for key, value in last.items():
        name = key.split("{", 1)[0]
        if name.startswith("relay_") and name.endswith("_total"):
            moved = value if restarted else value - first.get(key, 0.0)
            if moved:
                out[key] = moved
    return dict(sorted(out.items()))


def restarted_between(first: dict[str, float], last: dict[str, float]) -> bool:
    return first.get(START) != last.get(START)


@dataclass
class Lifetime:
    """One process of a server, as scraped: its first and last sample (a restart starts
    another: ``process_start_time_seconds`` changed)."""

    first: dict[str, float]
    last: dict[str, float]
    t_first: float
    t_last: float
    #: the first sample is the process's first moment: it counted from zero, not from first
    from_start: bool = False

    def since(self) -> dict[str, float]:
        return {} if self.from_start else self.first


@dataclass
class ServerTrack:
    """One server's samples over a run: each process lifetime's first and last sample (a
    restart starts a new one), and the peaks. Counters, CPU and the loop-lag histogram are
    summed over the lifetimes, each from where it was first seen (a later one from zero):
    a restart does not hand the new process's few seconds the whole run, nor lose the old
    process's part."""

    url: str
    lifetimes: list[Lifetime] = field(default_factory=list)
    peaks: dict[str, float] = field(default_factory=dict)
    scrapes: int = 0
    failed: int = 0
    error: str | None = None

    @property
    def first(self) -> dict[str, float] | None:
        return self.lifetimes[0].first if self.lifetimes else None

    @property
    def last(self) -> dict[str, float] | None:
        return self.lifetimes[-1].last if self.lifetimes else None

    @property
    def restarts(self) -> int:
        return max(0, len(self.lifetimes) - 1)

    def add(self, sample: dict[str, float], now: float) -> None:
        current = self.lifetimes[-1] if self.lifetimes else None
        if current is None or restarted_between(current.last, sample):
            self.lifetimes.append(Lifetime(sample, sample, now, now,
                                           from_start=current is not None))
        else:
            current.last, current.t_last = sample, now
        self.scrapes += 1
        for name, key in PEAKS.items():
            value = total(sample, name)
            if value is not None:
                self.peaks[key] = max(self.peaks.get(key, value), value)

    def counters(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for life in self.lifetimes:
            since = life.since()
            for key, value in life.last.items():
                name = key.split("{", 1)[0]
                if name.startswith("relay_") and name.endswith("_total"):
                    out[key] = out.get(key, 0.0) + value - since.get(key, 0.0)
        return dict(sorted((k, v) for k, v in out.items() if v))

    def cpu_seconds(self) -> float | None:
        moved = [(total(life.last, CPU), total(life.since(), CPU) or 0.0)
                 for life in self.lifetimes]
        if not moved or any(last is None for last, _ in moved):
            return None
        return sum(last - since for last, since in moved if last is not None)

    def lag_buckets(self) -> dict[float, float]:
        out: dict[float, float] = {}
        for life in self.lifetimes:
            for bound, count in lag_buckets(life.since(), life.last).items():
                out[bound] = out.get(bound, 0.0) + count
        return out

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "scrapes": self.scrapes,
                               "failed_scrapes": self.failed}
        if self.error:
            out["last_error"] = self.error
        first, last = self.first, self.last
        if first is None or last is None:
            return out
        elapsed = self.lifetimes[-1].t_last - self.lifetimes[0].t_first
        out["elapsed_s"] = round(elapsed, 1)
        if self.restarts:
            out["restarted"] = True
            out["restarts"] = self.restarts  # counters and CPU: summed over the processes
        cpu = self.cpu_seconds()
        out["cpu_pct"] = (round(cpu / elapsed * 100, 1)
                          if elapsed > 0 and cpu is not None else None)

        def mb(sample: dict[str, float]) -> float | None:
            value = total(sample, "process_resident_memory_bytes")
            return None if value is None else round(value / 1e6, 1)
        out["memory_mb"] = {"start": mb(first), "end": mb(last),
                            "peak": (round(self.peaks["memory_mb"] / 1e6, 1)
                                     if "memory_mb" in self.peaks else None)}
        for key, name in (("tasks", "relay_asyncio_tasks"), ("legs", "relay_legs"),
                          ("calls", "relay_calls")):
            out[key] = {"start": total(first, name), "end": total(last, name),
                        "peak": self.peaks.get(key)}
        out["loop_lag_p99_ms_at_most"] = lag_bound_of(self.lag_buckets())
        out["counters"] = self.counters()
        return out


class ServerWatch:
    """Scrapes every server's /metrics while a probe command runs (an owned task)::

        async with ServerWatch(session, {"lower-a": url, ...}) as watch:
            ...  # the load
            async with watch.window() as step:  # a part of it, read at its edges
                ...
            step["lower-a"].summary()
        summary["server_metrics"] = watch.summary()
    """

    def __init__(self, session: aiohttp.ClientSession, servers: dict[str, str],
                 interval_s: float | None = 5.0, timeout_s: float = 3.0,
                 on_sample: SampleHook | None = None,
                 on_round: Callable[[float], None] | None = None) -> None:
        self.session = session
        self.tracks = {name: ServerTrack(url.rstrip("/")) for name, url in servers.items()}
        self.interval_s = interval_s  #: None: at the start and the end only
        self.timeout_s = timeout_s
        #: every scrape as it comes: (server, UNIX time, the sample or None, the error or None)
        self.on_sample = on_sample
        #: every round of scrapes done (UNIX time): every server has just been read
        self.on_round = on_round
        self._task: asyncio.Task[None] | None = None
        self._tasks = Tasks("server watch")
        self._windows: list[dict[str, ServerTrack]] = []  #: open windows get every sample too

    async def __aenter__(self) -> ServerWatch:
        await self.sample()
        if self.interval_s is not None:
            self._task = self._tasks.spawn(self._run(self.interval_s), "server-watch")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.sample()

    async def _run(self, interval_s: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += interval_s  # a steady beat: a slow scrape does not push the next ones back
            await asyncio.sleep(max(0.0, due - loop.time()))
            due = max(due, loop.time() - interval_s)
            await self.sample()

    @contextlib.asynccontextmanager
    async def window(self) -> AsyncIterator[dict[str, ServerTrack]]:
        """Each server's track over the body only: scraped as it opens and as it closes, and
        at every interval between (peaks included)."""
        tracks = {name: ServerTrack(track.url) for name, track in self.tracks.items()}
        self._windows.append(tracks)
        try:
            await self.sample()
            yield tracks
            await self.sample()
        finally:
            self._windows.remove(tracks)

    async def sample(self) -> None:
        await asyncio.gather(*(self._scrape(name, track)
                               for name, track in self.tracks.items()))
        if self.on_round is not None:
            self.on_round(time.time())

    async def _scrape(self, name: str, track: ServerTrack) -> None:
        try:
            async with self.session.get(
                    f"{track.url}/metrics",
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                text = await response.text()
            sample = parse(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            error = f"{track.url}/metrics: {type(exc).__name__}: {exc}".rstrip(": ")
            if track.error != error:  # once per distinct failure, not every interval
                event(log, "metrics_unreadable", logging.WARNING, server=name, error=error)
            for each in (track, *(window[name] for window in self._windows)):
                each.failed += 1
                each.error = error
            if self.on_sample is not None:
                self.on_sample(name, time.time(), None, error)
            return
        now = time.monotonic()
        if track.error is not None:
            event(log, "metrics_readable_again", server=name)
            track.error = None
        for each in (track, *(window[name] for window in self._windows)):
            each.add(sample, now)
        if self.on_sample is not None:
            self.on_sample(name, time.time(), sample, None)

    def summary(self) -> dict[str, dict[str, Any]]:
        return {name: track.summary() for name, track in sorted(self.tracks.items())}


def describe(server_metrics: dict[str, dict[str, Any]]) -> Iterable[str]:
    """One line per server for the console."""
    for name, s in server_metrics.items():
        if "counters" not in s:
            yield f"  {name} /metrics: unreadable ({s.get('last_error')})"
            continue
        counters = s["counters"]

        def moved(name: str, counters: dict[str, float] = counters) -> float:
            return total(counters, name) or 0.0
        refusals = {k.split("code=", 1)[1].rstrip("}"): int(v) for k, v in counters.items()
                    if k.startswith("relay_refusals_total{")}
        memory = s["memory_mb"]
        restarts = s.get("restarts", 1 if s.get("restarted") else 0)
        restarted = (f" (restarted {restarts} time{'s' if restarts > 1 else ''} during the run"
                     "; counters and CPU summed over its processes)" if restarts else "")
        yield (f"  {name} /metrics{restarted}: CPU {s['cpu_pct']} %, memory {memory['start']} -> "
               f"{memory['end']} MB (peak {memory['peak']}), legs peak {_g(s['legs']['peak'])}, "
               f"tasks {_g(s['tasks']['start'])} -> {_g(s['tasks']['end'])}, loop lag p99 <= "
               f"{s['loop_lag_p99_ms_at_most']} ms, calls started "
               f"{moved('relay_calls_started_total'):g}, packets forwarded "
               f"{moved('relay_forwarded_packets_total'):g}, NACKs "
               f"{moved('relay_nacks_sent_total'):g}, refusals {refusals or 'none'}")


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"
