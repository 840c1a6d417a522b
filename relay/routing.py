"""Routing: where a call goes next from this server. Pure: the directory and an address in, a route
out (or a refusal).

A call climbs from the caller's lower server toward the root until it reaches the lowest common
ancestor of the caller's and the callee's servers, then goes down to the callee's: every server
knows which child leads to each server of its subtree, and that every other server is up. A bare
device id is found at the nearest server that knows it: the caller's own server, then each
ancestor's subtree in turn; two devices of that id at the same distance are ambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.directory import TreeDirectory
from relay.effects import PARENT, Link
from wire.messages import split_address
from wire.reasons import Code, Refused


@dataclass(frozen=True)
class Local:
    """The callee is a device of this server."""

    device: str


@dataclass(frozen=True)
class Onward:
    """Send the call on over ``link``, to ``callee`` (resolved to SERVER/DEVICE when known)."""

    link: Link
    callee: str


Route = Local | Onward


def route(directory: TreeDirectory, callee: str, field: str = "callee") -> Route:
    """Where a call to ``callee`` goes from here. Raises Refused when it can go nowhere."""
    server, device = split_address(callee)
    here = directory.name
    if server is None:
        return _bare(directory, device, field)
    if server == here:
        if directory.role == "lower" and device in directory.own:
            return Local(device)
        raise Refused(Code.UNKNOWN_DEVICE, f"no device {device!r} on {here}", field)
    entry = directory.server(server)
    if entry is None and directory.cut_off:
        raise Refused(Code.SERVER_UNREACHABLE, f"{server} cannot be reached: {here} has lost "
                                               "its link to its parent", field)
    if entry is None and directory.has_left(server):
        raise Refused(Code.SERVER_UNREACHABLE, f"{server} cannot be reached: it has left the "
                                               "tree (a link on the way to it went down)", field)
    if entry is None:
        raise Refused(Code.UNKNOWN_SERVER, f"no server {server!r} in the tree", field)
    if entry.role != "lower":
        raise Refused(Code.UNKNOWN_DEVICE, f"{server} is an upper server: devices are on lower "
                                           "servers", field)
    hop = directory.next_hop(server)
    if hop is None:
        raise Refused(Code.SERVER_UNREACHABLE, f"{server} cannot be reached: {here} has no "
                                               "link to its parent", field)
    return Onward(hop, callee)


def _bare(directory: TreeDirectory, device: str, field: str) -> Route:
    if directory.role == "lower":
        if device in directory.own:
            return Local(device)
    else:
        found = directory.find(device)
        if len(found) > 1:
            raise Refused(Code.AMBIGUOUS_DEVICE, f"{device!r} names {len(found)} devices "
                          f"({', '.join(found)}): use SERVER/DEVICE", field)
        if found:
            server, _ = split_address(found[0])
            hop = directory.next_hop(server or "")
            if hop is not None:
                return Onward(hop, found[0])
    if directory.cut_off:
        raise Refused(Code.SERVER_UNREACHABLE, f"{device!r} is not here, and {directory.name} "
                                               "has lost its link to its parent", field)
    if directory.parent is None:
        raise Refused(Code.UNKNOWN_DEVICE, f"no device {device!r} in the tree", field)
    return Onward(PARENT, device)
