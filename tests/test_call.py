"""The call state machine as pure logic: no sockets, the test is the clock. The table
(wire/states.py CALL_TRANSITIONS) is walked pair by pair: every transition it lists is made
happen here, and the pairs it leaves out are refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from relay.call import (
    Call,
    CallState,
    CallStateError,
    Closed,
    End,
    MediaReport,
    Milestone,
    Timeouts,
)
from wire.messages import MediaStats
from wire.states import CALL_TRANSITIONS, CallEvent, replay

S, E = CallState, CallEvent
TIMEOUTS = Timeouts(wake=2.0, setup=10.0, ring=30.0, close=5.0)


def new_call(**kw) -> Call:
    kw.setdefault("timeouts", TIMEOUTS)
    return Call("c1", "lower-a/cam-1", "lower-b/cam-2", created_at=100.0, **kw)


Step = Callable[[Call], object]


def rec(name: str, at: float = 100.5) -> Step:
    return lambda call: call.handle(Milestone(name, at, at))


def tick(at: float) -> Step:
    return lambda call: call.tick(at)


REPORT = lambda call: call.handle(MediaReport("caller_to_callee", MediaStats(frames=3)))  # noqa: E731
END = lambda call: call.handle(End("hangup", 101.0))  # noqa: E731
CLOSE = lambda call: call.handle(Closed(101.1))  # noqa: E731
RANG = [rec("t_callee_woken", 100.2)]  # the callee rings; the caller has not woken
ANSWERED = [*RANG, rec("t_answered", 100.3)]  # answered; the caller has not woken
FRAMES = [rec("t_first_frame_callee", 100.4), rec("t_first_frame_caller", 100.45)]
READY = [rec("t_caller_woken", 100.1), rec("t_callee_woken", 100.2), rec("t_answered", 100.3)]
ACTIVE = [*READY, *FRAMES]

#: (state, event) -> (how to bring a new call to that state, what then makes that event)
WALK: dict[tuple[CallState, CallEvent], tuple[list[Step], Step]] = {
    (S.WAKING, E.WOKE): ([], rec("t_caller_woken")),
    (S.WAKING, E.RANG): ([], rec("t_callee_woken")),
    (S.WAKING, E.READY): (ANSWERED, rec("t_caller_woken")),
    (S.WAKING, E.FRAME): ([], rec("t_first_frame_caller")),
    (S.WAKING, E.FLOWING): ([*ANSWERED, *FRAMES], rec("t_caller_woken")),
    (S.WAKING, E.NOTE): ([], rec("t_routed")),
    (S.WAKING, E.REPORT): ([], REPORT),
    (S.WAKING, E.TIMEOUT): ([], tick(102.0)),
    (S.WAKING, E.END): ([], END),
    (S.RINGING, E.WOKE): (RANG, rec("t_caller_woken")),
    (S.RINGING, E.ANSWERED): (RANG, rec("t_answered")),
    (S.RINGING, E.READY): ([rec("t_caller_woken", 100.1), *RANG], rec("t_answered")),
    (S.RINGING, E.FRAME): (RANG, rec("t_first_frame_callee")),
    (S.RINGING, E.FLOWING): ([rec("t_caller_woken", 100.1), *RANG, *FRAMES],
                             rec("t_answered")),
    (S.RINGING, E.NOTE): (RANG, rec("t_media_up")),
    (S.RINGING, E.REPORT): (RANG, REPORT),
    (S.RINGING, E.TIMEOUT): ([rec("t_caller_woken", 100.1), *RANG, tick(100.2)],
                             tick(130.2)),
    (S.RINGING, E.END): (RANG, END),
    (S.CONNECTING, E.FRAME): (READY, rec("t_first_frame_callee")),
    (S.CONNECTING, E.FLOWING): ([*READY, FRAMES[0]], FRAMES[1]),
    (S.CONNECTING, E.NOTE): (READY, rec("t_routed")),
    (S.CONNECTING, E.REPORT): (READY, REPORT),
    (S.CONNECTING, E.TIMEOUT): (READY, tick(110.1)),  # it rang 0.1 s
    (S.CONNECTING, E.END): (READY, END),
    (S.ACTIVE, E.NOTE): (ACTIVE, rec("t_routed")),
    (S.ACTIVE, E.REPORT): (ACTIVE, REPORT),
    (S.ACTIVE, E.END): (ACTIVE, END),
    (S.ENDING, E.REPORT): ([END], REPORT),
    (S.ENDING, E.CLOSED): ([END], CLOSE),
    (S.ENDING, E.TIMEOUT): ([END], tick(106.0)),
    (S.ENDED, E.REPORT): ([END, CLOSE], REPORT),
}


def test_the_walk_covers_every_transition_of_the_table():
    listed = {(state, event) for state, row in CALL_TRANSITIONS.items() for event in row}
    assert listed == set(WALK)


@pytest.mark.parametrize(("state", "event"), list(WALK), ids=lambda x: x.value)
def test_every_transition_of_the_table_happens(state: CallState, event: CallEvent):
    steps, last = WALK[state, event]
    call = new_call()
    for step in steps:
        step(call)
    assert call.state is state
    last(call)
    assert call.state is CALL_TRANSITIONS[state][event], (state, event)


REFUSED: dict[tuple[CallState, str], tuple[list[Step], Step]] = {
    (S.WAKING, "closed"): ([], CLOSE),
    (S.ACTIVE, "closed"): (ACTIVE, CLOSE),
    (S.ENDING, "milestone"): ([END], rec("t_caller_woken")),
    (S.ENDING, "end"): ([END], END),
    (S.ENDED, "milestone"): ([END, CLOSE], rec("t_routed")),
    (S.ENDED, "closed"): ([END, CLOSE], CLOSE),
}


@pytest.mark.parametrize(("state", "what"), list(REFUSED), ids=str)
def test_an_event_the_table_leaves_out_is_refused_and_changes_nothing(state, what):
    steps, last = REFUSED[state, what]
    call = new_call()
    for step in steps:
        step(call)
    before = (call.state, dict(call.timeline), call.reason)
    with pytest.raises(CallStateError) as caught:
        last(call)
    assert (call.state, dict(call.timeline), call.reason) == before
    assert caught.value.code == ("call_ended" if call.over else "protocol_error")


def test_setup_becomes_active_when_both_see_each_other():
    call = new_call()
    for step in READY:
        assert not step(call).activated
    assert not call.record("t_first_frame_callee", 100.3).activated
    assert call.state is CallState.CONNECTING
    transition = call.record("t_first_frame_caller", 100.4)
    assert transition.activated and call.state is CallState.ACTIVE


def test_a_first_frame_learned_before_the_answer_is_kept_and_counts_later():
    call = new_call()
    call.record("t_caller_woken", 100.1)
    call.record("t_first_frame_caller", 100.4)  # over another link, ahead of the answer
    call.record("t_first_frame_callee", 100.5)
    assert call.state is CallState.WAKING
    call.record("t_callee_woken", 100.2)
    assert call.state is CallState.RINGING
    call.record("t_answered", 100.2)
    assert call.state is CallState.ACTIVE


def test_end_records_reason_once_and_the_call_ends_when_its_legs_close():
    call = new_call()
    assert call.end("hangup", 105.0).ended
    assert call.state is CallState.ENDING and call.over
    assert call.reason == "hangup" and call.timeline["t_end"] == 105.0
    again = call.end("device_gone", 106.0)
    assert not again.ended
    assert call.reason == "hangup" and call.timeline["t_end"] == 105.0
    assert call.close(105.2).after is CallState.ENDED and call.closed_at == 105.2


def test_legs_that_do_not_close_are_taken_as_closed_at_the_close_timer():
    call = new_call()
    call.end("hangup", 105.0)
    assert call.next_deadline() == 110.0
    assert call.tick(109.99).after is CallState.ENDING
    assert call.tick(110.0).after is CallState.ENDED
    assert call.reason == "hangup" and call.next_deadline() is None


def test_late_media_report_is_kept_after_end():
    call = new_call()
    call.end("hangup", 101.0)
    call.close(101.1)
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
    assert call.state is CallState.WAKING and call.timeline == {}


def test_wake_timeout_names_who_did_not_wake_at_its_exact_deadline():
    call = new_call()
    call.record("t_caller_woken", 100.1)
    assert call.next_deadline() == 102.0
    assert not call.tick(101.999).ended
    assert call.tick(102.0).ended
    assert call.reason == "callee_wake_timeout" and call.timeline["t_end"] == 102.0


def test_setup_timeout_when_media_never_flows():
    call = new_call()
    for step in READY:
        step(call)
    assert call.next_deadline() == 110.1  # the callee rang 0.1 s: that is not setup time
    assert not call.tick(110.0).ended
    assert call.tick(110.1).ended
    assert call.reason == "setup_timeout"


def test_active_call_has_no_timeout():
    call = new_call()
    for step in ACTIVE:
        step(call)
    assert not call.tick(1000.0).ended
    assert call.next_deadline() is None


def test_a_ringing_callee_stops_the_setup_clock_and_runs_the_ring_timer():
    call = new_call()
    call.record("t_caller_woken", 100.1)
    call.record("t_callee_woken", 100.2)  # rung: no t_answered
    assert call.ringing
    assert not call.tick(100.5).ended  # first seen rung here, on this server's clock
    assert call.next_deadline() == 130.5
    assert not call.tick(125.0).ended, "ringing past the setup timeout is not a setup failure"
    call.record("t_answered", 1.0)  # a device's clock may be anywhere
    assert not call.ringing and call.state is CallState.CONNECTING
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
    assert call.state is CallState.RINGING, "rung is not answered"
    call.record("t_answered", 100.3)
    assert call.state is CallState.ACTIVE


def test_the_probe_reads_a_timeline_through_the_same_table():
    call = new_call()
    for step in ACTIVE:
        step(call)
    assert replay(call.timeline, call.needed) is CallState.ACTIVE
    assert replay({"t_caller_woken": 1.0, "t_first_frame_caller": 2.0,
                   "t_first_frame_callee": 2.1}, call.needed) is CallState.WAKING
    one_way = ("t_first_frame_caller",)
    assert replay({"t_caller_woken": 1.0, "t_callee_woken": 1.1, "t_answered": 1.1,
                   "t_first_frame_caller": 2.0, "t_end": 3.0}, one_way) is CallState.ACTIVE
