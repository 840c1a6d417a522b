"""The call state machine as pure logic: no sockets, the test is the clock."""

from __future__ import annotations

import pytest

from relay.call import (
    TRANSITIONS,
    Call,
    CallState,
    CallStateError,
    End,
    MediaReport,
    Milestone,
    Timeouts,
)
from wire.messages import MediaStats


def new_call(**kw) -> Call:
    return Call("c1", "lower-a/cam-1", "lower-b/cam-2", created_at=100.0, **kw)


def test_setup_becomes_active_when_both_see_each_other():
    call = new_call()
    assert not call.record("t_caller_woken", 100.1).activated
    assert not call.record("t_first_frame_callee", 100.3).activated
    assert call.state is CallState.SETUP
    transition = call.record("t_first_frame_caller", 100.4)
    assert transition.activated
    assert call.state is CallState.ACTIVE
    assert call.timeline == {"t_caller_woken": 100.1, "t_first_frame_callee": 100.3,
                             "t_first_frame_caller": 100.4}


def test_end_records_reason_once():
    call = new_call()
    assert call.end("hangup", 105.0).ended
    assert call.state is CallState.ENDED
    assert call.reason == "hangup"
    assert call.timeline["t_end"] == 105.0
    again = call.end("device_gone", 106.0)
    assert not again.ended
    assert call.reason == "hangup" and call.timeline["t_end"] == 105.0


def test_events_after_end_are_refused_and_change_nothing():
    call = new_call()
    call.end("hangup", 101.0)
    with pytest.raises(CallStateError) as caught:
        call.record("t_caller_woken", 102.0)
    assert caught.value.code == "call_ended"
    assert "t_caller_woken" not in call.timeline


def test_late_media_report_is_kept_after_end():
    call = new_call()
    call.end("hangup", 101.0)
    call.handle(MediaReport("callee_to_caller", MediaStats(frames=9)))
    assert call.media["callee_to_caller"].frames == 9


def test_milestone_recorded_once():
    call = new_call()
    call.record("t_routed", 100.2)
    call.record("t_routed", 100.2)  # the same fact again is harmless
    with pytest.raises(CallStateError):
        call.record("t_routed", 100.9)
    assert call.timeline["t_routed"] == 100.2


def test_unknown_milestone_and_direction_refused():
    call = new_call()
    with pytest.raises(CallStateError):
        call.record("t_lunch", 100.5)
    with pytest.raises(CallStateError):
        call.handle(Milestone("t_end", 100.5))
    with pytest.raises(CallStateError):
        call.handle(MediaReport("sideways", MediaStats()))
    assert call.state is CallState.SETUP and call.timeline == {}


def test_wake_timeout_names_who_did_not_wake():
    call = new_call(timeouts=Timeouts(wake=2.0, setup=10.0))
    call.record("t_caller_woken", 100.1)
    assert not call.tick(101.9).ended
    assert call.next_deadline() == 102.0
    assert call.tick(102.1).ended
    assert call.reason == "callee_wake_timeout"


def test_setup_timeout_when_media_never_flows():
    call = new_call(timeouts=Timeouts(wake=2.0, setup=10.0))
    call.record("t_caller_woken", 100.1)
    call.record("t_callee_woken", 100.2)
    call.record("t_answered", 100.2)
    assert call.next_deadline() == 110.0
    assert not call.tick(109.9).ended
    assert call.tick(110.1).ended
    assert call.reason == "setup_timeout"


def test_active_call_has_no_timeout():
    call = new_call(timeouts=Timeouts(wake=1.0, setup=2.0))
    for name, at in (("t_caller_woken", 100.1), ("t_callee_woken", 100.1),
                     ("t_first_frame_callee", 100.5), ("t_first_frame_caller", 100.6)):
        call.record(name, at)
    assert not call.tick(1000.0).ended
    assert call.next_deadline() is None


def test_table_has_no_exit_from_ended_but_media():
    assert set(TRANSITIONS[CallState.ENDED]) == {MediaReport}
    for state in (CallState.SETUP, CallState.ACTIVE):
        assert TRANSITIONS[state][End] is CallState.ENDED


def test_a_ringing_callee_stops_the_setup_clock_and_runs_the_ring_timer():
    call = new_call(timeouts=Timeouts(wake=2.0, setup=10.0, ring=30.0))
    call.record("t_caller_woken", 100.1)
    call.record("t_callee_woken", 100.2)  # rung: no t_answered
    assert call.ringing
    assert not call.tick(100.5).ended  # first seen rung here, on this server's clock
    assert call.next_deadline() == 130.5
    assert not call.tick(125.0).ended, "ringing past the setup timeout is not a setup failure"
    call.record("t_answered", 1.0)  # a device's clock may be anywhere
    assert not call.ringing
    assert not call.tick(126.0).ended  # answered seen at 126: it rang 25.5 s
    assert call.next_deadline() == 100.0 + 25.5 + 10.0
    assert not call.tick(135.4).ended
    assert call.tick(135.6).ended
    assert call.reason == "setup_timeout"


def test_a_callee_that_rings_too_long_is_no_answer():
    call = new_call(timeouts=Timeouts(wake=2.0, setup=10.0, ring=5.0))
    call.record("t_caller_woken", 100.1)
    call.record("t_callee_woken", 100.2)
    assert not call.tick(100.3).ended
    assert not call.tick(105.2).ended
    assert call.tick(105.4).ended
    assert call.reason == "no_answer"
    assert "t_answered" not in call.timeline


def test_a_signalling_only_call_is_up_once_the_callee_answered():
    call = new_call(media_mode="none")
    call.record("t_caller_woken", 100.1)
    call.record("t_callee_woken", 100.2)
    assert call.state is CallState.SETUP, "rung is not answered"
    call.record("t_answered", 100.3)
    assert call.state is CallState.ACTIVE
