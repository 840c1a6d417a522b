"""The local stack: a tree of servers (by default upper, lower-a and lower-b; any shape with a
topology, lab/topology.py) and devices under each lower server, as separate processes on
loopback. Used by ``python -m relay stack`` and ``probe --local``.

Every server gets a free port when the stack starts and keeps it: a server that dies can be
started again from the same command line and rejoins the tree where it was (its children and
devices reconnect by themselves). The stack watches every process: a death it did not cause is
logged once (``stack.died``, with the exit status and the log), and with ``restart_after_s`` the
server is started again on its port after that delay (``stack.restarted``). Faults are made
through it (:meth:`LocalStack.kill`, :meth:`LocalStack.signal`, :meth:`LocalStack.start_again`:
probe/nemesis.py). A lower server named in ``isolate`` runs with its devices in a network
namespace of its own (lab/netns.py), so the link to its parent crosses a veth that a fault
can cut or slow.

Every child is started with a parent-death signal, so even a killed launcher leaves no process
behind; a normal stop sends SIGTERM and, after a grace period, SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

from lab.netns import Namespace, NamespaceError, namespace
from lab.topology import DEFAULT, TreeNode
from wire.auth import token_for
from wire.logs import event
from wire.tasks import Tasks

log = logging.getLogger("lab.stack")


class StackError(RuntimeError):
    """The stack could not start; the message says which process and where its log is."""


@dataclass(frozen=True)
class StackSettings:
    devices: int = 1  #: devices under each lower server
    media_addresses: tuple[str, ...] = ("127.0.0.1",)
    size: str = "640x480"
    fps: float = 30.0
    #: device video: synthetic (one process per server, encoding live), or preencoded/packets
    #: (one process for every device: cheap, and latency is measured between servers)
    video: str = "synthetic"
    log_dir: Path | None = None  #: where children's logs go (default: a new temp dir)
    start_timeout_s: float = 30.0
    topology: TreeNode = DEFAULT
    #: more arguments for every server (``--congestion-control off``, say)
    server_args: tuple[str, ...] = ()
    #: more environment for the named servers' processes only (server name -> variables)
    server_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: a server that dies (not by :meth:`LocalStack.kill`) is started again after this long, on
    #: its port; None: it stays down (its death is logged either way)
    restart_after_s: float | None = None
    #: lower servers that run, with their devices, in a network namespace of their own: the
    #: link to the parent crosses a veth (lab/netns.py; needs root)
    isolate: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= 500:
            raise ValueError("devices must be between 1 and 500 per lower server")
        if self.restart_after_s is not None and self.restart_after_s < 0:
            raise ValueError("restart_after_s must not be negative")
        leaves = {leaf.name for leaf in self.topology.leaves()}
        names = {node.name for node, _, _ in self.topology.walk()}
        for name in self.isolate:
            if name not in leaves:
                raise ValueError(f"isolate {name!r}: only a lower server of the topology can "
                                 f"run in a namespace of its own (lower servers: "
                                 f"{', '.join(sorted(leaves))})")
        for name in self.server_env:
            if name not in names:
                raise ValueError(f"server_env {name!r}: no such server in the topology")

    def devices_of(self, leaf: TreeNode) -> int:
        return self.devices if leaf.devices is None else leaf.devices


def _die_with_parent() -> None:
    """Runs in the child before exec: get SIGTERM when the launcher dies (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    name: str
    #: the command line (after the namespace prefix and the interpreter): the same one
    #: starts it again
    args: list[str]
    process: asyncio.subprocess.Process
    log_path: Path
    log_file: IO[bytes]
    env: dict[str, str]
    prefix: tuple[str, ...] = ()  #: ``ip netns exec NS`` for an isolated server and its devices
    url: str | None = None
    role: str | None = None  #: a server's role; None for a devices process
    parent: str | None = None  #: a server's parent's name
    port: int | None = None
    restarts: int = 0
    #: the next exit is ours (a fault made through the stack): logged as such, not restarted
    expected_exit: bool = False
    started_at: float = field(default_factory=time.time)


@dataclass
class LocalStack:
    settings: StackSettings = field(default_factory=StackSettings)
    children: list[Child] = field(default_factory=list)
    log_dir: Path | None = None
    #: the isolated servers' namespaces, by server name
    namespaces: dict[str, Namespace] = field(default_factory=dict)
    _watchers: Tasks = field(default_factory=lambda: Tasks("stack watchers"))
    _ports: set[int] = field(default_factory=set)  #: handed to servers of this stack
    _stopping: bool = False
    _exits: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    async def __aenter__(self) -> LocalStack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        s = self.settings
        self.log_dir = s.log_dir or Path(tempfile.mkdtemp(prefix="vphone-stack-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in s.isolate:
            try:
                self.namespaces[name] = self._exits.enter_context(namespace())
            except NamespaceError as exc:
                raise StackError(f"isolate {name}: {exc}") from None
        parents_of_isolated = {parent for node, parent, _ in s.topology.walk()
                               if node.name in self.namespaces}
        urls: dict[str, str] = {}
        # Level by level from the root: a level's servers start together, each told its
        # parent's URL.
        levels: dict[int, list[tuple[TreeNode, str | None]]] = {}
        for node, parent, depth in s.topology.walk():
            levels.setdefault(depth, []).append((node, parent))
        for depth in sorted(levels):
            started = await asyncio.gather(*(
                self._server(node, parent, urls, node.name in parents_of_isolated)
                for node, parent in levels[depth]))
            urls.update(zip((n.name for n, _ in levels[depth]), started, strict=True))
        await self._devices(urls)
        expected = sum(s.devices_of(leaf) for leaf in s.topology.leaves())
        await self._wait_registered(urls[s.topology.name], expected)

    def _media(self, name: str) -> list[str]:
        ns = self.namespaces.get(name)
        addresses = [ns.inside_ip] if ns is not None else list(self.settings.media_addresses)
        return [a for addr in addresses for a in ("--media-address", addr)]

    async def _server(self, node: TreeNode, parent: str | None, urls: dict[str, str],
                      serves_isolated: bool) -> str:
        ns = self.namespaces.get(node.name)
        host = ns.inside_ip if ns is not None else "127.0.0.1"
        port = free_port()
        while port in self._ports:  # closed again at once: the kernel may hand it out twice
            port = free_port()
        self._ports.add(port)
        args = ["-m", "relay", node.role, "--name", node.name, "--host", host,
                "--port", str(port), *self._media(node.name)]
        if serves_isolated:
            # children in namespaces reach it over their veths: listen there too, and offer
            # media there too
            args[args.index("--host") + 1] = "0.0.0.0"
            args += ["--public-url", f"http://127.0.0.1:{port}"]
            args += [a for ns in self.namespaces.values()
                     for a in ("--media-address", ns.host_ip)]
        if parent is not None:
            parent_url = urls[parent]
            if ns is not None:
                parent_url = parent_url.replace("127.0.0.1", ns.host_ip)
            args += ["--parent", parent_url]
        args += list(self.settings.server_args)
        child = await self._spawn(node.name, args, ns.prefix() if ns is not None else (),
                                  self.settings.server_env.get(node.name, {}))
        child.role, child.parent, child.port = node.role, parent, port
        child.url = await self._ready(child)
        event(log, "stack.started", process=node.name, role=node.role, parent=parent,
              url=child.url, pid=child.process.pid)
        self._watch(child)
        return child.url

    async def _ready(self, child: Child) -> str:
        """The URL from a server's ready line (its first line on stdout)."""
        assert child.process.stdout is not None
        try:
            async with asyncio.timeout(self.settings.start_timeout_s):
                line = await child.process.stdout.readline()
        except TimeoutError:
            raise StackError(f"{child.name} did not start in time; see {child.log_path}"
                             ) from None
        if not line:
            raise StackError(f"{child.name} exited with {await child.process.wait()}; "
                             f"see {child.log_path}")
        return str(json.loads(line)["url"])

    async def _devices(self, urls: dict[str, str]) -> None:
        """Synthetic devices encode live: one process per lower server. Pre-encoded and packet
        devices are cheap and share a send log (latency between servers): one process for the
        servers on the host. An isolated server's devices run in its namespace, a process of
        their own, numbered after the others."""
        s = self.settings
        common = ["--device", "cam", "--size", s.size, "--fps", str(s.fps), "--video", s.video]
        leaves = [(leaf, s.devices_of(leaf)) for leaf in s.topology.leaves()]
        leaves = [(leaf, n) for leaf, n in leaves if n > 0]
        host = [(leaf, n) for leaf, n in leaves if leaf.name not in self.namespaces]
        isolated = [(leaf, n) for leaf, n in leaves if leaf.name in self.namespaces]
        first = 1
        if s.video != "synthetic" and host:
            servers = [a for leaf, _ in host for a in ("--server", urls[leaf.name])]
            counts = ",".join(str(n) for _, n in host)
            await self._spawn("devices", ["-m", "endpoint", *servers, "--counts", counts,
                                          "--start", "1", *common, *self._media("")])
            first += sum(n for _, n in host)
            host = []
        for leaf, count in [*host, *isolated]:
            ns = self.namespaces.get(leaf.name)
            await self._spawn(f"devices-{leaf.name}", [
                "-m", "endpoint", "--server", urls[leaf.name], "--start", str(first),
                "--count", str(count), *common, *self._media(leaf.name)],
                ns.prefix() if ns is not None else ())
            first += count
        for child in self.children:
            if child.role is None:
                self._watch(child)

    async def _spawn(self, name: str, args: list[str], prefix: tuple[str, ...] | list[str] = (),
                     env: Mapping[str, str] | None = None) -> Child:
        assert self.log_dir is not None
        log_path = self.log_dir / f"{name}.log"
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        process, log_file = await self._exec(log_path, [*prefix], args, environment)
        child = Child(name, args, process, log_path, log_file, environment, tuple(prefix))
        self.children.append(child)
        return child

    @staticmethod
    async def _exec(log_path: Path, prefix: list[str], args: list[str], env: dict[str, str]
                    ) -> tuple[asyncio.subprocess.Process, IO[bytes]]:
        log_file = log_path.open("ab")  # closed in stop() (or when started again)
        try:
            process = await asyncio.create_subprocess_exec(
                *prefix, sys.executable, *args, stdout=asyncio.subprocess.PIPE,
                stderr=log_file, stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=_die_with_parent, env=env)
        except BaseException:
            log_file.close()
            raise
        return process, log_file

    # ------------------------------------------------------------------ deaths and faults

    def _watch(self, child: Child) -> None:
        self._watchers.spawn(self._watch_one(child, child.process),
                             f"stack-watch-{child.name}")

    async def _watch_one(self, child: Child, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if self._stopping or child.process is not process:
            return
        alive_s = round(time.time() - child.started_at, 1)
        if child.expected_exit:
            child.expected_exit = False
            event(log, "stack.killed", process=child.name, code=code, pid=process.pid,
                  alive_s=alive_s)
            return
        event(log, "stack.died", logging.WARNING, process=child.name, code=code,
              pid=process.pid, alive_s=alive_s, log=str(child.log_path),
              restart_after_s=self.settings.restart_after_s if child.role else None)
        if child.role is not None and self.settings.restart_after_s is not None:
            await asyncio.sleep(self.settings.restart_after_s)
            if not self._stopping:
                try:
                    await self.start_again(child.name)
                except StackError as exc:
                    event(log, "stack.restart_failed", logging.ERROR, process=child.name,
                          error=str(exc))

    def child(self, name: str) -> Child:
        for child in self.children:
            if child.name == name:
                return child
        raise KeyError(f"no process {name!r} in this stack "
                       f"(there are {', '.join(c.name for c in self.children)})")

    def pid(self, name: str) -> int:
        return int(self.child(name).process.pid)

    def alive(self, name: str) -> bool:
        return self.child(name).process.returncode is None

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """End a process as a fault: its exit is logged as ours and it is not restarted."""
        child = self.child(name)
        if child.process.returncode is None:
            child.expected_exit = True
            os.kill(child.process.pid, sig)
            if sig != signal.SIGKILL:
                # a stopped process takes no SIGTERM: let it go on to die
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signal.SIGCONT)

    def signal(self, name: str, sig: signal.Signals) -> None:
        """Send a signal that does not end it (SIGSTOP, SIGCONT)."""
        child = self.child(name)
        if child.process.returncode is None:
            os.kill(child.process.pid, sig)

    async def start_again(self, name: str) -> str:
        """Start a server that has died (or been killed) from its command line, on its port;
        its URL. Its children and devices reconnect by themselves."""
        child = self.child(name)
        if child.process.returncode is None:
            await child.process.wait()
        assert self.log_dir is not None
        child.log_file.close()
        child.process, child.log_file = await self._exec(child.log_path, list(child.prefix),
                                                         child.args, child.env)
        child.restarts += 1
        child.started_at = time.time()
        child.expected_exit = False
        if child.role is not None:
            child.url = await self._ready(child)
        event(log, "stack.restarted", process=name, pid=child.process.pid, url=child.url,
              restarts=child.restarts)
        self._watch(child)
        return child.url or ""

    # ------------------------------------------------------------------ readiness, queries

    async def _wait_registered(self, upper: str, expected: int) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_s
        # the servers inherit our environment: with a secret in it, they want a probe token
        token = token_for("probe", os.environ.get("PROBE_TOKEN"))
        headers = {"Authorization": f"Bearer {token}"} if token else None
        async with aiohttp.ClientSession(headers=headers) as session:
            while True:
                async with session.get(f"{upper}/v1/devices") as response:
                    body = await response.json()
                if response.status != 200:
                    raise StackError(f"{upper}/v1/devices answered {response.status}: {body}")
                devices = body["devices"]
                if len(devices) >= expected:
                    return
                for child in self.children:
                    if child.process.returncode is not None:
                        raise StackError(f"{child.name} exited with {child.process.returncode};"
                                         f" see {child.log_path}")
                if time.monotonic() > deadline:
                    raise StackError(f"only {len(devices)} of {expected} devices registered in "
                                     f"{self.settings.start_timeout_s} s; logs in {self.log_dir}")
                await asyncio.sleep(0.1)

    def info(self) -> dict[str, Any]:
        return {"event": "stack_ready", "servers": [
            {"name": c.name, "role": c.role, "url": c.url, "parent": c.parent,
             "port": c.port, "pid": c.process.pid, "restarts": c.restarts,
             **({"namespace": self.namespaces[c.name].name} if c.name in self.namespaces
                else {})}
            for c in self.servers],
            "devices": [{"name": c.name, "pid": c.process.pid} for c in self.children
                        if c.role is None],
            "logs": str(self.log_dir)}

    @property
    def servers(self) -> list[Child]:
        return [c for c in self.children if c.role is not None]

    @property
    def urls(self) -> list[str]:
        return [c.url for c in self.servers if c.url]

    def url(self, name: str) -> str:
        for child in self.servers:
            if child.name == name and child.url:
                return child.url
        raise KeyError(f"no server {name!r} in this stack")

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every child (devices first), wait, then SIGKILL what is left; remove the
        namespaces."""
        self._stopping = True
        await self._watchers.close()
        for child in reversed(self.children):
            if child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGCONT)  # a stopped one takes no TERM
                    child.process.terminate()
        for child in reversed(self.children):
            try:
                async with asyncio.timeout(grace_s):
                    await child.process.wait()
            except TimeoutError:
                event(log, "stack.kill", logging.WARNING, process=child.name)
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()
            child.log_file.close()
        self.children.clear()
        self._exits.close()
        self.namespaces.clear()

