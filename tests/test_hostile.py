"""What one hostile peer may do to the tree, as a property of the signalling core: whatever
sequence of well-formed messages one lower server (or one device) sends, every other server's
directory and calls change only through the calls it may legitimately make: calls whose caller
is its own device. Runs on the in-memory tree (tests/fake_tree.py), every message through the
wire codec; hypothesis draws the sequences from the names and call ids the tree really has.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.call import CallState
from relay.effects import PARENT, Link
from wire.messages import (
    CHILD_TO_PARENT,
    DEVICE_TO_SERVER,
    Answer,
    CallAccept,
    CallSetup,
    CallUpdate,
    DeviceInfo,
    Directory,
    Error,
    FirstFrame,
    Hangup,
    Heartbeat,
    MediaStats,
    Message,
    Offer,
    Register,
    ServerEntry,
    Stats,
    Woken,
    decode,
)
from wire.reasons import Code

from .fake_tree import SDP, FakeTree

TOPOLOGY = {"name": "root", "children": [
    {"name": "mid-1", "children": [{"name": "a1"}, {"name": "a2"}]},
    {"name": "mid-2", "children": [{"name": "evil"}, {"name": "b2"}]}]}
SERVERS = ["root", "mid-1", "mid-2", "a1", "a2", "evil", "b2", "fresh", "new-1"]
DEVICES = ["cam-1", "cam-2", "ghost"]


def tree_with_calls() -> tuple[FakeTree, list[str]]:
    """The tree, two devices on each lower server, and two real calls up: one under mid-1 only,
    one across the root."""
    tree = FakeTree(TOPOLOGY)
    for server in ("a1", "a2", "evil", "b2"):
        for device in ("cam-1", "cam-2"):
            tree.register(server, device)
    calls = [tree.call("a1", "a1/cam-1", "a2/cam-1"), tree.call("a1", "a1/cam-2", "b2/cam-2")]
    return tree, calls


names = st.sampled_from(SERVERS)
addresses = st.builds(lambda s, d: f"{s}/{d}", names, st.sampled_from(DEVICES))
paths = st.lists(names, min_size=1, max_size=4)


def messages(call_ids: list[str]) -> st.SearchStrategy[Message]:
    """Well-formed messages a child's trunk accepts, naming what the tree really holds."""
    calls = st.sampled_from([*call_ids, "call-999", "forged"])
    entry = st.builds(lambda n, r, p: ServerEntry(name=n, role=r, url=f"http://{n}:80",
                                                  parent=p),
                      names, st.sampled_from(["lower", "upper"]), st.none() | names)
    device = st.builds(lambda s, d, b: DeviceInfo(id=d, server=s, state=b), names,
                       st.sampled_from(DEVICES), st.sampled_from(["idle", "busy"]))
    reasons = st.sampled_from([Code.HANGUP, Code.CALLEE_BUSY, Code.SERVER_GONE])
    return st.one_of(
        st.builds(Directory, servers=st.lists(entry, max_size=3),
                  servers_removed=st.lists(names, max_size=3),
                  devices=st.lists(device, max_size=3),
                  devices_removed=st.lists(addresses, max_size=3)),
        st.builds(CallSetup, call=calls, caller=addresses, callee=addresses, path=paths),
        # shaped as an honest setup from the hostile server would be, for any caller
        st.builds(lambda call, caller, callee, mid: CallSetup(
            call=call, caller=caller, callee=callee,
            path=[caller.split("/")[0], *mid, "evil"]),
            calls | st.just("new-call"), addresses, addresses, st.lists(names, max_size=1)),
        st.builds(CallAccept, call=calls, callee=addresses,
                  codec=st.sampled_from(["video/VP8", "video/H264"]), path=paths),
        st.builds(CallUpdate, call=calls, events=st.fixed_dictionaries(
            {}, optional={"t_routed": st.floats(0, 2000), "t_callee_woken": st.floats(0, 2000)})),
        st.builds(Hangup, call=calls, reason=reasons, path=st.none() | paths),
        st.builds(Offer, call=calls, leg=calls, sdp=st.just(SDP)),
        st.builds(Answer, call=calls, leg=calls, sdp=st.just(SDP)),
        st.builds(Heartbeat, seq=st.integers(0, 10)),
        st.builds(Error, code=st.sampled_from([Code.BAD_MESSAGE, Code.HANGUP]),
                  message=st.just("x"), call=st.none() | calls),
    )


def snapshot(tree: FakeTree, hostile: str) -> dict[str, Any]:
    """What the others hold that the hostile server must not be able to change: every server's
    view of the servers and devices outside the hostile server's own subtree."""
    view: dict[str, Any] = {}
    for name, switch in tree.servers.items():
        if name == hostile:
            continue
        d = switch.directory
        view[name] = {
            "own": sorted((i.id, i.state) for i in d.own.values()) if d.role == "lower" else [],
            "below": sorted((n, e.url) for n, e in d.below.items() if n != hostile),
            "above": sorted((n, e.url) for n, e in d.above.items() if n != hostile),
            "devices": sorted((a, i.state) for a, i in d.devices.items()
                              if i.server != hostile),
        }
    return view


def feed(tree: FakeTree, server: str, link: Link, sequence: list[Message],
         allowed: tuple[type[Message], ...]) -> None:
    """Hand ``sequence`` to ``server`` over ``link``, each message through the wire codec as
    that link would take it, and let the tree settle after each."""
    for message in sequence:
        tree.servers[server].receive(link, decode(message.to_json(), allowed), tree.now)
        tree._drain(server)
        tree.pump()


def still_up(tree: FakeTree, carrying: dict[str, set[str]]) -> None:
    """Every call is still active at every server that carried it."""
    for call, servers in carrying.items():
        for name in servers:
            assert tree.servers[name].sessions[call].call.state is CallState.ACTIVE, \
                (call, name)


def callees_of(tree: FakeTree, hostile: str) -> set[str]:
    """The devices called by calls whose caller is the hostile server's own."""
    return {session.call.callee for switch in tree.servers.values()
            for session in switch.sessions.values()
            if session.call.caller.startswith(f"{hostile}/")}


def legitimate(tree: FakeTree, call: str, hostile: str) -> bool:
    found = next((s.find_call(call) for s in tree.servers.values() if s.find_call(call)), None)
    return found is not None and found.caller.startswith(f"{hostile}/")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_no_sequence_from_one_lower_server_touches_what_is_not_its_own(data: st.DataObject
                                                                       ) -> None:
    tree, calls = tree_with_calls()
    before = snapshot(tree, "evil")
    carrying = {call: tree.carrying(call) for call in calls}
    wakes_before = {k: len(d.received) for k, d in tree.devices.items()}
    sequence = data.draw(st.lists(messages(calls), min_size=1, max_size=12))
    feed(tree, "mid-2", Link("child", "evil"), sequence, CHILD_TO_PARENT)
    still_up(tree, carrying)  # the real calls, at every server of their paths
    # nobody else's directory moved: devices the same and in the same state, servers the same
    after = snapshot(tree, "evil")
    called = callees_of(tree, "evil")
    for name in before:
        for key in ("below", "above"):
            assert after[name][key] == before[name][key], (name, key)
        # a server's own devices: unchanged but for those the hostile server may call
        moved = {d for d, _ in set(after[name]["own"]) ^ set(before[name]["own"])}
        assert {f"{name}/{d}" for d in moved} <= called, (name, moved)
        # a device's state may change only by a call the hostile server may make
        changed = set(after[name]["devices"]) ^ set(before[name]["devices"])
        assert {a for a, _ in changed} <= called, (name, changed)
    # a device elsewhere was woken only by a call whose caller is the hostile server's own
    for key, device in tree.devices.items():
        if key[0] == "evil":
            continue
        for message in device.received[wakes_before[key]:]:
            call = getattr(message, "call", None)
            if call is not None and call not in calls:
                assert legitimate(tree, call, "evil"), (key, message)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_no_sequence_from_one_device_touches_another_device_s_calls(data: st.DataObject
                                                                    ) -> None:
    tree, calls = tree_with_calls()
    before = snapshot(tree, "nobody")
    carrying = {call: tree.carrying(call) for call in calls}
    calls_st = st.sampled_from([*calls, "forged"])
    device_messages = st.one_of(
        st.builds(Register, device=st.sampled_from(DEVICES)),
        st.builds(Woken, call=calls_st, at=st.floats(0, 2000)),
        st.builds(FirstFrame, call=calls_st, at=st.floats(0, 2000)),
        st.builds(Answer, call=calls_st, leg=calls_st, sdp=st.just(SDP)),
        st.builds(Stats, call=calls_st, media=st.builds(MediaStats, frames=st.integers(0, 99))),
        st.builds(Hangup, call=calls_st, reason=st.just(Code.HANGUP)),
        st.builds(Heartbeat, seq=st.integers(0, 5)))
    sequence = data.draw(st.lists(device_messages, min_size=1, max_size=12))
    feed(tree, "a2", Link("device", "cam-2"), sequence, DEVICE_TO_SERVER)  # in no call
    still_up(tree, carrying)
    assert snapshot(tree, "nobody") == before


def test_a_hostile_parent_cannot_take_a_subtree_s_own_entries() -> None:
    """Down the tree, too: what a parent says of servers and devices of the child's own subtree
    is refused, and changes nothing."""
    tree, calls = tree_with_calls()
    mid1 = tree.servers["mid-1"]
    before = snapshot(tree, "nobody")
    for message in (Directory(servers_removed=["a1"]),
                    Directory(servers=[ServerEntry(name="a1", role="lower", url="http://x:1",
                                                   parent="root")]),
                    Directory(devices=[DeviceInfo(id="cam-9", server="a1")]),
                    CallSetup(call="forged", caller="a1/cam-1", callee="a2/cam-2",
                              path=["a1", "root"])):
        mid1.receive(PARENT, message, tree.now)
        tree._drain("mid-1")
        tree.pump()
    assert snapshot(tree, "nobody") == before
    assert all(tree.servers["a1"].find_call(c).state is CallState.ACTIVE for c in calls)
    assert tree.servers["a2"].directory.own["cam-2"].state == "idle"
