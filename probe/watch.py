"""The probe watches itself: its event loop's lag and its CPU, so that a run in which the probe
was the bottleneck is marked invalid instead of being blamed on a server."""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

from probe.histograms import new_histogram, percentiles, record_ms
from wire.tasks import Tasks


class LoopWatch:
    """While entered, wakes every ``interval_s`` and records how late it woke (the loop's lag:
    how long any other callback waited too), and measures the process's CPU."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.lag = new_histogram()
        self._task: asyncio.Task[None] | None = None
        self._tasks = Tasks("loop watch")
        self._cpu0 = self._wall0 = 0.0
        self._cpu = self._wall = 0.0
        self._recent_max = 0.0

    async def __aenter__(self) -> LoopWatch:
        self._cpu0, self._wall0 = time.process_time(), time.monotonic()
        self._task = self._tasks.spawn(self._run(), "loop-watch")
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._cpu = time.process_time() - self._cpu0
        self._wall = time.monotonic() - self._wall0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            late_ms = max(0.0, (loop.time() - due) * 1000)
            record_ms(self.lag, late_ms)
            self._recent_max = max(self._recent_max, late_ms)

    def recent_max_ms(self) -> float:
        """The worst lag since the last time this was asked (a soak reads it per window)."""
        found, self._recent_max = self._recent_max, 0.0
        return found

    def figures(self) -> dict[str, float | None]:
        lag = percentiles(self.lag)
        return {"loop_lag_ms_p50": lag["p50"] if lag else None,
                "loop_lag_ms_p99": lag["p99"] if lag else None,
                "loop_lag_ms_max": lag["max"] if lag else None,
                "cpu_pct": round(self._cpu / self._wall * 100, 1) if self._wall else None}
