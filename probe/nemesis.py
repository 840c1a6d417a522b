"""Faults on a schedule (``probe soak --faults PLAN.json``): the plan, checked when it is read, and
the nemesis that makes each fault at its time, undoes it at its end, and records both in the
run's history (probe/stability.py), as Jepsen's nemesis does.

A plan is JSON: ``{"faults": [FAULT, ...]}``, each fault an object:

- ``{"at": "60s", "kind": "kill", "server": "mid-1", "restart_after": "20s"}``: the server's
  process is killed (SIGKILL; a container: ``docker kill``) and started again after the delay
  (no ``restart_after``: it stays down);
- ``{"at": "2m", "kind": "stop", "server": "lower-b1", "for": "30s"}``: stopped (SIGSTOP; a
  container: ``docker pause``) for that long, then continued;
- ``{"at": "2m", "kind": "duty", "server": "lower-b1", "for": "2m", "stopped_ms": 250,
  "period_ms": 1000}``: stopped ``stopped_ms`` of every ``period_ms`` for that long: a slow
  server for real;
- ``{"at": "3m", "kind": "cut", "server": "lower-a2", "for": "20s"}``: the link between the
  server and its parent cut (the local stack: every packet on the veth of a server run with
  ``--isolate``, but the probe's own HTTP to it; a container: disconnected from its network);
- ``{"at": "3m", "kind": "limit", "server": "lower-a2", "for": "1m", "kbit": 400}``: that link
  limited to ``kbit`` kbit/s each way (tbf; the local stack only);
- ``{"at": "3m", "kind": "loss", "server": "lower-a2", "for": "1m", "share": 0.05}``: that
  share of its UDP packets dropped each way (iptables; the local stack only).

Times are seconds from the soak's start, as a number or with a unit (``90s``, ``45m``, ``8h``).
Where the faults are made is a :class:`Target`: the probe's own local stack
(:class:`LocalTarget`), or a compose lab through the Docker Engine API (:class:`DockerTarget`:
its socket, so it works from a container of the lab with the socket mounted too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from lab.netns import NamespaceError, need
from lab.stack import LocalStack, StackError
from wire.logs import event
from wire.tasks import Tasks

log = logging.getLogger("probe.nemesis")

KINDS = ("kill", "stop", "duty", "cut", "limit", "loss")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "ms": 0.001}


class PlanError(ValueError):
    """The plan is wrong; the message says which fault and field."""


class FaultError(RuntimeError):
    """A fault could not be made or undone where it was asked; the message says why."""


def seconds(value: Any, where: str = "duration") -> float:
    """``90``, ``90.5``, ``"90s"``, ``"45m"``, ``"8h"``, ``"250ms"`` -> seconds."""
    if isinstance(value, bool):
        raise PlanError(f"{where}: {value!r} is not a duration")
    if isinstance(value, int | float):
        found = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*", str(value))
        if match is None:
            raise PlanError(f"{where}: {value!r} is not a duration (a number of seconds, or "
                            "with a unit: 90s, 45m, 8h)")
        found = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if found < 0 or found != found:
        raise PlanError(f"{where}: {value!r} must not be negative")
    return found


@dataclass(frozen=True)
class Fault:
    at_s: float
    kind: str
    server: str
    for_s: float | None = None  #: stop, duty, cut, limit, loss: how long
    restart_after_s: float | None = None  #: kill: started again after this (None: never)
    stopped_ms: float = 250.0  #: duty
    period_ms: float = 1000.0  #: duty
    kbit: int = 400  #: limit
    share: float = 0.05  #: loss

    def describe(self) -> str:
        if self.kind == "kill":
            return "killed" + ("" if self.restart_after_s is None else
                               f", started again after {self.restart_after_s:g} s")
        lasting = f"for {self.for_s or 0:g} s"
        return {"stop": f"stopped {lasting}",
                "duty": f"stopped {self.stopped_ms:g} ms of every {self.period_ms:g} ms "
                        f"{lasting}",
                "cut": f"its parent link cut {lasting}",
                "limit": f"its parent link at {self.kbit} kbit/s {lasting}",
                "loss": f"{self.share:.0%} of its link's UDP dropped {lasting}"}[self.kind]


def parse_plan(data: Any, servers: set[str] | None = None) -> list[Fault]:
    """The plan's faults in order of time; PlanError naming the fault and field otherwise
    (with ``servers``, a server not among them is an error too)."""
    if not isinstance(data, dict) or not isinstance(data.get("faults"), list):
        raise PlanError('a plan is {"faults": [...]}')
    known = {"at", "kind", "server", "for", "restart_after", "stopped_ms", "period_ms", "kbit",
             "share"}
    out = []
    for i, item in enumerate(data["faults"]):
        where = f"faults[{i}]"
        if not isinstance(item, dict):
            raise PlanError(f"{where}: a fault is an object")
        unknown = sorted(set(item) - known)
        if unknown:
            raise PlanError(f"{where}: unknown field {unknown[0]!r} (fields: "
                            f"{', '.join(sorted(known))})")
        kind = item.get("kind")
        if kind not in KINDS:
            raise PlanError(f"{where}.kind: {kind!r} is not one of {', '.join(KINDS)}")
        server = item.get("server")
        if not isinstance(server, str) or not server:
            raise PlanError(f"{where}.server: the server's name is missing")
        if servers is not None and server not in servers:
            raise PlanError(f"{where}.server: no server {server!r} in the tree (there are "
                            f"{', '.join(sorted(servers))})")
        if "at" not in item:
            raise PlanError(f"{where}.at: when to make it is missing")
        fault: dict[str, Any] = {"at_s": seconds(item["at"], f"{where}.at"), "kind": kind,
                                 "server": server}
        if kind == "kill":
            if "for" in item:
                raise PlanError(f"{where}.for: a kill has restart_after, not for")
            if item.get("restart_after") is not None:
                fault["restart_after_s"] = seconds(item["restart_after"],
                                                   f"{where}.restart_after")
        else:
            if "for" not in item:
                raise PlanError(f"{where}.for: how long the {kind} lasts is missing")
            fault["for_s"] = seconds(item["for"], f"{where}.for")
            if "restart_after" in item:
                raise PlanError(f"{where}.restart_after: only a kill is restarted")
        if kind == "duty":
            stopped, period = item.get("stopped_ms", 250), item.get("period_ms", 1000)
            if not all(isinstance(v, int | float) and not isinstance(v, bool)
                       for v in (stopped, period)) or not 0 < stopped < period:
                raise PlanError(f"{where}: need 0 < stopped_ms < period_ms (got {stopped!r}, "
                                f"{period!r})")
            fault.update(stopped_ms=float(stopped), period_ms=float(period))
        if kind == "limit":
            kbit = item.get("kbit")
            if not isinstance(kbit, int) or isinstance(kbit, bool) or kbit < 8:
                raise PlanError(f"{where}.kbit: a whole number of kbit/s, at least 8")
            fault["kbit"] = kbit
        if kind == "loss":
            share = item.get("share")
            if not isinstance(share, int | float) or isinstance(share, bool) or \
                    not 0 < share <= 1:
                raise PlanError(f"{where}.share: a share of packets, 0 < share <= 1")
            fault["share"] = float(share)
        out.append(Fault(**fault))
    return sorted(out, key=lambda f: f.at_s)


def load_plan(path: Path, servers: set[str] | None = None) -> list[Fault]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise PlanError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise PlanError(f"{path}: not JSON: {exc}") from None
    try:
        return parse_plan(data, servers)
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}") from None


class Target(Protocol):
    """Where faults are made: every call raises FaultError when it cannot be done there."""

    name: str

    def check(self, fault: Fault) -> None:
        """Raise FaultError now if this target cannot make ``fault`` (before the run)."""

    async def kill(self, server: str) -> None: ...
    async def start(self, server: str) -> None: ...
    async def pause(self, server: str) -> None: ...
    async def resume(self, server: str) -> None: ...
    async def cut(self, server: str) -> None: ...
    async def heal(self, server: str) -> None: ...
    async def limit(self, server: str, kbit: int) -> None: ...
    async def unlimit(self, server: str) -> None: ...
    async def loss(self, server: str, share: float) -> None: ...


class LocalTarget:
    """The probe's own local stack (lab/stack.py): signals to its processes; link faults on
    the veth of a lower server run in a namespace of its own (``--isolate``)."""

    name = "local"

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack

    def check(self, fault: Fault) -> None:
        try:
            self.stack.child(fault.server)
        except KeyError as exc:
            raise FaultError(str(exc)) from None
        if fault.kind in ("cut", "limit", "loss"):
            if fault.server not in self.stack.namespaces:
                raise FaultError(f"{fault.kind} on {fault.server}: the local stack makes link "
                                 f"faults on a lower server run in a namespace of its own: "
                                 f"add --isolate {fault.server}")
            try:
                need("iptables", "iptables")
                need("tc", "iproute2")
            except NamespaceError as exc:
                raise FaultError(str(exc)) from None

    async def kill(self, server: str) -> None:
        self.stack.kill(server)

    async def start(self, server: str) -> None:
        try:
            await self.stack.start_again(server)
        except StackError as exc:
            raise FaultError(str(exc)) from None

    async def pause(self, server: str) -> None:
        self.stack.signal(server, signal.SIGSTOP)

    async def resume(self, server: str) -> None:
        self.stack.signal(server, signal.SIGCONT)

    async def _ns(self, server: str, action: Callable[..., None], *args: Any) -> None:
        try:
            await asyncio.to_thread(action, *args)
        except NamespaceError as exc:
            raise FaultError(f"{server}: {exc}") from None

    async def cut(self, server: str) -> None:
        ns = self.stack.namespaces[server]
        await self._ns(server, ns.cut, self.stack.child(server).port)

    async def heal(self, server: str) -> None:
        await self._ns(server, self.stack.namespaces[server].heal)

    async def limit(self, server: str, kbit: int) -> None:
        await self._ns(server, self.stack.namespaces[server].limit_rate, kbit)

    async def unlimit(self, server: str) -> None:
        await self._ns(server, self.stack.namespaces[server].unlimit)

    async def loss(self, server: str, share: float) -> None:
        await self._ns(server, self.stack.namespaces[server].drop, share)


class DockerTarget:
    """A compose lab's containers, through the Docker Engine API on its unix socket (from the
    host, or from a container with the socket mounted): ``kill`` and ``start``, ``pause`` and
    ``unpause``, and a network ``disconnect``/``connect`` for a cut. A server's container is the
    one of compose service SERVER (or ``services[SERVER]``) in ``project``."""

    name = "docker"

    def __init__(self, project: str, socket: str = "/var/run/docker.sock",
                 services: dict[str, str] | None = None) -> None:
        self.project = project
        self.socket = socket
        self.services = services or {}
        self._networks: dict[str, list[tuple[str, list[str]]]] = {}

    def check(self, fault: Fault) -> None:
        if fault.kind in ("limit", "loss"):
            raise FaultError(f"{fault.kind}: a compose lab's link cannot be slowed through the "
                             "Docker API (use the local stack with --isolate)")
        if not Path(self.socket).exists():
            raise FaultError(f"no Docker socket at {self.socket} (mount it into the probe's "
                             "container, or run the probe on the host)")

    async def _api(self, method: str, path: str, body: Any = None) -> Any:
        connector = aiohttp.UnixConnector(path=self.socket)
        async with aiohttp.ClientSession(connector=connector) as session, session.request(
                method, f"http://docker{path}", json=body,
                timeout=aiohttp.ClientTimeout(total=30)) as response:
            text = await response.text()
            if response.status >= 400:
                raise FaultError(f"docker {method} {path}: HTTP {response.status}: "
                                 f"{text[:300]}")
            return json.loads(text) if text.strip() else None

    async def _container(self, server: str) -> dict[str, Any]:
        service = self.services.get(server, server)
        filters = json.dumps({"label": [f"com.docker.compose.project={self.project}",
                                        f"com.docker.compose.service={service}"]})
        found = await self._api("GET", "/containers/json?all=1&filters="
                                + urllib.parse.quote(filters))
        if not found:
            raise FaultError(f"no container of service {service!r} in compose project "
                             f"{self.project!r}")
        return dict(found[0])

    async def _do(self, server: str, action: str) -> None:
        container = await self._container(server)
        await self._api("POST", f"/containers/{container['Id']}/{action}")

    async def kill(self, server: str) -> None:
        await self._do(server, "kill")

    async def start(self, server: str) -> None:
        await self._do(server, "start")

    async def pause(self, server: str) -> None:
        await self._do(server, "pause")

    async def resume(self, server: str) -> None:
        await self._do(server, "unpause")

    async def cut(self, server: str) -> None:
        container = await self._container(server)
        service = self.services.get(server, server)
        networks = container.get("NetworkSettings", {}).get("Networks", {})
        self._networks[server] = [(name, [service]) for name in networks]
        for name in networks:
            await self._api("POST", f"/networks/{name}/disconnect",
                            {"Container": container["Id"], "Force": True})

    async def heal(self, server: str) -> None:
        container = await self._container(server)
        for name, aliases in self._networks.pop(server, []):
            await self._api("POST", f"/networks/{name}/connect",
                            {"Container": container["Id"],
                             "EndpointConfig": {"Aliases": aliases}})

    async def limit(self, server: str, kbit: int) -> None:
        raise FaultError("limit: not through the Docker API")

    async def unlimit(self, server: str) -> None:
        raise FaultError("limit: not through the Docker API")

    async def loss(self, server: str, share: float) -> None:
        raise FaultError("loss: not through the Docker API")


#: (fault, when it started, when it was undone or None while it is on): the history's record
Record = Callable[[Fault, float, "float | None"], None]


class Nemesis:
    """Makes a plan's faults at their times from ``t0`` (UNIX time) on ``target``, each in a
    task of its own, and calls ``record`` when one starts (end None) and when it was undone.
    Leaving the context undoes every fault still on (a soak stopped early leaves nothing
    stopped, cut or slowed) and cancels what has not started."""

    def __init__(self, plan: list[Fault], target: Target, t0: float, record: Record) -> None:
        self.plan = plan
        self.target = target
        self.t0 = t0
        self.record = record
        self._tasks = Tasks("nemesis")
        self._undo: dict[int, Callable[[], Awaitable[None]]] = {}
        self._started: dict[int, float] = {}
        self.errors: list[str] = []

    async def __aenter__(self) -> Nemesis:
        for fault in self.plan:
            self.target.check(fault)
        for i, fault in enumerate(self.plan):
            self._tasks.spawn(self._run(i, fault), f"nemesis-{i}", on_done=self._failed)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._tasks.close()
        for i, undo in list(self._undo.items()):
            with contextlib.suppress(FaultError):
                await undo()
            self.record(self.plan[i], self._started[i], time.time())
        self._undo.clear()

    def _failed(self, task: asyncio.Task[None]) -> None:
        """A fault's task that raised (a bug, not a FaultError): said, never lost."""
        if not task.cancelled() and task.exception() is not None:
            error = f"{task.get_name()}: {task.exception()!r}"
            self.errors.append(error)
            event(log, "fault.crashed", logging.ERROR, error=error)

    async def wait(self) -> None:
        """Until every fault of the plan has been made and undone."""
        await self._tasks.wait()

    async def _run(self, i: int, fault: Fault) -> None:
        await asyncio.sleep(max(0.0, self.t0 + fault.at_s - time.time()))
        started = time.time()
        event(log, "fault.start", server=fault.server, kind=fault.kind, what=fault.describe(),
              at_s=round(started - self.t0, 1))
        self._started[i] = started
        self.record(fault, started, None)
        try:
            await self._make(i, fault)
        except FaultError as exc:
            self.errors.append(f"{fault.kind} on {fault.server}: {exc}")
            event(log, "fault.failed", logging.ERROR, server=fault.server, kind=fault.kind,
                  error=str(exc))
        ended = time.time()
        self._undo.pop(i, None)
        event(log, "fault.end", server=fault.server, kind=fault.kind,
              at_s=round(ended - self.t0, 1), lasted_s=round(ended - started, 1))
        self.record(fault, started, ended)

    async def _make(self, i: int, fault: Fault) -> None:
        t, server = self.target, fault.server
        if fault.kind == "kill":
            await t.kill(server)
            if fault.restart_after_s is None:
                return
            self._undo[i] = lambda: t.start(server)
            await asyncio.sleep(fault.restart_after_s)
            await t.start(server)
            return
        assert fault.for_s is not None
        if fault.kind == "stop":
            self._undo[i] = lambda: t.resume(server)
            await t.pause(server)
            await asyncio.sleep(fault.for_s)
            await t.resume(server)
        elif fault.kind == "duty":
            self._undo[i] = lambda: t.resume(server)
            loop = asyncio.get_running_loop()
            until = loop.time() + fault.for_s
            while loop.time() < until:
                await t.pause(server)
                try:
                    await asyncio.sleep(fault.stopped_ms / 1000)
                finally:
                    await t.resume(server)
                await asyncio.sleep((fault.period_ms - fault.stopped_ms) / 1000)
        else:
            make, undo = {"cut": (lambda: t.cut(server), lambda: t.heal(server)),
                          "limit": (lambda: t.limit(server, fault.kbit),
                                    lambda: t.unlimit(server)),
                          "loss": (lambda: t.loss(server, fault.share),
                                   lambda: t.heal(server))}[fault.kind]
            self._undo[i] = undo
            await make()
            await asyncio.sleep(fault.for_s)
            await undo()
