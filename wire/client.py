"""The probe's view of the servers: HTTP clients, discovery of the tree, and device choice."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from wire.credentials import Credentials
from wire.logs import event
from wire.messages import (
    Body,
    CallInfo,
    CreateCall,
    DeviceInfo,
    DeviceList,
    ErrorBody,
    MessageError,
    Script,
    ServerEntry,
    ServerInfo,
    ServerList,
    split_address,
)

log = logging.getLogger("wire.client")

B = TypeVar("B", bound=Body)


class ProbeError(Exception):
    """Something the probe cannot go on with; ``code`` classifies it."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass
class Server:
    """A server of the tree as the probe found it: where to reach it, its place in the tree,
    and (a lower server) its devices."""

    url: str
    entry: ServerEntry
    devices: list[DeviceInfo] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def role(self) -> str:
        return self.entry.role

    @property
    def parent(self) -> str | None:
        return self.entry.parent


class ServerClient:
    """Talks HTTP/JSON to one server. Errors come back as ProbeError with the server's code."""

    def __init__(self, session: aiohttp.ClientSession, url: str, timeout_s: float = 10.0) -> None:
        self.session = session
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s  #: for a request that does not wait on purpose

    async def _request(self, method: str, path: str, body: Any = None,
                       timeout_s: float | None = None) -> tuple[int, Any]:
        timeout_s = timeout_s if timeout_s is not None else self.timeout_s
        try:
            async with self.session.request(
                    method, self.url + path, json=body,
                    timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                data = await response.json(content_type=None)
                return response.status, data
        except TimeoutError:
            raise ProbeError("timeout", f"{method} {self.url}{path}: no answer in "
                                        f"{timeout_s} s") from None
        except aiohttp.ClientError as exc:
            raise ProbeError("server_unreachable", f"{method} {self.url}{path}: {exc}") from None
        except ValueError:
            raise ProbeError("bad_response", f"{method} {self.url}{path}: not JSON") from None

    async def _get(self, path: str, timeout_s: float | None = None) -> Any:
        status, data = await self._request("GET", path, timeout_s=timeout_s)
        return self._check(status, data)

    def _check(self, status: int, data: Any) -> Any:
        if status >= 400:
            try:
                error = ErrorBody.from_dict(data).error
                raise ProbeError(error.code, error.message, status)
            except MessageError:
                raise ProbeError("bad_response", f"HTTP {status}: {data!r}", status) from None
        return data

    def _parse(self, kind: type[B], data: Any) -> B:
        """A success body as ``kind``: one that is not is the server's error, said as one."""
        try:
            return kind.from_dict(data)
        except MessageError as exc:
            raise ProbeError("bad_response", f"{self.url}: not a {kind.__name__}: {exc}") from None

    async def server(self) -> ServerInfo:
        return self._parse(ServerInfo, await self._get("/v1/server"))

    async def servers(self) -> list[ServerEntry]:
        return self._parse(ServerList, await self._get("/v1/servers")).servers

    async def devices(self) -> list[DeviceInfo]:
        return self._parse(DeviceList, await self._get("/v1/devices")).devices

    async def create_call(self, caller: str, callee: str, media: str = "full",
                          script: Script | None = None, dial_from: str = "api") -> CallInfo:
        body = CreateCall(caller=caller, callee=callee, media_mode=media,  # type: ignore[arg-type]
                          script=script, dial_from=dial_from).to_dict()  # type: ignore[arg-type]
        status, data = await self._request("POST", "/v1/calls", body)
        return self._parse(CallInfo, self._check(status, data))

    async def call(self, call_id: str, wait: str | None = None,
                   timeout_s: float = 10.0) -> CallInfo:
        path = f"/v1/calls/{call_id}" + (f"?wait={wait}&timeout={timeout_s}" if wait else "")
        return self._parse(CallInfo, await self._get(
            path, timeout_s=timeout_s + self.timeout_s if wait else None))

    async def hangup(self, call_id: str) -> CallInfo:
        status, data = await self._request("DELETE", f"/v1/calls/{call_id}")
        return self._parse(CallInfo, self._check(status, data))


async def discover(session: aiohttp.ClientSession, urls: list[str],
                   credentials: Credentials | None = None, optional_timeout_s: float = 3.0,
                   concurrency: int = 64) -> list[Server]:
    """The whole tree from any of its servers: each server given (which must answer) lists every
    server it knows, from the root down (``GET /v1/servers``); then every lower server is asked
    for its devices. A server found through another may be down: it is left out, and the calls
    that need it will say so. Lower servers first, then upper; by name. ``credentials`` learns
    each server found (which token it may be shown)."""
    entries: dict[str, ServerEntry] = {}
    reach: dict[str, str] = {}  #: name -> the URL to use (a given one wins over an announced)

    async def ask(url: str) -> None:
        client = ServerClient(session, url)
        info, known = await asyncio.gather(client.server(), client.servers())
        reach[info.name] = client.url
        for entry in known:
            entries.setdefault(entry.name, entry)

    await asyncio.gather(*(ask(u) for u in urls))
    gate = asyncio.Semaphore(concurrency)
    found: dict[str, Server] = {}

    async def devices(entry: ServerEntry) -> None:
        url = reach.get(entry.name, entry.url).rstrip("/")
        given = entry.name in reach
        if credentials is not None and not given:
            credentials.found(url, entry.name)
        if entry.role != "lower":
            found[entry.name] = Server(url, entry)
            return
        async with gate:
            client = ServerClient(session, url, 10.0 if given else optional_timeout_s)
            try:
                found[entry.name] = Server(url, entry, await client.devices())
            except ProbeError as exc:
                if given:
                    raise
                reason = exc.message
                if exc.status == 401 and credentials is not None and credentials.withheld(url):
                    reason = ("the probe shows its token only to the servers it was given: "
                              "give this one with --server, or --trust-announced")
                event(log, "discover.skipped", logging.WARNING, url=url, server=entry.name,
                      code=exc.code, reason=reason)

    await asyncio.gather(*(devices(e) for e in entries.values()))
    return sorted(found.values(), key=lambda s: (s.role != "lower", s.name))


class TreePaths:
    """The servers a call between two lower servers crosses: up to their lowest common
    ancestor, then down (the path the servers route it on). Built once from the tree; each
    path is worked out once."""

    def __init__(self, servers: list[Server]) -> None:
        self._parents = {s.name: s.parent for s in servers}
        self._known: dict[tuple[str, str], list[str]] = {}

    def _up(self, name: str) -> list[str]:
        chain = [name]
        while self._parents.get(chain[-1]) is not None and len(chain) <= len(self._parents):
            chain.append(self._parents[chain[-1]])  # type: ignore[arg-type]
        return chain

    def __call__(self, a: str, b: str) -> list[str]:
        found = self._known.get((a, b))
        if found is None:
            ua, ub = self._up(a), self._up(b)
            common = next((n for n in ua if n in ub), None)
            if common is None:
                raise ProbeError("no_path", f"{a} and {b} are not in one tree")
            found = self._known[a, b] = ua[:ua.index(common) + 1] + ub[:ub.index(common)][::-1]
        return found


def tree_path(servers: list[Server], a: str, b: str) -> list[str]:
    """The tree path from lower server ``a`` to ``b`` (see TreePaths, to ask many times)."""
    return TreePaths(servers)(a, b)


def lower_servers(servers: list[Server]) -> list[Server]:
    return [s for s in servers if s.role == "lower"]


def find_device(servers: list[Server], address: str) -> tuple[Server, DeviceInfo]:
    server_name, device = split_address(address)
    matches = [(s, d) for s in lower_servers(servers) for d in s.devices
               if d.id == device and server_name in (None, s.name)]
    if not matches:
        lowers = lower_servers(servers)
        if server_name is not None and server_name not in {s.name for s in lowers}:
            where = f"no lower server {server_name!r} in the tree"
        else:
            where = "searched " + (", ".join(f"{s.name} ({len(s.devices)} devices)"
                                             for s in lowers) or "no lower server")
        raise ProbeError("unknown_device", f"no device {address!r}: {where}")
    if len(matches) > 1:
        raise ProbeError("ambiguous_device", f"{address!r} names several devices: "
                         + ", ".join(d.address for _, d in matches))
    return matches[0]


def pick_pair(servers: list[Server], via: str | None = None) -> tuple[str, str]:
    """The first idle device under one lower server and the first under another (with ``via``:
    another such that the call's path crosses server ``via``)."""
    idle = [(s, d) for s in lower_servers(servers) for d in s.devices if d.state == "idle"]
    path = TreePaths(servers)
    for s1, d1 in idle:
        for s2, d2 in idle:
            if s2.name != s1.name and (via is None or via in path(s1.name, s2.name)):
                return d1.address, d2.address
    through = f" whose path crosses {via}" if via else ""
    raise ProbeError("no_pair", f"need idle devices under two different lower servers{through};"
                     " found " + (", ".join(d.address for _, d in idle) or "none"))
