"""A tree of signalling cores (relay/switch.py) wired back to back in memory, with no socket.

Every message a core sends is encoded to JSON and decoded with the receiving link's rules, as on
the wire, and handed to the core at the other end; media effects are answered as the server's
media layer would (an offer for every leg this server offers on, an answer for every offer it
gets); devices answer wake-ups and offers and report a first frame. Time is ``tree.now``.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from relay.admission import Limits
from relay.call import Timeouts
from relay.directory import TreeDirectory
from relay.effects import (
    PARENT,
    CallChanged,
    CloseLink,
    Effect,
    Link,
    Negotiate,
    Outbox,
    Send,
    StartMedia,
    StopMedia,
)
from relay.switch import Switch
from wire.messages import (
    CHILD_TO_PARENT,
    DEVICE_TO_SERVER,
    PARENT_TO_CHILD,
    SERVER_TO_DEVICE,
    VIDEO_CODECS,
    Announce,
    Answer,
    CreateCall,
    Dial,
    Directory,
    Error,
    FirstFrame,
    Hangup,
    MediaStats,
    Message,
    Offer,
    Pickup,
    PlaceCall,
    Register,
    ServerEntry,
    Stats,
    Wake,
    Welcome,
    Woken,
    decode,
)
from wire.reasons import Refused

SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\n"


@dataclass
class FakeDevice:
    server: str
    id: str
    codecs: tuple[str, ...] = VIDEO_CODECS
    answers_wake: bool = True  #: False: a device that registered and then went quiet
    rings: bool = False  #: as the callee: ring, and answer only when picked up (``pickup``)
    first_frame: bool = True  #: False: it decodes nothing (it receives no media)
    #: asked to dial (``place_call``): "dial" does, "refuse" answers an error, "ignore" nothing
    places: str = "dial"
    received: list[Message] = field(default_factory=list)
    calls: dict[str, str] = field(default_factory=dict)  #: call -> role, while in it
    held: dict[str, Offer] = field(default_factory=dict)  #: offers that came while ringing

    def handle(self, message: Message, now: float) -> list[Message]:
        self.received.append(message)
        if not self.answers_wake:
            return []
        if isinstance(message, PlaceCall):
            if self.places == "dial":
                return [Dial(callee=message.callee, seq=message.ref, ref=message.ref,
                             script=message.script)]
            if self.places == "refuse":
                return [Error(code="protocol_error", message="a person dials here",
                              ref=message.TYPE)]
            return []
        if isinstance(message, Wake):
            self.calls[message.call] = message.role
            return [Woken(call=message.call, at=now,
                          ringing=self.rings and message.role == "callee")]
        if isinstance(message, Offer):
            if self.rings and self.calls.get(message.call) == "callee":
                self.held[message.call] = message
                return []
            return self._answer(message, now)
        if isinstance(message, Hangup):
            self.calls.pop(message.call, None)
            self.held.pop(message.call, None)
            return [Stats(call=message.call, media=MediaStats(frames=30, fps=30.0))]
        return []

    def _answer(self, offer: Offer, now: float) -> list[Message]:
        answer: list[Message] = [Answer(call=offer.call, leg=offer.leg, sdp=SDP)]
        return [*answer, FirstFrame(call=offer.call, at=now)] if self.first_frame else answer

    def pickup(self, call: str, now: float) -> list[Message]:
        """A person picks up: ``pickup``, then the answer to the offer it held."""
        held = self.held.pop(call, None)
        return [Pickup(call=call, at=now), *(self._answer(held, now) if held else [])]


@dataclass
class Wire:
    """A message on its way: to ``server`` (None: to a device) over ``link`` as the receiver
    names it."""

    server: str | None
    link: Link
    message: Message
    device: tuple[str, str] | None = None


class FakeTree:
    """``topology`` as `python -m relay stack --topology` takes it: a node with children is an
    upper server, a leaf a lower server."""

    def __init__(self, topology: dict[str, Any], limits: Limits | None = None,
                 timeouts: Timeouts | None = None) -> None:
        self.now = 1000.0
        self.limits = limits or Limits()
        self.timeouts = timeouts or Timeouts()
        #: the media layer closes a call's legs as soon as it is told (False: never, and the
        #: close timer ends it)
        self.legs_close = True
        self.servers: dict[str, Switch] = {}
        self.parent_of: dict[str, str | None] = {}
        self.devices: dict[tuple[str, str], FakeDevice] = {}
        self.wires: deque[Wire] = deque()
        self.media: dict[str, list[Effect]] = {}  #: server -> its media effects
        self.sent: list[tuple[str, Link, Message]] = []  #: every message, as (sender, link, it)
        self.refusals: list[Refused] = []
        self.dead: set[str] = set()
        self._ids = itertools.count(1)
        self._build(topology, None)
        self.pump()

    # ------------------------------------------------------------------ building

    def _build(self, node: dict[str, Any], parent: str | None) -> None:
        name = node["name"]
        role = "upper" if node.get("children") else "lower"
        self.add_server(name, role, parent)
        for child in node.get("children", []):
            self._build(child, name)

    def add_server(self, name: str, role: str, parent: str | None) -> Refused | None:
        entry = ServerEntry(name=name, role=role, url=f"http://{name}:80")  # type: ignore[arg-type]
        switch = Switch(TreeDirectory(entry, Outbox(), has_parent=parent is not None),
                        self.limits, self.timeouts,
                        call_id=lambda: f"call-{next(self._ids)}")
        self.servers[name] = switch
        self.parent_of[name] = parent
        self.media[name] = []
        if parent is not None:
            refusal = self.servers[parent].child_announce(
                Announce(server=name, url=entry.url, role=entry.role), self.now)  # type: ignore[arg-type]
            if refusal is not None:
                del self.servers[name]
                return refusal
            self._drain(parent)
        return None

    def register(self, server: str, device: str, codecs: tuple[str, ...] = VIDEO_CODECS,
                 kind: str = "device", **options: Any) -> FakeDevice:
        fake = FakeDevice(server, device, codecs, **options)
        refusal = self.servers[server].device_register(
            Register(device=device, codecs=list(codecs)), self.now, kind)  # type: ignore[arg-type]
        if refusal is not None:
            raise refusal
        self.devices[(server, device)] = fake
        self._drain(server)
        self.pump()
        return fake

    # ------------------------------------------------------------------ running

    def call(self, server: str, caller: str, callee: str, media: str = "full") -> str:
        """Start a call as the probe would; raises Refused as the HTTP API would answer."""
        call = self.servers[server].create_call(
            CreateCall(caller=caller, callee=callee, media_mode=media), self.now)  # type: ignore[arg-type]
        if isinstance(call, Refused):
            raise call
        self._drain(server)
        self.pump()
        return call.id

    def from_device(self, server: str, device: str, *messages: Message) -> None:
        """What a device sends its server (as on the wire), and all it causes."""
        for message in messages:
            self._deliver(server, Link("device", device), message, DEVICE_TO_SERVER)
        self.pump()

    def hangup(self, server: str, call: str) -> None:
        self.servers[server].hangup(call, self.now)
        self._drain(server)
        self.pump()

    def tick(self, seconds: float) -> None:
        self.now += seconds
        for name, switch in self.servers.items():
            switch.handle_timer(self.now)
            self._drain(name)
        self.pump()

    def kill(self, name: str) -> None:
        """The server stops: its parent and children see their links close."""
        self.dead.add(name)
        switch = self.servers.pop(name)
        parent = self.parent_of[name]
        if parent is not None and parent in self.servers:
            self.servers[parent].link_lost(Link("child", name), self.now)
            self._drain(parent)
        for child, its_parent in self.parent_of.items():
            if its_parent == name and child in self.servers:
                self.servers[child].link_lost(PARENT, self.now)
                self._drain(child)
        del switch
        self.pump()

    def pump(self, limit: int = 100_000) -> None:
        """Deliver every message in flight, and what it causes, until the tree is quiet."""
        for _ in range(limit):
            if not self.wires:
                return
            wire = self.wires.popleft()
            if wire.device is not None:
                device = self.devices.get(wire.device)
                if device is None:
                    continue
                server, device_id = wire.device
                for reply in device.handle(wire.message, self.now):
                    self._deliver(server, Link("device", device_id), reply, DEVICE_TO_SERVER)
                continue
            assert wire.server is not None
            switch = self.servers.get(wire.server)
            if switch is None:
                continue
            if isinstance(wire.message, Welcome):
                switch.parent_welcomed(wire.message, self.now)
            else:
                switch.receive(wire.link, wire.message, self.now)
            self._drain(wire.server)
        raise AssertionError("the tree did not settle")

    def _deliver(self, server: str, link: Link, message: Message,
                 allowed: tuple[type[Message], ...]) -> None:
        """As on the wire: encoded, decoded with the receiving link's rules."""
        self.wires.append(Wire(server, link, decode(message.to_json(), allowed)))

    def _drain(self, name: str) -> None:
        switch = self.servers.get(name)
        if switch is None:
            return
        while effects := switch.outbox.take():
            for effect in effects:
                self._carry_out(name, effect)

    def _carry_out(self, name: str, effect: Effect) -> None:
        if isinstance(effect, Send):
            self._send(name, effect.link, effect.message)
        elif isinstance(effect, StartMedia):
            self.media[name].append(effect)
            for plan in (effect.up, effect.down):
                if plan.offer:
                    self._send(name, plan.link, Offer(call=effect.call, leg=effect.call, sdp=SDP))
        elif isinstance(effect, Negotiate):
            self.media[name].append(effect)
            if isinstance(effect.description, Offer):
                self._send(name, effect.link, Answer(call=effect.call, leg=effect.call, sdp=SDP))
        elif isinstance(effect, StopMedia | CloseLink):
            self.media[name].append(effect)
            if isinstance(effect, StopMedia) and self.legs_close:
                self.servers[name].media_closed(effect.call, self.now)  # at once, here
        else:
            assert isinstance(effect, CallChanged)

    def _send(self, name: str, link: Link, message: Message) -> None:
        self.sent.append((name, link, message))
        if link.kind == "device":
            wire = decode(message.to_json(), SERVER_TO_DEVICE)
            self.wires.append(Wire(None, link, wire, (name, link.name)))
        elif link.kind == "child":
            self._deliver(link.name, PARENT, message, PARENT_TO_CHILD)
        else:
            parent = self.parent_of[name]
            assert parent is not None
            self._deliver(parent, Link("child", name), message, CHILD_TO_PARENT)

    # ------------------------------------------------------------------ reading

    def path_between(self, a: str, b: str) -> list[str]:
        """The tree path from lower server ``a`` to ``b``, worked out from the topology."""
        def up(name: str) -> list[str]:
            chain = [name]
            while self.parent_of[chain[-1]] is not None:
                chain.append(self.parent_of[chain[-1]])  # type: ignore[arg-type]
            return chain
        ua, ub = up(a), up(b)
        common = next(n for n in ua if n in ub)
        return ua[:ua.index(common) + 1] + ub[:ub.index(common)][::-1]

    def carrying(self, call: str) -> set[str]:
        """The servers with a session for ``call`` now."""
        return {n for n, s in self.servers.items() if call in s.sessions}

    def seen(self, call: str) -> set[str]:
        """The servers that carried ``call`` (in progress or ended)."""
        return {n for n, s in self.servers.items() if s.find_call(call) is not None}

    def messages_on(self, kind: type[Message]) -> list[tuple[str, Link, Message]]:
        return [s for s in self.sent if isinstance(s[2], kind)]

    def directory_messages(self) -> list[tuple[str, Link, Directory]]:
        return self.messages_on(Directory)  # type: ignore[return-value]
