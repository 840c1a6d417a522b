"""What the signalling core asks the I/O layer to do, and the links it names.

The core (relay/switch.py, relay/directory.py) does no I/O: it takes messages and ``now``, and
puts effects in an :class:`Outbox`; the server (relay/node.py) drains it after every input and
carries each effect out. Links are named, never held: a device by its id, a child server by its
name, the parent as :data:`PARENT`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from wire.messages import (
    MAX_DIRECTORY_ENTRIES,
    Answer,
    DeviceInfo,
    Directory,
    Message,
    Offer,
    Role,
    ServerEntry,
)

LinkKind = Literal["device", "child", "parent"]


@dataclass(frozen=True, slots=True)
class Link:
    """A signalling link of this server: a device, a child server or the parent."""

    kind: LinkKind
    name: str

    @property
    def is_trunk(self) -> bool:
        return self.kind != "device"

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


PARENT = Link("parent", "parent")


@dataclass(frozen=True, slots=True)
class Send:
    link: Link
    message: Message


@dataclass(frozen=True, slots=True)
class PortPlan:
    """One leg of a call at this server, as the media layer is to make it."""

    link: Link
    offer: bool  #: this server makes the offer (device legs, the downstream trunk)
    codec: str  #: the video codec to put first
    role: Role | None = None  #: a device leg: the device's part in the call
    #: the device is in another call here (its id): consume its stream there, make no leg
    tap: str | None = None


@dataclass(frozen=True, slots=True)
class StartMedia:
    """Make the call's two legs and start forwarding between them."""

    call: str
    up: PortPlan  #: toward the caller
    down: PortPlan  #: toward the callee
    #: the directions the call carries media in (one only with a WHIP or WHEP party)
    directions: tuple[str, ...] = ("caller_to_callee", "callee_to_caller")


@dataclass(frozen=True, slots=True)
class Negotiate:
    """Apply an offer (and answer it on ``link``) or an answer to the leg on ``link``."""

    call: str
    link: Link
    description: Offer | Answer


@dataclass(frozen=True, slots=True)
class StopMedia:
    """Close the call's legs and cancel its tasks."""

    call: str


@dataclass(frozen=True, slots=True)
class CallChanged:
    """A call's state changed (requests waiting on it look again)."""

    call: str


@dataclass(frozen=True, slots=True)
class CloseLink:
    """Close a link, saying why (a child whose subtree cannot join the tree)."""

    link: Link
    code: str
    reason: str


Effect = Send | StartMedia | Negotiate | StopMedia | CallChanged | CloseLink

#: A directory message is cut before it grows past this many bytes (well under the 256 KiB
#: message limit whatever the entries hold).
DIRECTORY_CHUNK_BYTES = 96 * 1024


@dataclass
class DirectoryBatch:
    """Directory changes for one link, coalesced until the outbox is drained.

    A device added then removed (or the reverse) leaves only its last state. A server removed
    then added again keeps both, the removal first, so the receiver drops the old devices."""

    servers: dict[str, ServerEntry] = field(default_factory=dict)
    servers_removed: dict[str, None] = field(default_factory=dict)
    devices: dict[str, DeviceInfo] = field(default_factory=dict)
    devices_removed: dict[str, None] = field(default_factory=dict)

    def add_server(self, entry: ServerEntry) -> None:
        self.servers[entry.name] = entry

    def remove_server(self, name: str) -> None:
        self.servers.pop(name, None)
        for address in [a for a, d in self.devices.items() if d.server == name]:
            del self.devices[address]
        self.servers_removed[name] = None

    def add_device(self, info: DeviceInfo) -> None:
        self.devices_removed.pop(info.address, None)
        self.devices[info.address] = info

    def remove_device(self, address: str) -> None:
        self.devices.pop(address, None)
        self.devices_removed[address] = None

    def __bool__(self) -> bool:
        return bool(self.servers or self.servers_removed or self.devices
                    or self.devices_removed)

    def messages(self) -> list[Directory]:
        """The batch as directory messages, each list at most MAX_DIRECTORY_ENTRIES long and
        each message at most about DIRECTORY_CHUNK_BYTES. Removed servers go first, then
        servers (parents before their children, as they were added), devices, removed devices.
        """
        out: list[Directory] = []
        parts: dict[str, list[object]] = {}
        size = 0

        def cut() -> None:
            nonlocal parts, size
            if parts:
                out.append(Directory(**parts))  # type: ignore[arg-type]
            parts, size = {}, 0

        items: list[tuple[str, object, int]] = []
        items += [("servers_removed", n, len(n) + 4) for n in self.servers_removed]
        items += [("servers", e, len(e.name) + len(e.url) + len(e.parent or "") + 60)
                  for e in self.servers.values()]
        items += [("devices", d, 2 * len(d.id) + 2 * len(d.server) + 90)
                  for d in self.devices.values()]
        items += [("devices_removed", a, len(a) + 4) for a in self.devices_removed]
        for key, item, item_size in items:
            if (size + item_size > DIRECTORY_CHUNK_BYTES
                    or len(parts.get(key, ())) >= MAX_DIRECTORY_ENTRIES):
                cut()
            parts.setdefault(key, []).append(item)
            size += item_size
        cut()
        return out


#: directory changes wait this long to go out together (a burst of joins costs a few messages)
DIRECTORY_FLUSH_S = 0.05


class Outbox:
    """Effects in the order they were made. Directory changes wait per link, coalescing, and are
    cut into bounded messages when they are flushed (``take(directory=True)``: the server does
    it a moment after the first change, so a burst of changes, such as many servers joining at
    once, goes out as a few messages) or before anything else is sent on that link (so a link
    sees changes and messages in the order they happened)."""

    def __init__(self) -> None:
        self._effects: list[Effect] = []
        self._batches: dict[Link, DirectoryBatch] = {}

    def send(self, link: Link, message: Message) -> None:
        self._flush(link)
        self._effects.append(Send(link, message))

    def add(self, effect: Effect) -> None:
        self._effects.append(effect)

    def directory(self, link: Link) -> DirectoryBatch:
        """The pending directory changes for ``link``, to add to."""
        batch = self._batches.get(link)
        if batch is None:
            batch = self._batches[link] = DirectoryBatch()
        return batch

    def drop(self, link: Link) -> None:
        """Forget what was waiting for a link that is gone."""
        self._batches.pop(link, None)

    def _flush(self, link: Link) -> None:
        batch = self._batches.pop(link, None)
        if batch:
            self._effects.extend(Send(link, m) for m in batch.messages())

    @property
    def directory_pending(self) -> bool:
        return any(self._batches.values())

    def flush_directory(self) -> None:
        """The waiting directory changes become messages, after the effects so far."""
        for link in list(self._batches):
            self._flush(link)

    def take(self, directory: bool = True) -> list[Effect]:
        """The effects so far; with ``directory``, the waiting directory changes too."""
        if directory:
            self.flush_directory()
        effects, self._effects = self._effects, []
        return effects
