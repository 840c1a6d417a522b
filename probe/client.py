"""The probe's view of the servers: HTTP clients, discovery of the tree, and device choice."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from relay.logs import event
from relay.messages import (
    CallInfo,
    CreateCall,
    DeviceInfo,
    DeviceList,
    ErrorBody,
    MessageError,
    ServerInfo,
    split_address,
)

log = logging.getLogger("probe.client")


class ProbeError(Exception):
    """Something the probe cannot go on with; ``code`` classifies it."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass
class Server:
    url: str
    info: ServerInfo
    devices: list[DeviceInfo] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.info.name


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

    async def server(self) -> ServerInfo:
        return ServerInfo.from_dict(await self._get("/v1/server"))

    async def devices(self) -> list[DeviceInfo]:
        return DeviceList.from_dict(await self._get("/v1/devices")).devices

    async def create_call(self, caller: str, callee: str, media: str = "full") -> CallInfo:
        body = CreateCall(caller=caller, callee=callee, media_mode=media).to_dict()
        status, data = await self._request("POST", "/v1/calls", body)
        return CallInfo.from_dict(self._check(status, data))

    async def call(self, call_id: str, wait: str | None = None,
                   timeout_s: float = 10.0) -> CallInfo:
        path = f"/v1/calls/{call_id}" + (f"?wait={wait}&timeout={timeout_s}" if wait else "")
        return CallInfo.from_dict(await self._get(
            path, timeout_s=timeout_s + self.timeout_s if wait else None))

    async def hangup(self, call_id: str) -> CallInfo:
        status, data = await self._request("DELETE", f"/v1/calls/{call_id}")
        return CallInfo.from_dict(self._check(status, data))


async def discover(session: aiohttp.ClientSession, urls: list[str],
                   optional_timeout_s: float = 3.0) -> list[Server]:
    """Ask every server given, concurrently; add the parent a lower server names and the lower
    servers an upper server names. A server given must answer; one found through another may
    be down (it is left out, and the calls that need it will say so)."""
    seen: dict[str, Server] = {}

    async def visit(url: str, optional: bool = False) -> None:
        client = ServerClient(session, url, optional_timeout_s if optional else 10.0)
        try:
            info, devices = await asyncio.gather(client.server(), client.devices())
        except ProbeError as exc:
            if not optional:
                raise
            event(log, "discover.skipped", logging.WARNING, url=url, code=exc.code,
                  reason=exc.message)
            return
        seen[info.name] = Server(client.url, info,
                                 devices if info.role == "lower" else [])

    await asyncio.gather(*(visit(u) for u in urls))
    # From a lower server up to its parent, and from an upper server down to its children.
    parents = {http_url(s.info.parent) for s in seen.values()
               if s.info.parent and s.info.parent_connected}
    known = {s.url for s in seen.values()}
    if parents - known:
        await asyncio.gather(*(visit(u, optional=True) for u in parents - known))
    extra = {c.url for s in list(seen.values()) for c in s.info.children
             if c.name not in seen and c.url}
    if extra:
        await asyncio.gather(*(visit(u, optional=True) for u in extra))
    return sorted(seen.values(), key=lambda s: (s.info.role != "lower", s.name))


def http_url(url: str) -> str:
    """A server's HTTP base URL from the ws:// or http:// URL it was given as a parent."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def lower_servers(servers: list[Server]) -> list[Server]:
    return [s for s in servers if s.info.role == "lower"]


def find_device(servers: list[Server], address: str) -> tuple[Server, DeviceInfo]:
    server_name, device = split_address(address)
    matches = [(s, d) for s in lower_servers(servers) for d in s.devices
               if d.id == device and server_name in (None, s.name)]
    if not matches:
        raise ProbeError("unknown_device", f"no device {address!r} on the servers given")
    if len(matches) > 1:
        raise ProbeError("ambiguous_device", f"{address!r} names several devices: "
                         + ", ".join(d.address for _, d in matches))
    return matches[0]


def pick_pair(servers: list[Server]) -> tuple[str, str]:
    """The first idle device under one lower server and the first under another."""
    idle = [(s, d) for s in lower_servers(servers) for d in s.devices if d.state == "idle"]
    for s1, d1 in idle:
        for s2, d2 in idle:
            if s2.name != s1.name:
                return d1.address, d2.address
    raise ProbeError("no_pair", "need idle devices under two different lower servers; found "
                     + (", ".join(d.address for _, d in idle) or "none"))
