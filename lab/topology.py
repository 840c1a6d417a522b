"""The shape of a tree, as ``python -m relay stack --topology FILE`` and the probe's ``--local``
take it::

    {"name": "root", "children": [
        {"name": "mid-1", "children": [{"name": "lower-a1", "devices": 2}, {"name": "lower-a2"}]},
        {"name": "mid-2", "children": [...]}]}

A node with children is an upper server, a leaf a lower server; ``devices`` (leaves only)
defaults to ``--devices``. Pure: JSON in, a checked tree out, every error naming where it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wire.messages import MessageError, check_name

MAX_DEVICES_PER_SERVER = 500
MAX_SERVERS = 200  #: on one machine; a bigger tree is a deployment, not a local stack


class TopologyError(ValueError):
    """The topology is wrong; the message says where."""


@dataclass(frozen=True)
class TreeNode:
    name: str
    children: tuple[TreeNode, ...] = ()
    devices: int | None = None  #: leaves: devices under it (None: the stack's default)

    @property
    def role(self) -> str:
        return "upper" if self.children else "lower"

    def walk(self, parent: str | None = None, depth: int = 0
             ) -> Iterator[tuple[TreeNode, str | None, int]]:
        """Every node with its parent's name and depth, parents before their children."""
        level: list[tuple[TreeNode, str | None]] = [(self, parent)]
        while level:
            for node, above in level:
                yield node, above, depth
            level = [(child, node.name) for node, _ in level for child in node.children]
            depth += 1

    def leaves(self) -> list[TreeNode]:
        return [n for n, _, _ in self.walk() if not n.children]


DEFAULT = TreeNode("upper", (TreeNode("lower-a"), TreeNode("lower-b")))


def parse(data: Any, where: str = "topology") -> TreeNode:
    root = _node(data, where)
    names = [n.name for n, _, _ in root.walk()]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise TopologyError(f"{where}: server name {name!r} is used twice")
        seen.add(name)
    if len(names) > MAX_SERVERS:
        raise TopologyError(f"{where}: {len(names)} servers; at most {MAX_SERVERS} on one "
                            "machine")
    if not root.children:
        raise TopologyError(f"{where}: the root {root.name!r} needs children (lower servers)")
    return root


def _node(data: Any, where: str) -> TreeNode:
    if not isinstance(data, dict):
        raise TopologyError(f"{where} must be an object with a name")
    unknown = set(data) - {"name", "children", "devices"}
    if unknown:
        raise TopologyError(f"{where}: unknown key {sorted(unknown)[0]!r} (name, children, "
                            "devices)")
    name = data.get("name")
    try:
        check_name(name, "name")
    except MessageError as exc:
        raise TopologyError(f"{where}.name: {exc.message}") from None
    children = data.get("children", [])
    if not isinstance(children, list):
        raise TopologyError(f"{where}.children must be a list")
    devices = data.get("devices")
    if devices is not None:
        if children:
            raise TopologyError(f"{where}: {name} has children, so it is an upper server: "
                                "devices go on leaves")
        if isinstance(devices, bool) or not isinstance(devices, int) or \
                not 0 <= devices <= MAX_DEVICES_PER_SERVER:
            raise TopologyError(f"{where}.devices must be an integer from 0 to "
                                f"{MAX_DEVICES_PER_SERVER}")
    return TreeNode(name, tuple(_node(c, f"{where}.children[{i}]")
                                for i, c in enumerate(children)), devices)


def load(path: Path) -> TreeNode:
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError(f"{path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise TopologyError(f"{path}: not JSON: {exc}") from None
    return parse(data, str(path))
