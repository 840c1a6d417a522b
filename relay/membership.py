"""Membership: who joins this server's links (devices of a lower server, child servers of an
upper one, the link to the parent), checked with the one admission function and the lab's
credentials, and what the directory (relay/directory.py) hears of each link that comes or goes.
Pure: the outbox is the only way out."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.admission import Limits, admit
from relay.directory import TreeDirectory
from relay.effects import Link
from wire.auth import Auth
from wire.logs import event
from wire.messages import (
    Announce,
    DeviceInfo,
    DeviceKind,
    Directory,
    Register,
    Registered,
    ServerEntry,
    Welcome,
)
from wire.reasons import Code, Refused

log = logging.getLogger("relay.membership")


@dataclass
class Counters:
    """What /metrics reports of the core."""

    calls_started: int = 0
    #: calls started here as the caller's server, by who started them ("api", "device")
    started_by: dict[str, int] = field(default_factory=dict)
    ended_by_reason: dict[str, int] = field(default_factory=dict)
    #: requests, messages and links turned away, by code
    refusals: dict[str, int] = field(default_factory=dict)

    def refused(self, code: str) -> None:
        self.refusals[code] = self.refusals.get(code, 0) + 1


class Membership:
    def __init__(self, directory: TreeDirectory, limits: Limits, auth: Auth,
                 counters: Counters, heartbeat_s: float,
                 load: Callable[[], tuple[bool, int]]) -> None:
        self.directory = directory
        self.outbox = directory.outbox
        self.limits = limits
        self.auth = auth
        self.counters = counters
        self.heartbeat_s = heartbeat_s
        self._load = load  #: (draining, calls in progress) now

    @property
    def name(self) -> str:
        return self.directory.name

    def device(self, register: Register, kind: DeviceKind = "device") -> Refused | None:
        """A device's first message (or a WHIP or WHEP session's, ``kind``: relay/gateway.py).
        Returns the refusal, or None when it is registered."""
        draining, calls = self._load()
        # In this order: a draining server says so; a stranger learns nothing more; a taken
        # id is named before the server is full.
        refusal = admit("device", self.name, self.limits, True, 0) if draining else None
        refusal = refusal or self._credential(f"device:{register.device}", register.token)
        if refusal is None and register.device in self.directory.own:
            refusal = Refused(Code.DUPLICATE_DEVICE, f"device {register.device!r} is already "
                              f"registered on {self.name}", "device")
        refusal = refusal or admit("device", self.name, self.limits, draining, calls,
                                   len(self.directory.own))
        if refusal is not None:
            self.counters.refused(refusal.code)
            return refusal
        info = DeviceInfo(id=register.device, server=self.name, codecs=list(register.codecs),
                          kind=kind)
        self.outbox.send(Link("device", register.device), Registered(
            server=self.name, device=register.device, address=info.address,
            heartbeat_s=self.heartbeat_s))
        self.directory.device_added(info)
        event(log, "device.registered", device=register.device, codecs=",".join(info.codecs),
              kind=kind)
        return None

    def child(self, announce: Announce) -> Refused | None:
        """A child server's first message. Returns the refusal, or None when it is welcomed."""
        draining, calls = self._load()
        refusal = admit("server", self.name, self.limits, draining, calls)
        refusal = refusal or self._credential(f"server:{announce.server}", announce.token)
        if refusal is None and self.directory.server(announce.server) is not None:
            refusal = Refused(Code.DUPLICATE_SERVER, f"a server named {announce.server!r} is "
                              "already in the tree", "server")
        if refusal is not None:
            self.counters.refused(refusal.code)
            return refusal
        entry = ServerEntry(name=announce.server, role=announce.role, url=announce.url,
                            parent=self.name)
        self.outbox.send(Link("child", announce.server), Welcome(server=self.name))
        self.directory.child_joined(entry)
        event(log, "child.connected", server=announce.server, role=announce.role,
              url=announce.url)
        return None

    def welcomed(self, welcome: Welcome) -> None:
        self.directory.parent_welcomed(welcome.server)
        event(log, "parent.connected", parent=welcome.server)

    def lost(self, link: Link) -> None:
        """A link closed: the directory forgets what it brought."""
        if link.kind == "device":
            self.directory.device_removed(link.name)
            event(log, "device.gone", device=link.name)
        elif link.kind == "child":
            gone = self.directory.child_lost(link.name)
            event(log, "child.lost", logging.WARNING, server=link.name, servers=len(gone))
        else:
            parent = self.directory.parent
            self.directory.parent_lost()
            event(log, "parent.lost", logging.WARNING, parent=parent)
        self.outbox.drop(link)

    def update(self, link: Link, update: Directory) -> list[Refused]:
        """Directory increments from a child (its subtree) or the parent (the rest)."""
        if link.kind == "child":
            return self.directory.child_update(link.name, update)
        return self.directory.parent_update(update)

    def _credential(self, identity: str, token: str | None) -> Refused | None:
        refusal = self.auth.check(identity, token)
        return Refused(Code(refusal[0]), refusal[1], "token") if refusal else None
