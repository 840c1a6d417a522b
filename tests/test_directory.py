"""The directory (relay/directory.py): what a change costs, bounded increments, and entries a child
may not make. No socket: cores wired back to back (tests/fake_tree.py)."""

from __future__ import annotations

import pytest

from relay.admission import Limits
from relay.directory import TreeDirectory
from relay.effects import PARENT, Link, Outbox, Send
from relay.switch import Switch
from wire.messages import (
    MAX_DIRECTORY_ENTRIES,
    MAX_MESSAGE_BYTES,
    DeviceInfo,
    Directory,
    Error,
    MessageError,
    ServerEntry,
    decode,
)
from wire.reasons import Code

from .fake_tree import FakeTree
from .test_switch import TREES


def directory_sends(tree: FakeTree, since: int) -> list[tuple[str, Link, Directory]]:
    return [(s, link, m) for s, link, m in tree.sent[since:] if isinstance(m, Directory)]


def test_a_device_change_costs_one_small_message_per_ancestor_and_none_below() -> None:
    tree = FakeTree(TREES[4])
    for step in ("register", "busy", "gone"):
        mark = len(tree.sent)
        if step == "register":
            tree.register("deep1", "cam-1")
        elif step == "busy":
            tree.register("shallow", "cam-2")
            mark = len(tree.sent)
            tree.call("deep1", "deep1/cam-1", "shallow/cam-2", media="none")
        else:
            tree.servers["deep1"].link_lost(Link("device", "cam-1"), tree.now)
            tree._drain("deep1")
            tree.pump()
        sent = directory_sends(tree, mark)
        senders = [s for s, link, _ in sent if link == PARENT]
        # deep1 -> m3 -> m2 -> m1 -> root (and shallow -> n1 -> root when its device goes busy)
        assert sorted(s for s in senders if s in ("deep1", "m3", "m2", "m1")) == sorted(
            ["deep1", "m3", "m2", "m1"]), (step, sent)
        assert all(link == PARENT for _, link, _ in sent), (step, "nothing goes down")
        assert all(m.size == 1 for _, _, m in sent), (step, sent)


def test_a_server_joining_costs_one_entry_at_every_other_server() -> None:
    tree = FakeTree(TREES[3])
    mark = len(tree.sent)
    tree.add_server("late", "lower", "m11")
    tree.pump()
    told: dict[str, int] = {}
    for sender, link, message in directory_sends(tree, mark):
        receiver = tree.parent_of[sender] if link == PARENT else link.name
        if any(e.name == "late" for e in message.servers):
            told[receiver] = told.get(receiver, 0) + 1  # type: ignore[index]
    others = set(tree.servers) - {"late"}
    # its parent took its announce; every other server heard of it exactly once
    assert set(told) == others - {"m11"} and set(told.values()) == {1}
    # and "late" learned the whole rest of the tree from its parent, in one message
    to_late = [m for s, link, m in directory_sends(tree, mark) if link == Link("child", "late")]
    assert len(to_late) == 1 and {e.name for e in to_late[0].servers} == others
    assert all(s.directory.server("late") is not None for s in tree.servers.values())


def test_a_big_subtree_arrives_in_bounded_messages() -> None:
    me = ServerEntry(name="lower-big", role="lower", url="http://lower-big:80")
    switch = Switch(TreeDirectory(me, Outbox()))
    for i in range(1_234):
        switch.directory.device_added(DeviceInfo(id=f"cam-{i:04d}-" + "x" * 50,
                                                 server="lower-big"))
    assert not switch.outbox.take()  # no parent yet: nothing to tell
    switch.directory.parent_welcomed("root")
    sent = switch.outbox.take()
    assert len(sent) == 3
    root = TreeDirectory(ServerEntry(name="root", role="upper", url="http://root:80"),
                         Outbox())
    root.child_joined(ServerEntry(name="lower-big", role="lower", url=me.url, parent="root"))
    for effect in sent:
        assert isinstance(effect, Send) and effect.link == PARENT
        raw = effect.message.to_json()
        assert len(raw) < MAX_MESSAGE_BYTES // 2
        message = decode(raw)
        assert isinstance(message, Directory) and message.size <= MAX_DIRECTORY_ENTRIES
        assert root.child_update("lower-big", message) == []
    assert len(root.devices) == 1_234


def test_a_tree_of_100_lower_servers_with_100_devices_each() -> None:
    topology = {"name": "root", "children": [
        {"name": f"mid-{m}", "children": [{"name": f"lower-{m}-{n}"} for n in range(10)]}
        for m in range(10)]}
    tree = FakeTree(topology)
    lowers = [n for n, s in tree.servers.items() if s.directory.role == "lower"]
    for name in lowers:
        for i in range(100):
            tree.register(name, f"cam-{i}")
    root = tree.servers["root"].directory
    assert len(root.devices) == 10_000
    assert len(tree.servers["mid-3"].directory.devices) == 1_000
    for name in ("lower-0-0", "lower-9-9", "mid-5"):
        assert len(tree.servers[name].directory.servers()) == 111
        assert not tree.servers[name].directory.devices or name.startswith("mid")
    biggest = max(len(m.to_json()) for _, _, m in tree.directory_messages())
    assert biggest < 64 * 1024, biggest
    # a call across the tree, between two devices with the same id
    call = tree.call("lower-0-0", "lower-0-0/cam-7", "lower-9-9/cam-7", media="none")
    assert tree.servers["lower-0-0"].find_call(call).path == [
        "lower-0-0", "mid-0", "root", "mid-9", "lower-9-9"]


def test_entries_a_child_may_not_make_are_refused_one_by_one() -> None:
    tree = FakeTree(TREES[2])
    tree.register("a1", "cam-1")
    mid1 = tree.servers["mid-1"]
    url = "http://x:80"
    update = Directory(
        servers=[ServerEntry(name="b1", role="lower", url=url, parent="a1"),  # taken
                 ServerEntry(name="new", role="lower", url=url, parent="root"),  # not below
                 ServerEntry(name="sub", role="lower", url=url, parent="a1")],  # a1 is lower
        servers_removed=["a2"],
        devices=[DeviceInfo(id="cam-9", server="a2"),  # a2's, not a1's
                 DeviceInfo(id="cam-8", server="a1")],  # fine
        devices_removed=["b2/cam-b2"])
    mid1.receive(Link("child", "a1"), update, tree.now)
    effects = mid1.outbox.take()
    errors = [e.message for e in effects if isinstance(e, Send) and isinstance(e.message, Error)]
    assert len(errors) == 1  # one answer for the message, naming the first problem
    assert errors[0].code == Code.NOT_YOURS and "6 of 7 entries refused" in errors[0].message
    directory = mid1.directory
    assert set(directory.below) == {"a1", "a2"}
    assert set(directory.devices) == {"a1/cam-1", "a1/cam-8"}
    assert mid1.counters.refusals == {"not_yours": 1}


def test_devices_never_travel_down_and_a_parent_may_not_speak_for_the_subtree() -> None:
    tree = FakeTree(TREES[2])
    a1 = tree.servers["a1"]
    update = Directory(devices=[DeviceInfo(id="x", server="b1")], servers_removed=["a1"],
                       servers=[ServerEntry(name="a1", role="lower", url="http://evil:80")])
    a1.receive(PARENT, update, tree.now)
    assert a1.directory.server("a1").url == "http://a1:80"
    errors = [e.message for e in a1.outbox.take() if isinstance(e.message, Error)]  # type: ignore[union-attr]
    assert len(errors) == 1 and "3 of 3" in errors[0].message


def test_an_upper_server_keeps_at_most_its_limit_of_devices() -> None:
    tree = FakeTree(TREES[1], limits=Limits(max_directory_devices=3))
    tree.servers["upper"].directory.max_devices = 3
    for i in range(5):
        tree.register("lower-a", f"cam-{i}")
    assert len(tree.servers["upper"].directory.devices) == 3
    assert tree.servers["upper"].counters.refusals == {"server_full": 2}


@pytest.mark.parametrize("field", ["servers", "servers_removed", "devices", "devices_removed"])
def test_a_directory_message_over_the_entry_limit_is_refused_whole(field: str) -> None:
    item = {"servers": {"name": "s", "role": "lower", "url": "http://s:1"},
            "servers_removed": "s", "devices": {"id": "d", "server": "s"},
            "devices_removed": "s/d"}[field]
    import json
    raw = json.dumps({"type": "directory", field: [item] * (MAX_DIRECTORY_ENTRIES + 1)})
    with pytest.raises(MessageError) as caught:
        decode(raw)
    assert caught.value.field == field and str(MAX_DIRECTORY_ENTRIES) in caught.value.message
