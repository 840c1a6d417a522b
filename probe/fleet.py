"""A capacity search shared by a fleet of probes: ``probe capacity --shard I/N``.

A load is easy to share: every probe builds the same schedule and starts every N-th call
(probe/load.py ``Shard``). A search is not. Each step's rate comes from the verdict on the step
before, and that verdict needs every call of the step, not one shard's. Shards stepping in
lock-step by the wall clock alone would each judge their own 1/N of the calls. Two of them can
disagree on a step (one sees the setup p95 past the objective, the other does not); from then on
they run different rates, and the load is no longer one load. So one probe leads:

- **The leader** is shard 0. It runs the search (probe/capacity.py) as a single probe would and
  serves its orders over HTTP (``--fleet-listen``, port 8790). For each step it publishes the
  order (server, rate, duration, hold, seed, and a wall-clock start ``LEAD_S`` ahead), runs its
  own shard, collects the other shards' results, merges them exactly (counts add, histograms
  merge), and judges the merged step. A shard whose result does not come within the grace makes
  the step invalid ("shards [1] of 2 missing"), and the search stops, as it does when a probe
  lags: a hole in the load is the fleet's fault, not a server's.
- **A follower** (``--leader URL``) long-polls the leader for step k's order, runs its shard of
  it from the order's start, posts its result, and asks for step k+1, until an order says the
  search is over. It then writes the fleet's verdict as the leader judged it, next to its own
  part of the calls.
- Before the first step the leader waits for every shard to ask (``--leader-wait``): the pods of
  an indexed Job or the tasks of a Swarm service start in any order, seconds apart.

Why HTTP to shard 0, and not a shared file or a step plan fixed in advance: a fleet spans hosts
with no shared disk, and a follower needs only the leader's address. That is a Kubernetes
indexed Job pod's own DNS name, or a Swarm dnsrr service's name: its other tasks do not listen,
so the one that answers is the leader (aiohttp tries each address in turn). The clocks must
still agree, as for a shared load, since every step starts at a wall-clock moment.

The wire bodies (``FleetStep``, ``FleetOrder``, ``FleetResult``) are in wire/messages.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from probe.histograms import decode
from probe.load import LoadReport, LoadSettings, Shard, run_load
from probe.stats import Recorder
from probe.summary import RUN_COUNTS, shards_of
from wire.auth import bearer
from wire.client import ProbeError, Server
from wire.http import error_response
from wire.logs import event
from wire.messages import ErrorBody, FleetOrder, FleetResult, FleetStep, MessageError
from wire.reasons import Code

log = logging.getLogger("probe.fleet")

T = TypeVar("T")

FLEET_PORT = 8790
LEAD_S = 2.0  #: a step starts this long after its order is published
POLL_S = 20.0  #: a follower's long poll waits at most this long for the next order
RETRY_S = 0.5  #: between a follower's tries while the leader cannot be reached
FINAL_WAIT_S = 10.0  #: the leader, at its end, waits this long for followers to read it
#: a run summary with every histogram is tens of KiB; this leaves room for big trees
MAX_RESULT_BYTES = 32 * 1024 * 1024
ORDERS = "/fleet/v1/orders/{step}"
RESULTS = "/fleet/v1/results/{step}"

#: LoadReport's attribute for each count of a run summary (probe/summary.py RUN_COUNTS)
COUNTS = {key: {"late_starts": "late"}.get(key, key) for key in RUN_COUNTS}


def step_of(settings: LoadSettings, start_at: float) -> FleetStep:
    """The order for a step the search wants run (probe/capacity.py offers one server's load)."""
    server = settings.via if settings.via is not None else settings.callers_on
    if server is None:
        raise ValueError("a fleet step needs the server searched (callers_on or via)")
    return FleetStep(server=server, via=settings.via is not None, rate=settings.rate,
                     duration_s=settings.duration_s, hold_s=settings.hold_s,
                     poisson=settings.poisson, seed=settings.seed, media=settings.media,
                     start_at=start_at)


def settings_of(load: LoadSettings, step: FleetStep) -> LoadSettings:
    """A follower's load for ``step``: its own settings, with the leader's say on the schedule."""
    where = {"via": step.server} if step.via else {"callers_on": step.server}
    return replace(load, rate=step.rate, duration_s=step.duration_s, hold_s=step.hold_s,
                   poisson=step.poisson, seed=step.seed, media=step.media,
                   start_at=step.start_at, **where)


def check_run(run: dict[str, Any], shard: int) -> None:
    """Raise MessageError unless ``run`` is a load run's summary from ``shard`` that merges."""
    try:
        Recorder.from_summary(run["figures"])
        decode(run.get("schedule_error_hist", ""))
        index = run["shard"]["index"]
        counts = [run[key] for key in COUNTS]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MessageError(f"run: not a load run's summary ({type(exc).__name__}: {exc})",
                           field="run") from None
    if index != shard:
        raise MessageError(f"run: the run is shard {index}'s, sent as shard {shard}'s",
                           field="run.shard.index")
    if not all(isinstance(n, int) and n >= 0 for n in counts):
        raise MessageError("run: its counts must be whole numbers, not negative", field="run")


def merge_reports(own: LoadReport, parts: list[dict[str, Any]]) -> LoadReport:
    """The step as one probe would have seen it: the leader's own shard and the others' run
    summaries, counts summed and histograms merged; ``shards`` says whether they make it whole."""
    merged = LoadReport(own.settings, Recorder(own.recorder.window_s),
                        scheduled_total=own.scheduled_total, started_at=own.started_at,
                        results=list(own.results))
    merged.recorder.merge(own.recorder)
    merged.schedule_error.add(own.schedule_error)
    for key, attr in COUNTS.items():
        setattr(merged, attr, getattr(own, attr) + sum(part.get(key, 0) for part in parts))
    lags = [lag for lag in [own.watch.get("loop_lag_ms_p99"),
                            *((part.get("probe") or {}).get("loop_lag_ms_p99") for part in parts)]
            if lag is not None]
    merged.watch = {**own.watch, "loop_lag_ms_p99": max(lags) if lags else None}
    for part in parts:
        merged.recorder.merge(Recorder.from_summary(part["figures"]))
        merged.schedule_error.add(decode(part.get("schedule_error_hist", "")))
    merged.shards = shards_of([own.summary(), *parts])
    return merged


class Leader:
    """Shard 0 of a fleet: publishes each step's order and collects the other shards' results.

    ``async with Leader(...)`` serves ``GET /fleet/v1/orders/{step}?shard=I&wait=S`` (the order
    of that step: 200, or 204 when none came within ``wait``) and ``POST
    /fleet/v1/results/{step}`` (a ``FleetResult``), with the probe's token when it has one."""

    def __init__(self, shard: Shard, host: str, port: int, token: str | None,
                 wait_s: float = 120.0, grace_s: float | None = None,
                 final_wait_s: float = FINAL_WAIT_S) -> None:
        if shard.index != 0 or shard.count < 2:
            raise ValueError("the leader is shard 0 of at least 2")
        self.shard = shard
        self.host, self.port = host, port
        self.wait_s = wait_s
        #: how long, after its own shard of a step, the leader waits for the others' (None:
        #: the step's hold + setup timeout + 35 s, the longest a shard's run can take longer)
        self.grace_s = grace_s
        self.final_wait_s = final_wait_s
        self._token = token
        self._lost: set[int] = set()  #: shards whose result of a step never came
        self._orders: list[FleetOrder] = []
        self._results: dict[int, dict[int, dict[str, Any]]] = {}
        self._collecting: int | None = None
        self._asked: dict[int, int] = {}  #: shard -> the highest step it asked for
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def followers(self) -> range:
        return range(1, self.shard.count)

    @property
    def seen(self) -> list[int]:
        """The followers that have asked for an order."""
        return sorted(self._asked)

    @property
    def over(self) -> bool:
        return bool(self._orders) and self._orders[-1].run is None

    async def __aenter__(self) -> Leader:
        app = web.Application(client_max_size=MAX_RESULT_BYTES)
        app.router.add_get(ORDERS, self._get_order)
        app.router.add_post(RESULTS, self._post_result)
        app.router.add_get("/healthz", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ProbeError("fleet_listen", f"the fleet's leader cannot listen on "
                                             f"{self.host}:{self.port}: {exc}") from None
        if self._runner.addresses:  # the port actually bound (for port 0)
            self.port = self._runner.addresses[0][1]
        event(log, "fleet_listening", host=self.host, port=self.port, shards=self.shard.count,
              auth=self._token is not None)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if not self.over:  # the search failed: the followers are told, not left waiting
                reason = exc_info[1]
                self.finish({"valid": False, "objective_met": False,
                             "error": f"the leader stopped: {reason or 'no verdict'}"})
            final = len(self._orders) - 1
            deadline = time.monotonic() + self.final_wait_s
            while time.monotonic() < deadline and any(
                    self._asked.get(shard, -1) < final for shard in self._asked
                    if shard not in self._lost):
                await self._wait(deadline - time.monotonic())
        finally:
            if self._runner is not None:
                await self._runner.cleanup()

    def publish(self, run: FleetStep) -> int:
        """Order every shard to run ``run``; its step number."""
        if self.over:
            raise RuntimeError("the search is over")
        step = len(self._orders)
        self._orders.append(FleetOrder(step=step, count=self.shard.count, run=run))
        self._results[step] = {}
        self._collecting = step
        event(log, "fleet_order", step=step, server=run.server, via=run.via, rate=run.rate,
              start_at=round(run.start_at, 3))
        self._notify()
        return step

    def finish(self, verdict: dict[str, Any]) -> None:
        """The search is over: the last order says so, with the fleet's verdict."""
        if self.over:
            return
        step = len(self._orders)
        self._orders.append(FleetOrder(step=step, count=self.shard.count, verdict=verdict))
        self._collecting = None
        event(log, "fleet_over", step=step, valid=verdict.get("valid"),
              error=verdict.get("error"))
        self._notify()

    async def joined(self) -> None:
        """Wait until every follower has asked for the first order (at most ``wait_s``)."""
        deadline = time.monotonic() + self.wait_s
        while (missing := [s for s in self.followers if s not in self._asked]):
            if time.monotonic() >= deadline:
                raise ProbeError("fleet_incomplete",
                                 f"shards {missing} of {self.shard.count} did not come to the "
                                 f"leader within {self.wait_s:g} s (each needs --leader "
                                 f"http://THIS-HOST:{self.port})")
            await self._wait(deadline - time.monotonic())
        event(log, "fleet_joined", shards=self.shard.count)

    async def results(self, step: int, timeout_s: float) -> list[dict[str, Any]]:
        """The followers' runs of ``step`` (by shard), as many as came within ``timeout_s``.
        Collecting ends here: a result that comes later is refused (``stale_step``)."""
        deadline = time.monotonic() + timeout_s
        got = self._results[step]
        while len(got) < len(self.followers) and time.monotonic() < deadline:
            await self._wait(deadline - time.monotonic())
        self._collecting = None
        if missing := [s for s in self.followers if s not in got]:
            self._lost.update(missing)
            event(log, "fleet_shard_missing", logging.WARNING, step=step, shards=missing,
                  waited_s=round(timeout_s, 1))
        return [got[shard] for shard in sorted(got)]

    async def run_step(self, session: aiohttp.ClientSession, servers: list[Server],
                       settings: LoadSettings) -> LoadReport:
        """One step of the search, fleet-wide (probe/capacity.py ``search``'s ``run_step``)."""
        if not self._orders:
            await self.joined()
        start_at = time.time() + LEAD_S
        step = self.publish(step_of(settings, start_at))
        own = await run_load(session, servers, replace(settings, start_at=start_at))
        # The shards share the schedule, so they end about together; one may wait out its
        # last calls' setup timeout after the leader's have ended.
        grace = (self.grace_s if self.grace_s is not None
                 else settings.hold_s + settings.setup_timeout_s + 35.0)
        parts = await self.results(step, grace)
        return merge_reports(own, parts)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(0.0, timeout_s))

    def _refuse(self, request: web.Request) -> web.Response | None:
        if self._token is None:
            return None
        token = bearer(request.headers.get("Authorization", ""))
        if token is None:
            return self._refused(request, 401, Code.UNAUTHORIZED,
                                 "the fleet's leader needs the probe's token (auth is on)")
        if not hmac.compare_digest(token.encode(), self._token.encode()):
            return self._refused(request, 403, Code.FORBIDDEN,
                                 "the token is not this fleet's probe token")
        return None

    def _refused(self, request: web.Request, status: int, code: Code, message: str,
                 field: str | None = None) -> web.Response:
        event(log, "fleet_refused", logging.WARNING, code=code, why=message,
              path=request.path, peer=request.remote)
        return error_response(status, code, message[:1024], field)

    def _shard_of(self, request: web.Request, text: str | None) -> int | web.Response:
        try:
            shard = int(text or "")
        except ValueError:
            shard = -1
        if shard not in self.followers:
            return self._refused(request, 400, Code.BAD_QUERY,
                                 f"shard {text!r}: a follower of this fleet is one of "
                                 f"1..{self.shard.count - 1}", "shard")
        return shard

    def _step_of(self, request: web.Request) -> int | web.Response:
        text = request.match_info["step"]
        if not text.isdigit() or len(text) > 9:
            return self._refused(request, 400, Code.BAD_QUERY,
                                 f"step {text!r}: expected a step number", "step")
        return int(text)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "shards": self.shard.count,
                                  "step": len(self._orders) - 1, "over": self.over})

    async def _get_order(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refuse(request)) is not None:
            return refused
        step = self._step_of(request)
        shard = self._shard_of(request, request.query.get("shard"))
        if isinstance(step, web.Response):
            return step
        if isinstance(shard, web.Response):
            return shard
        try:
            wait_s = min(POLL_S, max(0.0, float(request.query.get("wait", "0"))))
        except ValueError:
            return self._refused(request, 400, Code.BAD_QUERY,
                                 f"wait {request.query.get('wait')!r}: expected seconds", "wait")
        if step > len(self._orders) or (step == len(self._orders) and self.over):
            return self._refused(request, 404, Code.NOT_FOUND,
                                 f"step {step}: the leader has ordered steps 0.."
                                 f"{len(self._orders) - 1}" + (" (the search is over)"
                                                              if self.over else ""), "step")
        if shard not in self._asked:
            event(log, "fleet_shard_joined", shard=shard, peer=request.remote)
        self._asked[shard] = max(self._asked.get(shard, -1), step)
        self._notify()
        deadline = time.monotonic() + wait_s
        while step >= len(self._orders) and time.monotonic() < deadline:
            await self._wait(deadline - time.monotonic())
        if step >= len(self._orders):
            return web.Response(status=204)
        return web.json_response(self._orders[step].to_dict())

    async def _post_result(self, request: web.Request) -> web.Response:
        if (refused := self._refuse(request)) is not None:
            return refused
        step = self._step_of(request)
        if isinstance(step, web.Response):
            return step
        try:
            data = await request.json()
        except ValueError as exc:
            return self._refused(request, 400, Code.BAD_JSON, f"the body is not JSON: {exc}")
        try:
            result = FleetResult.from_dict(data)
            if result.step != step:
                raise MessageError(f"step: {result.step}, posted to step {step}", field="step")
            if result.count != self.shard.count:
                raise MessageError(f"count: {result.count}, but this fleet has "
                                   f"{self.shard.count} shards", field="count")
            if result.shard not in self.followers:
                raise MessageError(f"shard: {result.shard}, but a follower of this fleet is "
                                   f"one of 1..{self.shard.count - 1}", field="shard")
            check_run(result.run, result.shard)
        except MessageError as exc:
            return self._refused(request, 400, Code.BAD_MESSAGE, exc.message, exc.field)
        if step != self._collecting:
            now = ("none: the search is over" if self.over else
                   f"{self._collecting}" if self._collecting is not None else
                   "none: that step's results are closed")
            return self._refused(request, 409, Code.STALE_STEP,
                                 f"step {step} is not being collected (collecting: {now})",
                                 "step")
        got = self._results[step]
        if result.shard in got:
            return self._refused(request, 409, Code.STALE_STEP,
                                 f"shard {result.shard} already sent step {step}", "shard")
        got[result.shard] = result.run
        event(log, "fleet_result", step=step, shard=result.shard,
              calls=result.run.get("started"))
        self._notify()
        return web.Response(status=204)


class Follower:
    """Shard I > 0 of a fleet: asks the leader for each order and sends back its results."""

    def __init__(self, leader_url: str, shard: Shard, token: str | None,
                 wait_s: float = 120.0) -> None:
        if shard.index == 0:
            raise ValueError("shard 0 leads; a follower is shard 1..N-1")
        self.url = leader_url.rstrip("/")
        self.shard = shard
        self.wait_s = wait_s
        self._token = token
        self._session: aiohttp.ClientSession | None = None
        self._unreachable_logged = False

    async def __aenter__(self) -> Follower:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        # No DNS cache: a Swarm service's name lists its tasks as they come and go.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(use_dns_cache=False), headers=headers,
            timeout=aiohttp.ClientTimeout(total=POLL_S + 15.0))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def order(self, step: int) -> FleetOrder:
        """Step ``step``'s order, waiting for it; ProbeError when the leader is gone for
        ``wait_s`` or refuses."""
        async def ask(session: aiohttp.ClientSession) -> FleetOrder | None:
            async with session.get(self.url + ORDERS.format(step=step),
                                   params={"shard": str(self.shard.index),
                                           "wait": str(POLL_S)}) as response:
                if response.status == 204:
                    return None
                data = await self._body(response, 200)
            try:
                order = FleetOrder.from_dict(data)
            except MessageError as exc:
                raise ProbeError("bad_response", f"{self.url}: the leader's order for step "
                                                 f"{step}: {exc.message}") from None
            if order.count != self.shard.count:
                raise ProbeError("fleet_mismatch",
                                 f"the leader at {self.url} leads {order.count} shards; this "
                                 f"probe is shard {self.shard.index}/{self.shard.count}")
            return order

        return await self._retry(ask, f"the order for step {step}")

    async def send(self, step: int, report: LoadReport) -> None:
        """This shard's run of ``step``, to the leader."""
        body = FleetResult(step=step, shard=self.shard.index, count=self.shard.count,
                           run=report.summary()).to_dict()

        async def post(session: aiohttp.ClientSession) -> bool:
            async with session.post(self.url + RESULTS.format(step=step),
                                    json=body) as response:
                await self._body(response, 204)
            return True

        await self._retry(post, f"the result of step {step}")

    async def _body(self, response: aiohttp.ClientResponse, expected: int) -> Any:
        if response.status == expected:
            return await response.json() if expected == 200 else None
        text = await response.text()
        try:
            error = ErrorBody.from_dict(await response.json(content_type=None)).error
            code, message = str(error.code), error.message
        except (ValueError, MessageError, aiohttp.ContentTypeError):
            code, message = "bad_response", f"HTTP {response.status}: {text[:200]}"
        raise ProbeError(code, f"the fleet's leader at {self.url} refused: {message}",
                         response.status)

    async def _retry(self, attempt: Callable[[aiohttp.ClientSession],
                                                Awaitable[T | None]], what: str) -> T:
        """``attempt`` until it gives an answer; a leader that answers (even "not yet") keeps
        the follower waiting, one that cannot be reached for ``wait_s`` ends it."""
        assert self._session is not None, "use the Follower with async with"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while True:
            try:
                answer = await attempt(self._session)
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                if not self._unreachable_logged:
                    self._unreachable_logged = True
                    event(log, "fleet_leader_unreachable", logging.WARNING, leader=self.url,
                          error=f"{type(exc).__name__}: {exc}", waiting_s=self.wait_s)
                if loop.time() >= deadline:
                    raise ProbeError("leader_unreachable",
                                     f"the fleet's leader at {self.url} could not be reached "
                                     f"for {self.wait_s:g} s, asking for {what} "
                                     f"({type(exc).__name__}: {exc})") from None
                await asyncio.sleep(RETRY_S)
                continue
            if self._unreachable_logged:
                self._unreachable_logged = False
                event(log, "fleet_leader_reached", leader=self.url)
            deadline = loop.time() + self.wait_s
            if answer is not None:
                return answer


async def follow(follower: Follower, session: aiohttp.ClientSession, servers: list[Server],
                 load: LoadSettings, on_run: Callable[[int, LoadReport], None]) -> FleetOrder:
    """Run the leader's orders until the last; that last order (its verdict)."""
    step = 0
    while True:
        order = await follower.order(step)
        if order.run is None:
            return order
        event(log, "fleet_step", step=step, server=order.run.server, via=order.run.via,
              rate=order.run.rate, start_in_s=round(order.run.start_at - time.time(), 3))
        try:
            report = await run_load(session, servers, settings_of(load, order.run))
        except ValueError as exc:  # the order against this probe's tree or clock
            raise ProbeError("bad_arguments", f"step {step}'s order: {exc}") from None
        on_run(step, report)
        await follower.send(step, report)
        step += 1


@contextlib.asynccontextmanager
async def leading(shard: Shard, listen: str, token: str | None, wait_s: float,
                  grace_s: float | None = None) -> AsyncIterator[Leader | None]:
    """A Leader when ``shard`` is shard 0 of several, else None."""
    if shard.count < 2:
        yield None
        return
    host, _, port = listen.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ProbeError("bad_arguments", f"--fleet-listen {listen!r}: want HOST:PORT") from None
    async with Leader(shard, host or "0.0.0.0", number, token, wait_s, grace_s) as leader:
        yield leader
