"""The directory of one server: the servers and devices it knows, and the bounded increments that
keep its neighbours' views right. Pure: changes in, directory messages out (through the outbox).

What a server holds:

- a lower server: its own devices (id, codecs, idle/busy);
- an upper server: every server of its subtree (name, role, URL, parent, and which child leads
  there) and every device of those servers, with an index from device id to addresses;
- every server: the servers of the rest of the tree, as its parent tells it (names, roles, URLs,
  parents: never their devices).

What it sends:

- up, to its parent: increments of its subtree (servers and devices added, changed, removed); a
  removed server takes its devices with it, so losing a child costs one name per server;
- down, to each child: increments of the servers outside that child's subtree.

So a device that registers, leaves or goes busy costs one small message per ancestor, and nothing
below them; a server that joins or leaves costs one entry at every server of the tree. A child
that joins gets the rest of the tree's servers; its parent gets the child's subtree, both cut
into messages of at most MAX_DIRECTORY_ENTRIES entries (relay/effects.py). Each side starts a
link with nothing from the other: there is no "full" message to lose or to overflow.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from msgspec.structs import replace

from relay.effects import PARENT, DirectoryBatch, Link, Outbox
from wire.messages import DeviceInfo, Directory, ServerEntry, ServerRole, split_address
from wire.reasons import Code, Refused


@dataclass
class TreeDirectory:
    """What one server knows of the tree. ``me`` is this server's own entry."""

    me: ServerEntry
    outbox: Outbox
    max_devices: int = 1_000_000  #: devices of the subtree kept at most (an upper server)
    #: a lower server's own devices, by id
    own: dict[str, DeviceInfo] = field(default_factory=dict)
    #: the servers of the subtree below this one, by name
    below: dict[str, ServerEntry] = field(default_factory=dict)
    #: for each server below: the child that leads to it
    via: dict[str, str] = field(default_factory=dict)
    #: devices of the subtree, by address; the addresses of each device id and of each server
    devices: dict[str, DeviceInfo] = field(default_factory=dict)
    by_id: dict[str, set[str]] = field(default_factory=dict)
    by_server: dict[str, set[str]] = field(default_factory=dict)
    #: the servers outside this server's subtree, as the parent told
    above: dict[str, ServerEntry] = field(default_factory=dict)
    #: the parent's name while its link is up
    parent: str | None = None
    #: this server is configured with a parent (so without its link it is cut off, not a root)
    has_parent: bool = False
    #: servers that were in the tree and left it (a link on the way to them went down), most
    #: recent last, at most LEFT_KEPT: a call to one is refused as unreachable, not unknown
    left: dict[str, None] = field(default_factory=dict)

    LEFT_KEPT = 10_000

    @property
    def cut_off(self) -> bool:
        """Configured with a parent, and its link is down: the rest of the tree is unknown."""
        return self.has_parent and self.parent is None

    @property
    def name(self) -> str:
        return self.me.name

    @property
    def role(self) -> ServerRole:
        return self.me.role

    # ------------------------------------------------------------------ queries

    def server(self, name: str) -> ServerEntry | None:
        if name == self.me.name:
            return self.me
        return self.below.get(name) or self.above.get(name)

    def has_left(self, name: str) -> bool:
        """``name`` was in the tree and has left it (and has not come back)."""
        return name in self.left

    def _gone(self, name: str) -> None:
        self.left.pop(name, None)
        self.left[name] = None
        while len(self.left) > self.LEFT_KEPT:
            del self.left[next(iter(self.left))]

    def _back(self, name: str) -> None:
        self.left.pop(name, None)

    def servers(self) -> list[ServerEntry]:
        """Every server this one knows, itself included."""
        return [*self.above.values(), self.me, *self.below.values()]

    def children(self) -> list[str]:
        return [n for n, e in self.below.items() if e.parent == self.me.name]

    def _descendants(self, name: str) -> list[str]:
        """``name`` and every server below it, deepest first."""
        out, todo = [], [name]
        while todo:
            current = todo.pop()
            out.append(current)
            todo += [n for n, e in self.below.items() if e.parent == current]
        return out[::-1]

    def subtree_of(self, child: str) -> list[str]:
        """The servers reached through ``child``, the child included."""
        return [n for n, c in self.via.items() if c == child]

    def next_hop(self, server: str) -> Link | None:
        """The link toward ``server`` (None: it is this server, or nowhere known)."""
        child = self.via.get(server)
        if child is not None:
            return Link("child", child)
        if server in self.above and self.parent is not None:
            return PARENT
        return None

    def subtree_devices(self) -> list[DeviceInfo]:
        if self.role == "lower":
            return [self.own[d] for d in sorted(self.own)]
        return [self.devices[a] for a in sorted(self.devices)]

    def devices_of(self, server: str) -> list[DeviceInfo]:
        """The devices of one server of the subtree (this one's own, for a lower server)."""
        if server == self.name:
            return self.subtree_devices() if self.role == "lower" else []
        return [self.devices[a] for a in sorted(self.by_server.get(server, ()))]

    def device_count(self, child: str) -> int:
        return sum(len(self.by_server.get(n, ())) for n in self.subtree_of(child))

    def find(self, device_id: str) -> list[str]:
        """Addresses of the devices named ``device_id`` in the subtree (an upper server)."""
        return sorted(self.by_id.get(device_id, ()))

    # ------------------------------------------------------------------ own devices (lower)

    def device_added(self, info: DeviceInfo) -> None:
        self.own[info.id] = info
        self._up_device(info)

    def device_removed(self, device_id: str) -> None:
        info = self.own.pop(device_id, None)
        if info is not None and self.parent is not None:
            self.outbox.directory(PARENT).remove_device(info.address)

    def device_state(self, device_id: str, state: str) -> None:
        info = self.own.get(device_id)
        if info is not None and info.state != state:
            self.own[device_id] = info = replace(info, state=state)  # type: ignore[arg-type]
            self._up_device(info)

    def _up_device(self, info: DeviceInfo) -> None:
        if self.parent is not None:
            self.outbox.directory(PARENT).add_device(info)

    # ------------------------------------------------------------------ children (upper)

    def child_joined(self, entry: ServerEntry) -> None:
        """A child was welcomed: it learns the rest of the tree; the others learn of it."""
        self.below[entry.name] = entry
        self.via[entry.name] = entry.name
        self._back(entry.name)
        link = Link("child", entry.name)
        batch = self.outbox.directory(link)
        for known in [*self.above.values(), self.me, *(
                e for n, e in self.below.items() if self.via[n] != entry.name)]:
            batch.add_server(known)
        self._spread_server(entry, entry.name)

    def child_lost(self, child: str) -> list[str]:
        """A child's link closed: its subtree leaves the tree. Returns the servers that left."""
        gone = self.subtree_of(child)
        self.outbox.drop(Link("child", child))
        for name in gone:
            self._forget_server(name)
            self._spread_removal(name, child)
        return gone

    def child_update(self, child: str, update: Directory) -> list[Refused]:
        """Changes from a child to its own subtree. Each entry is checked on its own: one that
        the child may not make (a name taken elsewhere, a server or device outside its subtree)
        is refused and the others are applied. Returns the refusals."""
        refused: list[Refused] = []
        for i, name in enumerate(update.servers_removed):
            if self.via.get(name) != child or name == child:
                refused.append(Refused(Code.NOT_YOURS, f"{child} may not remove server {name!r}",
                                       f"servers_removed[{i}]"))
                continue
            for gone in self._descendants(name):
                self._forget_server(gone)
                self._spread_removal(gone, child)
        for i, entry in self._parents_first(update.servers):
            problem = self._check_server(child, entry)
            if problem is not None:
                refused.append(Refused(problem[0], problem[1], f"servers[{i}].name"))
                continue
            self.below[entry.name] = entry
            self.via[entry.name] = child
            self._back(entry.name)
            self._spread_server(entry, child)
        for i, info in enumerate(update.devices):
            server = self.below.get(info.server)
            if self.via.get(info.server) != child or server is None or server.role != "lower":
                refused.append(Refused(Code.NOT_YOURS, f"{child} may not announce devices of "
                                       f"{info.server!r}", f"devices[{i}].server"))
                continue
            if info.address not in self.devices and len(self.devices) >= self.max_devices:
                refused.append(Refused(Code.SERVER_FULL, f"{self.name} keeps at most "
                                       f"{self.max_devices} devices", f"devices[{i}]"))
                continue
            self._put_device(info)
        for i, address in enumerate(update.devices_removed):
            server, _ = split_address(address)
            if server is None or self.via.get(server) != child:
                refused.append(Refused(Code.NOT_YOURS, f"{child} may not remove device "
                                       f"{address!r}", f"devices_removed[{i}]"))
                continue
            self._drop_device(address)
        return refused

    @staticmethod
    def _parents_first(entries: list[ServerEntry]) -> Iterator[tuple[int, ServerEntry]]:
        """Entries in an order where a parent comes before its children (as far as the message
        itself can tell: entries whose parent is elsewhere keep their order)."""
        names = {e.name for e in entries}
        placed: set[str] = set()
        pending = list(enumerate(entries))
        while pending:
            ready = [(i, e) for i, e in pending if e.parent not in names - placed]
            if not ready:  # a cycle inside the message: let the checks refuse what is left
                ready = pending
            for i, e in ready:
                placed.add(e.name)
                yield i, e
            pending = [p for p in pending if p not in ready]

    def _check_server(self, child: str, entry: ServerEntry) -> tuple[Code, str] | None:
        if entry.name == self.me.name or entry.name in self.above or (
                entry.name in self.via and self.via[entry.name] != child) or entry.name == child:
            return Code.DUPLICATE_SERVER, f"a server named {entry.name!r} is already in the tree"
        if entry.parent is None or self.via.get(entry.parent) != child or \
                self.below[entry.parent].role != "upper":
            return Code.NOT_YOURS, f"{child} may not add {entry.name!r} under " \
                f"{entry.parent!r}: not an upper server of its subtree"
        return None

    def _put_device(self, info: DeviceInfo) -> None:
        self.devices[info.address] = info
        self.by_id.setdefault(info.id, set()).add(info.address)
        self.by_server.setdefault(info.server, set()).add(info.address)
        if self.parent is not None:
            self.outbox.directory(PARENT).add_device(info)

    def _drop_device(self, address: str) -> None:
        if self._unindex(address) and self.parent is not None:
            self.outbox.directory(PARENT).remove_device(address)

    def _unindex(self, address: str) -> bool:
        info = self.devices.pop(address, None)
        if info is None:
            return False
        for index, key in ((self.by_id, info.id), (self.by_server, info.server)):
            addresses = index.get(key)
            if addresses is not None:
                addresses.discard(address)
                if not addresses:
                    del index[key]
        return True

    def _forget_server(self, name: str) -> None:
        """Drop a server of the subtree and its devices (the parent is told by the caller: a
        removed server takes its devices with it)."""
        if self.below.pop(name, None) is not None:
            self._gone(name)
        self.via.pop(name, None)
        for address in list(self.by_server.get(name, ())):
            self._unindex(address)

    def _spread_server(self, entry: ServerEntry, source: str) -> None:
        """A server joined (or changed) below, through child ``source``: tell the parent and
        every other child."""
        if self.parent is not None:
            self.outbox.directory(PARENT).add_server(entry)
        for child in self.children():
            if child != source:
                self.outbox.directory(Link("child", child)).add_server(entry)

    def _spread_removal(self, name: str, source: str) -> None:
        if self.parent is not None:
            self.outbox.directory(PARENT).remove_server(name)
        for child in self.children():
            if child != source:
                self.outbox.directory(Link("child", child)).remove_server(name)

    # ------------------------------------------------------------------ the parent

    def parent_welcomed(self, parent: str) -> None:
        """The parent accepted us: it learns our whole subtree, parents first."""
        self.parent = parent
        self.me = replace(self.me, parent=parent)
        batch = self.outbox.directory(PARENT)
        for entry in self.below.values():
            batch.add_server(entry)
        for info in (self.own if self.role == "lower" else self.devices).values():
            batch.add_device(info)
        for batch in self._child_batches():
            batch.add_server(self.me)

    def parent_lost(self) -> None:
        """The parent's link closed: the rest of the tree is unknown until it is back."""
        self.parent = None
        self.me = replace(self.me, parent=None)
        self.outbox.drop(PARENT)
        gone = list(self.above)
        self.above.clear()
        for name in gone:
            self._gone(name)
        for batch in self._child_batches():
            for name in gone:
                batch.remove_server(name)
            batch.add_server(self.me)

    def parent_update(self, update: Directory) -> list[Refused]:
        """Changes to the rest of the tree, from the parent; passed on to every child."""
        refused: list[Refused] = []
        if update.devices or update.devices_removed:
            refused.append(Refused(Code.NOT_YOURS, "devices do not travel down the tree",
                                   "devices"))
        for i, name in enumerate(update.servers_removed):
            if self.above.pop(name, None) is not None:
                self._gone(name)
                for batch in self._child_batches():
                    batch.remove_server(name)
            elif name == self.me.name or name in self.below:
                refused.append(Refused(Code.NOT_YOURS, f"the parent may not remove {name!r}: "
                                       "it is in this server's subtree",
                                       f"servers_removed[{i}]"))
        for i, entry in enumerate(update.servers):
            if entry.name == self.me.name or entry.name in self.below:
                refused.append(Refused(Code.DUPLICATE_SERVER, f"{entry.name!r} is in this "
                                       "server's subtree", f"servers[{i}].name"))
                continue
            self.above[entry.name] = entry
            self._back(entry.name)
            for batch in self._child_batches():
                batch.add_server(entry)
        return refused

    def _child_batches(self) -> list[DirectoryBatch]:
        return [self.outbox.directory(Link("child", c)) for c in self.children()]
