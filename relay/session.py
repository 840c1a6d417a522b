"""A call as one server carries it: the call (relay/call.py) and its two ports, each a named link
and, for a device, the device's part and codecs. Pure data, shared by the core's parts."""

from __future__ import annotations

from dataclasses import dataclass

from relay.call import Call
from relay.effects import Link
from wire.messages import VIDEO_CODECS, Role


@dataclass
class Port:
    """One side of a call at this server: the link, and for a device its part and codecs."""

    link: Link
    role: Role | None = None
    codecs: tuple[str, ...] = VIDEO_CODECS
    #: a device watched while in another call (that call's id): its stream is fanned out to
    #: this call too; it is not woken, told or made idle by this call
    tap: str | None = None


@dataclass
class Session:
    call: Call
    up: Port  #: toward the caller
    down: Port  #: toward the callee
    routed: bool = False  #: the callee's server accepted: the legs are up or coming

    @property
    def ports(self) -> tuple[Port, Port]:
        return (self.up, self.down)

    @property
    def links(self) -> list[Link]:
        return [self.up.link, self.down.link]

    def port_for(self, link: Link) -> Port | None:
        if self.up.link == link:
            return self.up
        if self.down.link == link:
            return self.down
        return None
