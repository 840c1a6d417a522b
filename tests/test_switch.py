"""The signalling core with no socket: trees of depth 1-4 wired back to back (tests/fake_tree.py),
calls routed along exactly the tree path, refusals by reason, a server lost mid-call, and the same
device id under two servers."""

from __future__ import annotations

from typing import Any

import pytest

from relay.admission import Limits
from relay.call import CallState, Timeouts
from relay.effects import DIRECTORY_FLUSH_S, Link, StartMedia, StopMedia
from relay.switch import Placing, carried
from wire.messages import (
    CallSetup,
    CallUpdate,
    CreateCall,
    DeviceInfo,
    Dial,
    Error,
    Hangup,
    PlaceCall,
    Register,
    Wake,
    Woken,
)
from wire.reasons import Code, Refused

from .fake_tree import FakeTree


def lower(name: str) -> dict[str, Any]:
    return {"name": name}


def upper(name: str, *children: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "children": list(children)}


#: depth 1: one upper, two lowers (today's stack); 2: a root over two mid servers; 3 and 4:
#: lopsided trees, where some lower servers sit deeper than others.
TREES = {
    1: upper("upper", lower("lower-a"), lower("lower-b")),
    2: upper("root", upper("mid-1", lower("a1"), lower("a2")),
             upper("mid-2", lower("b1"), lower("b2"))),
    3: upper("root", upper("m1", upper("m11", lower("x1"), lower("x2")), lower("x3")),
             lower("y1")),
    4: upper("root", upper("m1", upper("m2", upper("m3", lower("deep1"), lower("deep2")))),
             upper("n1", lower("shallow"))),
}


def lowers(tree: FakeTree) -> list[str]:
    return [n for n, s in tree.servers.items() if s.directory.role == "lower"]


def populated(depth: int) -> FakeTree:
    tree = FakeTree(TREES[depth])
    for name in lowers(tree):
        tree.register(name, f"cam-{name}")
    return tree


@pytest.mark.parametrize("depth", sorted(TREES))
def test_every_pair_crosses_exactly_the_tree_path(depth: int) -> None:
    tree = populated(depth)
    names = lowers(tree)
    for a in names:
        for b in names:
            if a == b:
                continue
            call = tree.call(a, f"{a}/cam-{a}", f"{b}/cam-{b}")
            expected = tree.path_between(a, b)
            assert tree.carrying(call) == set(expected), (a, b)
            for name in expected:
                found = tree.servers[name].find_call(call)
                assert found is not None and found.state is CallState.ACTIVE, (name, found)
                assert found.path == expected, (name, found.path)
                # every server on the path made its two legs (and nobody else did)
                assert any(isinstance(e, StartMedia) and e.call == call
                           for e in tree.media[name])
            tree.hangup(a, call)
            assert not tree.carrying(call)
            for name in expected:
                assert tree.servers[name].find_call(call).reason == "hangup"
            assert all(d.state == "idle" for s in tree.servers.values()
                       for d in s.directory.subtree_devices())


@pytest.mark.parametrize("depth, a, b, root_untouched", [
    (2, "a1", "a2", True), (2, "a1", "b1", False), (3, "x1", "x2", True), (3, "x1", "x3", True),
    (3, "x1", "y1", False), (4, "deep1", "deep2", True), (4, "deep1", "shallow", False)])
def test_calls_under_one_mid_server_never_touch_the_root(depth: int, a: str, b: str,
                                                         root_untouched: bool) -> None:
    tree = populated(depth)
    root = next(iter(tree.servers))
    call = tree.call(a, f"{a}/cam-{a}", f"{b}/cam-{b}")
    assert (root not in tree.seen(call)) == root_untouched
    setups = [s for s in tree.messages_on(CallSetup) if s[2].call == call]
    assert len(setups) == len(tree.path_between(a, b)) - 1  # one per trunk hop, no more


def test_t_routed_is_stamped_by_the_server_that_hands_the_call_to_the_callee_s() -> None:
    tree = populated(2)
    call = tree.call("a1", "a1/cam-a1", "b2/cam-b2")
    for name in tree.path_between("a1", "b2"):  # known at every server of the path
        assert "t_routed" in tree.servers[name].find_call(call).timeline, name
    routed = [m for _, _, m in tree.messages_on(CallUpdate)
              if m.call == call and "t_routed" in m.events]
    assert routed and {m.events["t_routed"] for m in routed} == {tree.now}
    tree.hangup("a1", call)
    same = tree.call("a2", "a2/cam-a2", "a1/cam-a1")
    assert "t_routed" in tree.servers["a2"].find_call(same).timeline  # through mid-1
    assert tree.seen(same) == {"a2", "mid-1", "a1"}
    # nothing was refused on the way
    assert not tree.messages_on(Error)


def test_a_call_inside_one_lower_server_is_bridged_there_alone() -> None:
    tree = populated(1)
    tree.register("lower-a", "cam-2")
    call = tree.call("lower-a", "cam-lower-a", "lower-a/cam-2")
    assert tree.seen(call) == {"lower-a"}
    found = tree.servers["lower-a"].find_call(call)
    assert found.path == ["lower-a"] and found.state is CallState.ACTIVE
    assert "t_routed" not in found.timeline


@pytest.mark.parametrize("callee, code", [
    ("nobody/cam-1", Code.UNKNOWN_SERVER),
    ("a1/ghost", Code.UNKNOWN_DEVICE),  # its own server: known at once
    ("mid-2/cam-b1", Code.UNKNOWN_DEVICE),  # an upper server holds no devices
    ("a1/cam-a1", Code.SAME_DEVICE),
    ("bad", Code.SERVER_UNREACHABLE),  # a bare id, and no parent to ask: cut off
    ("b1/cam-b1", Code.SERVER_UNREACHABLE),  # known before; now cut off from the tree
])
def test_what_the_caller_s_server_can_know_is_refused_at_once(callee: str, code: Code) -> None:
    tree = populated(2)
    before = [m for m in tree.sent]
    if callee in ("bad", "b1/cam-b1"):
        tree.kill("mid-1")  # a1 now has no parent to ask
    with pytest.raises(Refused) as caught:
        tree.call("a1", "a1/cam-a1", callee)
    assert caught.value.code is code and caught.value.field == "callee"
    assert caught.value.message
    if callee not in ("bad", "b1/cam-b1"):
        assert tree.sent == before  # nothing was sent: nothing changed
    assert not tree.servers["a1"].sessions


@pytest.mark.parametrize("caller, code, status", [
    ("a2/cam-a2", Code.CALLER_NOT_HERE, 421),
    ("a1/ghost", Code.UNKNOWN_DEVICE, 404),
    ("zz/cam-1", Code.UNKNOWN_SERVER, 404),
])
def test_the_caller_must_be_the_server_s_own(caller: str, code: Code, status: int) -> None:
    tree = populated(2)
    with pytest.raises(Refused) as caught:
        tree.call("a1", caller, "b1/cam-b1")
    assert (caught.value.code, caught.value.status, caught.value.field) == (code, status,
                                                                          "caller")


def test_what_only_the_callee_s_server_knows_ends_the_call_with_its_reason() -> None:
    tree = populated(2)
    first = tree.call("b1", "b1/cam-b1", "b2/cam-b2")
    busy = tree.call("a1", "a1/cam-a1", "b2/cam-b2")
    unknown = tree.call("a2", "a2/cam-a2", "b2/nobody")
    for call, reason in ((busy, "callee_busy"), (unknown, "unknown_device")):
        for name in ("a1" if call == busy else "a2", "mid-1", "root", "mid-2"):
            found = tree.servers[name].find_call(call)
            assert found.state is CallState.ENDED and found.reason == reason, (name, found)
        # refused before a session was made, and kept to say why
        refused = tree.servers["b2"].find_call(call)
        assert refused.state is CallState.ENDED and refused.reason == reason
        path = ["a1" if call == busy else "a2", "mid-1", "root", "mid-2", "b2"]
        assert refused.path == path
        # the caller's server learns how far it got, and who turned it away
        assert tree.servers[path[0]].find_call(call).path == path
        assert not any(isinstance(e, StartMedia) and e.call == call
                       for effects in tree.media.values() for e in effects)
    assert tree.servers["b2"].find_call(first).state is CallState.ACTIVE  # untouched
    # the caller was woken, then told
    caller = tree.devices[("a1", "cam-a1")]
    assert [type(m).__name__ for m in caller.received if getattr(m, "call", None) == busy] == [
        "Wake", "Hangup"]


def test_a_busy_local_device_is_refused_at_once() -> None:
    tree = populated(1)
    tree.register("lower-a", "cam-2")
    tree.call("lower-a", "lower-a/cam-lower-a", "lower-b/cam-lower-b")
    for caller, callee, what in (("cam-2", "lower-a/cam-lower-a", "callee"),
                                 ("cam-lower-a", "lower-a/cam-2", "caller")):
        with pytest.raises(Refused) as caught:
            tree.call("lower-a", caller, callee)
        assert (caught.value.code, caught.value.status, caught.value.field) == (
            Code.BUSY_DEVICE, 409, what)


@pytest.mark.parametrize("draining", ["a1", "mid-1", "root", "mid-2", "b1"])
def test_a_draining_server_refuses_new_calls_wherever_it_is_on_the_path(draining: str) -> None:
    tree = populated(2)
    tree.servers[draining].draining = True
    if draining == "a1":
        with pytest.raises(Refused) as caught:
            tree.call("a1", "a1/cam-a1", "b1/cam-b1")
        assert (caught.value.code, caught.value.status) == (Code.SERVER_SHUTTING_DOWN, 503)
        assert caught.value.retry_after_s == 5
        return
    call = tree.call("a1", "a1/cam-a1", "b1/cam-b1")
    assert tree.servers["a1"].find_call(call).reason == "server_shutting_down"
    assert tree.servers[draining].counters.refusals == {"server_shutting_down": 1}


def test_max_calls_at_a_transit_server() -> None:
    tree = FakeTree(TREES[2], limits=Limits(max_calls=1))
    for name in ("a1", "a2", "b1", "b2"):
        tree.register(name, f"cam-{name}")
    first = tree.call("a1", "a1/cam-a1", "b1/cam-b1")
    second = tree.call("a2", "a2/cam-a2", "b2/cam-b2")  # mid-1 and root are full
    assert tree.servers["a1"].find_call(first).state is CallState.ACTIVE
    assert tree.servers["a2"].find_call(second).reason == "server_busy"
    assert tree.servers["mid-1"].counters.refusals == {"server_busy": 1}
    with pytest.raises(Refused) as caught:  # a1 itself is full now
        tree.call("a1", "a1/cam-a1", "a2/cam-a2")
    assert caught.value.code is Code.SERVER_BUSY and caught.value.retry_after_s == 1


@pytest.mark.parametrize("lost, reasons", [
    # a mid server killed: each neighbour ends with the reason its own link gives
    ("mid-1", {"a1": "trunk_lost", "root": "server_gone", "mid-2": "server_gone",
               "b1": "server_gone"}),
    ("root", {"a1": "trunk_lost", "mid-1": "trunk_lost", "mid-2": "trunk_lost",
              "b1": "trunk_lost"}),
    ("b1", {"a1": "server_gone", "mid-1": "server_gone", "root": "server_gone",
            "mid-2": "server_gone"}),
])
def test_a_server_lost_mid_call_ends_its_calls_everywhere_and_no_others(
        lost: str, reasons: dict[str, str]) -> None:
    tree = populated(2)
    tree.register("a2", "cam-2")
    through = tree.call("a1", "a1/cam-a1", "b1/cam-b1")
    elsewhere = tree.call("a2", "a2/cam-a2", "a2/cam-2")
    tree.kill(lost)
    for name, reason in reasons.items():
        if name in tree.servers:
            found = tree.servers[name].find_call(through)
            assert found.state is CallState.ENDED and found.reason in reason.split("|"), (
                name, found.reason)
            assert through not in tree.servers[name].sessions
    assert all(any(isinstance(e, StopMedia) and e.call == through for e in tree.media[n])
               for n in reasons if n in tree.servers)
    assert tree.servers["a2"].find_call(elsewhere).state is CallState.ACTIVE
    # the devices of the call are idle again where their server lives on
    assert tree.servers["a1"].directory.own["cam-a1"].state == "idle"


def test_a_lost_subtree_leaves_every_directory_and_comes_back() -> None:
    tree = populated(2)
    tree.kill("mid-1")
    for name, switch in tree.servers.items():
        if name in ("mid-2", "b1", "b2", "root"):
            assert switch.directory.server("a1") is None, name
            assert switch.directory.server("mid-1") is None, name
    assert not [a for a in tree.servers["root"].directory.devices if a.startswith("a")]
    # a server that left is unreachable (503), not unknown (404): it existed, and a link on
    # the way to it is down; at every server that heard it leave, the root included
    with pytest.raises(Refused) as caught:
        tree.call("b1", "b1/cam-b1", "a1/cam-a1")
    assert caught.value.code is Code.SERVER_UNREACHABLE and caught.value.status == 503
    assert "left the tree" in caught.value.message
    assert all(tree.servers[n].directory.has_left("a1") for n in ("b1", "mid-2", "root"))
    # one that never was is still unknown
    with pytest.raises(Refused) as caught:
        tree.call("b1", "b1/cam-b1", "zz/cam-1")
    assert caught.value.code is Code.UNKNOWN_SERVER
    # mid-1 restarts empty; its lower servers announce again
    tree.add_server("mid-1", "upper", "root")
    tree.pump()
    for name in ("a1", "a2"):
        tree.add_server(name, "lower", "mid-1")
        tree.pump()
        tree.register(name, f"cam-{name}")
    call = tree.call("b1", "b1/cam-b1", "a1/cam-a1")
    assert tree.servers["b1"].find_call(call).path == ["b1", "mid-2", "root", "mid-1", "a1"]
    assert not any(s.directory.has_left("a1") for s in tree.servers.values())  # back


def test_the_same_device_id_under_two_servers() -> None:
    tree = FakeTree(TREES[2])
    for name in ("a1", "a2", "b1", "b2"):
        tree.register(name, "cam-1")
    # full addresses reach each one
    for target in ("a2", "b1", "b2"):
        call = tree.call("a1", "a1/cam-1", f"{target}/cam-1")
        assert tree.servers["a1"].find_call(call).callee == f"{target}/cam-1"
        tree.hangup("a1", call)
    # a bare id: the caller's own server first
    with pytest.raises(Refused) as caught:
        tree.call("a1", "cam-1", "cam-1")
    assert caught.value.code is Code.SAME_DEVICE
    # from a server without that id, the nearest: a2 and a1 are both under mid-1
    tree.register("b2", "cam-9")
    call = tree.call("b2", "cam-9", "cam-1")
    assert tree.servers["b2"].find_call(call).callee == "b2/cam-1"  # its own
    tree.hangup("b2", call)
    tree.add_server("c1", "lower", "root")
    tree.register("c1", "cam-9")
    call = tree.call("c1", "cam-9", "cam-1")  # four at the same distance
    assert tree.servers["c1"].find_call(call).reason == "ambiguous_device"
    # late reports go to the right call and device: two cam-1 in one call
    call = tree.call("a1", "a1/cam-1", "b1/cam-1")
    tree.hangup("b1", call)
    origin = tree.servers["a1"].find_call(call)
    assert set(origin.media) == {"caller_to_callee", "callee_to_caller"}


def test_wake_and_setup_timeouts_end_the_call_at_every_server() -> None:
    tree = FakeTree(TREES[2], timeouts=Timeouts(wake=1.0, setup=3.0))
    tree.register("a1", "cam-a1")
    tree.register("b1", "mute", answers_wake=False)
    call = tree.call("a1", "a1/cam-a1", "b1/mute")
    tree.tick(1.5)
    for name in tree.path_between("a1", "b1"):
        assert tree.servers[name].find_call(call).reason == "callee_wake_timeout", name


def test_media_none_calls_are_up_once_both_are_woken_and_make_no_legs() -> None:
    tree = populated(2)
    call = tree.call("a1", "a1/cam-a1", "b2/cam-b2", media="none")
    for name in tree.path_between("a1", "b2"):
        assert tree.servers[name].find_call(call).state is CallState.ACTIVE
    assert not any(isinstance(e, StartMedia) for effects in tree.media.values()
                   for e in effects)


def test_codec_is_the_caller_s_first_that_the_callee_takes() -> None:
    tree = FakeTree(TREES[2])
    tree.register("a1", "both", codecs=("video/VP8", "video/H264"))
    tree.register("b1", "h264", codecs=("video/H264",))
    tree.register("b2", "vp8", codecs=("video/VP8",))
    tree.register("a2", "h264", codecs=("video/H264",))
    common = tree.call("a1", "a1/both", "b1/h264")
    for name in tree.path_between("a1", "b1"):
        assert tree.servers[name].find_call(common).codec == "video/H264", name
    starts = {n: next(e for e in tree.media[n] if isinstance(e, StartMedia))
              for n in tree.path_between("a1", "b1")}
    assert {s.up.codec for s in starts.values()} == {"video/H264"}
    none_shared = tree.call("a2", "a2/h264", "b2/vp8")
    start_b2 = [e for e in tree.media["b2"] if isinstance(e, StartMedia)][-1]
    # the trunks carry the caller's codec; only b2's leg to its device differs (transcoded)
    assert start_b2.up.codec == "video/H264" and start_b2.down.codec == "video/VP8"
    assert tree.servers["a2"].find_call(none_shared).codec == "video/H264"


def test_a_server_may_not_start_calls_for_devices_outside_its_subtree() -> None:
    tree = populated(2)
    mid1 = tree.servers["mid-1"]
    forged = CallSetup(call="forged-1", caller="b1/cam-b1", callee="a2/cam-a2",
                       path=["b1", "a1"])
    mid1.receive(Link("child", "a1"), forged, tree.now)
    effects = mid1.outbox.take()
    assert [type(e.message) for e in effects] == [Hangup]  # type: ignore[union-attr]
    assert effects[0].message.reason == "not_yours"  # type: ignore[union-attr]
    assert "forged-1" not in mid1.sessions
    assert tree.servers["a2"].directory.own["cam-a2"].state == "idle"


def test_messages_out_of_turn_are_refused_and_change_nothing() -> None:
    tree = populated(2)
    call = tree.call("a1", "a1/cam-a1", "b1/cam-b1")
    a1 = tree.servers["a1"]
    from wire.messages import Offer, Register
    cases = [
        (Link("device", "cam-a1"), Register(device="cam-a1"), Code.ALREADY_REGISTERED),
        (Link("device", "cam-a1"), Offer(call=call, leg=call, sdp="v=0\r\n"),
         Code.UNEXPECTED_TYPE),  # devices answer, never offer
        (Link("device", "cam-a1"), Hangup(call="nosuch", reason="hangup"), Code.UNKNOWN_CALL),
        (Link("parent", "parent"), Offer(call=call, leg=call, sdp="v=0\r\n"),
         Code.PROTOCOL_ERROR),  # a1 offers on its downstream trunk
    ]
    for link, message, code in cases:
        a1.receive(link, message, tree.now)
        effects = a1.outbox.take()
        assert len(effects) == 1 and isinstance(effects[0].message, Error), effects  # type: ignore[union-attr]
        assert effects[0].message.code == code, (message, effects)  # type: ignore[union-attr]
    assert a1.find_call(call).state is CallState.ACTIVE


# ---------------------------------------------------------------------- dial, ring, answer


def test_a_dial_is_answered_with_dialed_ahead_of_the_wake_and_runs_as_any_call() -> None:
    from wire.messages import Dial, Dialed, Wake
    tree = populated(2)
    tree.devices[("a1", "cam-a1")].received.clear()
    tree.from_device("a1", "cam-a1", Dial(callee="b1/cam-b1", seq=7))
    received = tree.devices[("a1", "cam-a1")].received
    assert [type(m) for m in received[:2]] == [Dialed, Wake]
    dialed = received[0]
    assert dialed.seq == 7 and dialed.callee == "b1/cam-b1"
    call = dialed.call
    assert received[1].call == call and received[1].role == "caller"
    for name in tree.path_between("a1", "b1"):
        server = tree.servers[name]
        found = server.find_call(call)
        assert found is not None and found.state is CallState.ACTIVE, name
        assert server.call_info(found).started_by == "device", name
    assert tree.servers["a1"].counters.started_by == {"device": 1}
    # a probe's call is "api"
    other = tree.call("a2", "a2/cam-a2", "b2/cam-b2")
    assert tree.servers["a2"].call_info(tree.servers["a2"].find_call(other)).started_by == "api"


@pytest.mark.parametrize("callee, code", [("a1/cam-a1", Code.SAME_DEVICE),
                                          ("a1/nobody", Code.UNKNOWN_DEVICE)])
def test_a_refused_dial_is_an_error_with_the_refusal_s_code(callee: str, code: Code) -> None:
    from wire.messages import Dial
    tree = populated(2)
    dial = Dial(callee=callee)
    tree.devices[("a1", "cam-a1")].received.clear()
    tree.from_device("a1", "cam-a1", dial)
    received = tree.devices[("a1", "cam-a1")].received
    assert len(received) == 1 and isinstance(received[0], Error), received
    assert received[0].code == code and received[0].ref == "dial"
    assert not tree.servers["a1"].sessions


def test_a_ringing_callee_holds_the_call_and_the_ring_is_not_setup_time() -> None:
    tree = FakeTree(TREES[2], timeouts=Timeouts(setup=3.0, ring=10.0))
    tree.register("a1", "cam-a1")
    phone = tree.register("b1", "desk", rings=True)
    call = tree.call("a1", "a1/cam-a1", "b1/desk")
    a1 = tree.servers["a1"]
    assert a1.find_call(call).state is CallState.RINGING
    assert phone.held, "the offer waits for a person"
    tree.tick(5.0)  # longer than the setup timeout: ringing, it still stands
    for name in a1.find_call(call).path:  # every server of the path knows it rings
        assert tree.servers[name].find_call(call).state is CallState.RINGING, name
    assert "t_answered" not in a1.find_call(call).timeline
    tree.from_device("b1", "desk", *phone.pickup(call, tree.now))
    found = a1.find_call(call)
    assert found.state is CallState.ACTIVE
    assert found.timeline["t_answered"] - found.timeline["t_callee_woken"] == pytest.approx(5.0)


def test_an_unanswered_ring_ends_no_answer_and_a_decline_declined() -> None:
    tree = FakeTree(TREES[1], timeouts=Timeouts(setup=3.0, ring=4.0))
    tree.register("lower-a", "cam")
    tree.register("lower-b", "desk", rings=True)
    call = tree.call("lower-a", "lower-a/cam", "lower-b/desk")
    tree.tick(3.0)
    assert tree.servers["lower-a"].find_call(call).state is CallState.RINGING
    tree.tick(1.5)
    for name in ("lower-a", "upper", "lower-b"):
        assert tree.servers[name].find_call(call).reason == "no_answer", name
    second = tree.call("lower-a", "lower-a/cam", "lower-b/desk")
    tree.from_device("lower-b", "desk", Hangup(call=second, reason="declined"))
    for name in ("lower-a", "upper", "lower-b"):
        assert tree.servers[name].find_call(second).reason == "declined", name
    assert tree.devices[("lower-a", "cam")].received[-1].reason == "declined"


def test_a_pickup_of_a_call_that_does_not_ring_is_refused() -> None:
    from wire.messages import Pickup
    tree = populated(1)
    call = tree.call("lower-a", "lower-a/cam-lower-a", "lower-b/cam-lower-b")
    tree.from_device("lower-b", "cam-lower-b", Pickup(call=call, at=tree.now))
    error = tree.devices[("lower-b", "cam-lower-b")].received[-1]
    assert isinstance(error, Error) and error.code == Code.PROTOCOL_ERROR
    assert tree.servers["lower-b"].find_call(call).state is CallState.ACTIVE


def test_the_directions_a_call_carries_follow_what_each_party_can_do() -> None:
    def info(kind: str) -> DeviceInfo:
        return DeviceInfo(id="d", server="s", kind=kind)  # type: ignore[arg-type]

    both = ("caller_to_callee", "callee_to_caller")
    assert carried(info("device"), info("device")) == both
    assert carried(info("device"), info("whip")) == ("callee_to_caller",)
    assert carried(info("whep"), info("device")) == ("callee_to_caller",)
    assert carried(info("whep"), None) == ("callee_to_caller",)
    assert carried(info("whip"), info("whep")) == ("caller_to_callee",)
    assert carried(info("whip"), info("whip")) == ()
    assert carried(info("whep"), info("whep")) == ()


def test_a_one_way_call_is_active_on_its_one_direction_s_first_frame() -> None:
    tree = FakeTree(TREES[2])
    tree.register("a1", "viewer", kind="whep")
    tree.register("b1", "cam", first_frame=False)  # it receives nothing: decodes nothing
    call = tree.call("a1", "a1/viewer", "b1/cam")
    for name in tree.path_between("a1", "b1"):
        found = tree.servers[name].find_call(call)
        assert found.directions == ("callee_to_caller",), name
        assert found.state is CallState.ACTIVE, (name, found.timeline)
        assert "t_first_frame_callee" not in found.timeline
    starts = [e for e in tree.media["b1"] if isinstance(e, StartMedia)]
    assert starts[0].directions == ("callee_to_caller",)


def test_a_call_between_two_publishers_has_nothing_to_carry() -> None:
    tree = FakeTree(TREES[2])
    tree.register("a1", "pub-a", kind="whip")
    tree.register("b1", "pub-b", kind="whip")
    tree.register("a1", "pub-c", kind="whip")
    with pytest.raises(Refused) as refused:
        tree.call("a1", "a1/pub-a", "a1/pub-c")
    assert refused.value.code == Code.NO_MEDIA_PATH
    call = tree.call("a1", "a1/pub-a", "b1/pub-b")  # the callee's server finds it out
    assert tree.servers["a1"].find_call(call).reason == Code.NO_MEDIA_PATH


def test_a_viewer_of_a_device_in_a_call_taps_that_call_and_ends_with_it() -> None:
    tree = populated(2)
    tree.register("a2", "viewer", kind="whep")
    talk = tree.call("a1", "a1/cam-a1", "b1/cam-b1")
    cam = tree.devices[("b1", "cam-b1")]
    woken_before = sum(isinstance(m, Wake) for m in cam.received)
    watch = tree.call("a2", "a2/viewer", "b1/cam-b1")
    assert sum(isinstance(m, Wake) for m in cam.received) == woken_before  # not woken again
    start = next(e for e in tree.media["b1"] if isinstance(e, StartMedia) and e.call == watch)
    assert start.down.tap == talk and not start.down.offer
    assert start.directions == ("callee_to_caller",)
    assert tree.servers["a2"].find_call(watch).state is CallState.ACTIVE
    # a call both ways to a busy device is still refused
    with pytest.raises(Refused):
        tree.call("a1", "a1/cam-a1", "b1/cam-b1")
    tree.hangup("a1", talk)
    for name in tree.path_between("a2", "b1"):
        assert tree.servers[name].find_call(watch).reason == Code.SOURCE_ENDED, name
    assert not any(isinstance(m, Hangup) and m.call == watch for m in cam.received)
    assert tree.servers["b1"].directory.own["cam-b1"].state == "idle"


# ---------------------------------------------------------------------- the core owns time


def test_the_core_says_when_it_next_needs_waking_and_acts_exactly_then() -> None:
    tree = FakeTree(TREES[1], timeouts=Timeouts(wake=2.0, setup=10.0))
    tree.register("lower-a", "cam")
    tree.register("lower-b", "mute", answers_wake=False)
    start = tree.now
    call = tree.call("lower-a", "lower-a/cam", "lower-b/mute")
    a = tree.servers["lower-a"]
    assert a.timer(tree.now) == start + 2.0  # the wake-up deadline, nothing sooner
    a.handle_timer(start + 1.999)
    assert a.find_call(call).state is CallState.WAKING
    a.handle_timer(start + 2.0)
    found = a.find_call(call)
    assert found.over and found.reason == "callee_wake_timeout"
    assert found.timeline["t_end"] == start + 2.0


def test_directory_changes_wait_for_the_cores_flush_deadline() -> None:
    tree = FakeTree(TREES[1])
    a = tree.servers["lower-a"]
    assert a.timer(tree.now) is None  # nothing to wait for: no poll
    a.device_register(Register(device="cam", codecs=["video/VP8"]), tree.now)
    a.outbox.take(directory=False)  # the welcome goes now; the directory change waits
    assert a.outbox.directory_pending
    assert a.timer(tree.now) == pytest.approx(tree.now + DIRECTORY_FLUSH_S)
    a.handle_timer(tree.now + DIRECTORY_FLUSH_S / 2)
    assert a.outbox.directory_pending
    a.handle_timer(tree.now + DIRECTORY_FLUSH_S)
    sent = a.outbox.take(directory=False)
    assert any(getattr(e, "message", None) and e.message.TYPE == "directory" for e in sent)


def test_legs_that_never_close_are_closed_by_the_timer_and_ended_calls_expire() -> None:
    tree = FakeTree(TREES[1], timeouts=Timeouts(close=5.0))
    tree.legs_close = False
    tree.register("lower-a", "cam")
    tree.register("lower-b", "cam-b")
    call = tree.call("lower-a", "lower-a/cam", "lower-b/cam-b")
    a = tree.servers["lower-a"]
    assert a.find_call(call).state is CallState.ACTIVE
    tree.hangup("lower-a", call)
    ended_at = tree.now
    assert a.find_call(call).state is CallState.ENDING
    assert a.timer(tree.now) == ended_at + 5.0
    a.handle_timer(ended_at + 5.0)
    assert a.find_call(call).state is CallState.ENDED and not a.closing
    keep = a.ended.keep_s
    assert a.timer(tree.now) == ended_at + keep  # then only the ended call's expiry
    a.handle_timer(ended_at + keep)
    assert a.find_call(call) is None and a.timer(tree.now) is None


def test_a_peer_that_breaks_the_call_table_is_told_and_nothing_changes() -> None:
    tree = FakeTree(TREES[1])
    tree.register("lower-a", "cam")
    callee = tree.register("lower-b", "desk", rings=True)
    call = tree.call("lower-a", "lower-a/cam", "lower-b/desk")
    b = tree.servers["lower-b"]
    woken = b.find_call(call).timeline["t_callee_woken"]
    tree.from_device("lower-b", "desk", Woken(call=call, at=woken + 1.0))  # a second wake-up
    error = callee.received[-1]
    assert isinstance(error, Error) and error.ref == "woken" and error.call == call
    assert "already recorded" in error.message
    assert b.find_call(call).timeline["t_callee_woken"] == woken
    assert b.find_call(call).state is CallState.RINGING


# ---------------------------------------------------------------------- a device asked to dial


def test_a_device_asked_to_dial_makes_the_call_the_command_answers_with() -> None:
    tree = FakeTree(TREES[1])
    caller = tree.register("lower-a", "cam")
    tree.register("lower-b", "cam-b")
    a = tree.servers["lower-a"]
    placing = a.create_call(CreateCall(caller="lower-a/cam", callee="lower-b/cam-b",
                                       dial_from="device"), tree.now)
    assert isinstance(placing, Placing) and not a.sessions
    tree._drain("lower-a")
    tree.pump()
    place = next(m for m in caller.received if isinstance(m, PlaceCall))
    assert place.ref == placing.ref and place.callee == "lower-b/cam-b"
    call = a.placed.pop(placing.ref)
    assert call.started_by == "device" and call.state is CallState.ACTIVE
    assert (not a.placing and a.timer(tree.now) is None) or a.timer(tree.now) > tree.now


@pytest.mark.parametrize("places", ["ignore", "refuse"])
def test_a_device_that_will_not_dial_is_no_dial_by_the_cores_deadline(places: str) -> None:
    tree = FakeTree(TREES[1], timeouts=Timeouts(wake=2.0))
    tree.register("lower-a", "phone", places=places)
    tree.register("lower-b", "cam-b")
    a = tree.servers["lower-a"]
    start = tree.now
    placing = a.create_call(CreateCall(caller="lower-a/phone", callee="lower-b/cam-b",
                                       dial_from="device"), start)
    tree._drain("lower-a")
    tree.pump()
    if places == "refuse":  # said so at once: refused with its words
        refusal = a.placed[placing.ref]
        assert refusal.code == "no_dial" and "a person dials here" in refusal.message
        return
    assert a.timer(start) == start + 2.0 and placing.ref not in a.placed
    a.handle_timer(start + 1.99)
    assert placing.ref not in a.placed
    a.handle_timer(start + 2.0)
    assert a.placed[placing.ref].code == "no_dial" and not a.placing
    # its dial, too late, is refused, and makes no call
    tree.from_device("lower-a", "phone", Dial(callee="lower-b/cam-b", seq=9, ref=placing.ref))
    error = tree.devices[("lower-a", "phone")].received[-1]
    assert isinstance(error, Error) and error.code == "no_dial" and error.ref == "dial"
    assert not a.sessions
