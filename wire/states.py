"""The state machines of a call, as tables (in the manner of h11's ``_state.py``).

Two machines, one table each, read by every service:

- :data:`CALL_TRANSITIONS`: a call as a server sees it (relay/call.py), from the command to the
  end. The probe reads a call's timeline through the same table (:func:`replay`), so "the call
  is active" means one thing everywhere.
- :data:`PHONE_TRANSITIONS`: a call as a device sees it (endpoint/device.py): woken, ringing,
  answering the server's offer, media flowing, ended.

``transitions[state][event] -> next state``. A pair that is not in a table is a protocol error:
the event is refused with a reason and nothing changes. Who caused it decides what happens next
(:class:`RemoteProtocolError`: the peer is told, with an ``error`` message; and
:class:`LocalProtocolError`: our own code misused the machine, and it raises).

docs/relay.md draws both tables (``python -m wire.states`` prints the diagrams, generated from
the tables; a test checks the docs hold what it prints).
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Iterable, Mapping

from wire.reasons import Code


class ProtocolError(Exception):
    """An event that does not fit the machine's state. Nothing was changed."""

    def __init__(self, message: str, code: Code = Code.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: answer it with an ``error`` (this ``code``), log it once,
    change nothing."""


class LocalProtocolError(ProtocolError):
    """This program asked its own machine for something its state does not allow (a person's
    pickup of a call that does not ring, a hang-up of a call that is over)."""


# ---------------------------------------------------------------------- a call at a server


class CallState(enum.StrEnum):
    WAKING = "waking"  #: waiting for the devices to acknowledge their wake-up
    RINGING = "ringing"  #: the callee rings: waiting for a person, not the network
    CONNECTING = "connecting"  #: both woken and answered: legs connect, first frames come
    ACTIVE = "active"  #: a first frame arrived in every direction the call carries
    ENDING = "ending"  #: ended; its legs close (its last figures are still taken)
    ENDED = "ended"  #: its legs are closed


class CallEvent(enum.StrEnum):
    """What happened to a call, as the table knows it (:func:`classify` names a milestone)."""

    WOKE = "woke"  #: a device acknowledged its wake-up; another has not yet
    RANG = "rang"  #: the callee rings (``woken`` with ``ringing``)
    ANSWERED = "answered"  #: the callee answered; the caller has not woken yet
    READY = "ready"  #: the last of the wake-ups and the answer: legs may connect
    FRAME = "frame"  #: a first frame in one direction; not yet in every one
    FLOWING = "flowing"  #: the last first frame needed (or, signalling only, READY)
    NOTE = "note"  #: a milestone that moves nothing (routed, media up, received)
    REPORT = "report"  #: a device's or a server's figures
    TIMEOUT = "timeout"  #: a deadline of the state passed (see CALL_TIMERS)
    END = "end"  #: hung up, refused, failed
    CLOSED = "closed"  #: the call's legs at this server are closed


_S, _E = CallState, CallEvent
_BEFORE_ACTIVE = {_E.NOTE: None, _E.REPORT: None, _E.TIMEOUT: _S.ENDING, _E.END: _S.ENDING,
                  _E.FLOWING: _S.ACTIVE}


def _stay(state: CallState, table: Mapping[CallEvent, CallState | None]
          ) -> dict[CallEvent, CallState]:
    return {event: state if after is None else after for event, after in table.items()}


#: transitions[state][event] -> next state. Milestones travel the path over separate links, so
#: a first frame may be learned before the answer that let it flow: it is kept, and moves the
#: call on once the rest arrives.
CALL_TRANSITIONS: dict[CallState, dict[CallEvent, CallState]] = {
    _S.WAKING: _stay(_S.WAKING, {
        **_BEFORE_ACTIVE, _E.WOKE: None, _E.RANG: _S.RINGING, _E.READY: _S.CONNECTING,
        _E.FRAME: None}),
    _S.RINGING: _stay(_S.RINGING, {
        **_BEFORE_ACTIVE, _E.WOKE: None, _E.ANSWERED: _S.WAKING, _E.READY: _S.CONNECTING,
        _E.FRAME: None}),
    _S.CONNECTING: _stay(_S.CONNECTING, {**_BEFORE_ACTIVE, _E.FRAME: None}),
    _S.ACTIVE: _stay(_S.ACTIVE, {_E.NOTE: None, _E.REPORT: None, _E.END: _S.ENDING}),
    # A device's last figures and the servers' last hop figures arrive after the hang-up.
    # A call whose legs do not close in time is ended by its timer all the same.
    _S.ENDING: _stay(_S.ENDING, {_E.REPORT: None, _E.CLOSED: _S.ENDED,
                                 _E.TIMEOUT: _S.ENDED}),
    _S.ENDED: {_E.REPORT: _S.ENDED},
}

#: which deadlines run in each state (relay/call.py Call.deadline), and the reason a call ends
#: with when one passes (``wake``: caller_wake_timeout or callee_wake_timeout, for whoever
#: has not woken)
CALL_TIMERS: dict[CallState, tuple[str, ...]] = {
    _S.WAKING: ("wake", "setup"),
    _S.RINGING: ("wake", "ring"),
    _S.CONNECTING: ("setup",),
    _S.ENDING: ("close",),
}
TIMER_REASONS: dict[str, Code | None] = {"wake": None, "setup": Code.SETUP_TIMEOUT,
                                         "ring": Code.NO_ANSWER, "close": None}

WOKEN = ("t_caller_woken", "t_callee_woken", "t_answered")


def classify(name: str, timeline: Mapping[str, float], needed: Iterable[str]) -> CallEvent:
    """The table's event for milestone ``name`` added to ``timeline`` (which holds it already).
    ``needed``: the first frames that make the call active (none: signalling only)."""
    ready = all(m in timeline for m in WOKEN)
    if name not in (*WOKEN, *needed) and not name.startswith("t_first_frame_"):
        return CallEvent.NOTE
    if ready and all(m in timeline for m in needed):
        return CallEvent.FLOWING
    if name.startswith("t_first_frame_"):
        return CallEvent.FRAME
    if ready:
        return CallEvent.READY
    if name == "t_callee_woken" and "t_answered" not in timeline:
        return CallEvent.RANG
    if name == "t_answered" and "t_callee_woken" in timeline:
        return CallEvent.ANSWERED
    return CallEvent.WOKE


def replay(timeline: Mapping[str, float], needed: Iterable[str]) -> CallState:
    """The state a call's milestones bring it to, in the order they happened (the end aside):
    what the probe judges a call by, with the servers' own table."""
    needed = tuple(needed)
    state, seen = CallState.WAKING, {}
    for name, at in sorted(timeline.items(), key=lambda kv: kv[1]):
        if name == "t_end":
            continue
        seen[name] = at
        state = CALL_TRANSITIONS[state].get(classify(name, seen, needed), state)
    return state


# ---------------------------------------------------------------------- a call at a device


class PhoneState(enum.StrEnum):
    NEW = "new"  #: not heard of yet (a wake-up starts it)
    RINGING = "ringing"  #: woken and ringing: a person (or a scenario) picks up or declines
    ANSWERING = "answering"  #: woken and answered: waiting for the server's offer
    CONNECTING = "connecting"  #: the offer is answered: media connects
    ACTIVE = "active"  #: the first frame from the other party is decoded
    ENDED = "ended"


class PhoneEvent(enum.StrEnum):
    WAKE = "wake"  #: the server wakes it, and it answers at once
    WAKE_RINGING = "wake_ringing"  #: the server wakes it, and it rings
    PICKUP = "pickup"  #: a person (or a scenario) answers a ringing call
    OFFER = "offer"  #: the server's offer (held while the call rings)
    FIRST_FRAME = "first_frame"  #: the first frame from the other party
    DECLINE = "decline"  #: a person turns down a ringing call
    HANGUP = "hangup"  #: either side hangs up, or the call fails
    LOST = "lost"  #: the link to the server closed


_P, _V = PhoneState, PhoneEvent
_ENDS = {_V.HANGUP: _P.ENDED, _V.LOST: _P.ENDED}
PHONE_TRANSITIONS: dict[PhoneState, dict[PhoneEvent, PhoneState]] = {
    _P.NEW: {_V.WAKE: _P.ANSWERING, _V.WAKE_RINGING: _P.RINGING},
    _P.RINGING: {_V.PICKUP: _P.ANSWERING, _V.OFFER: _P.RINGING, _V.DECLINE: _P.ENDED,
                 **_ENDS},
    _P.ANSWERING: {_V.OFFER: _P.CONNECTING, **_ENDS},
    _P.CONNECTING: {_V.FIRST_FRAME: _P.ACTIVE, **_ENDS},
    _P.ACTIVE: dict(_ENDS),
    _P.ENDED: {},
}


def diagram(table: Mapping[enum.StrEnum, Mapping[enum.StrEnum, enum.StrEnum]]) -> str:
    """A Mermaid state diagram of a table (every transition, self-loops included)."""
    lines = ["stateDiagram-v2"]
    states = list(table)
    lines.append(f"    [*] --> {states[0].name}")
    for state, row in table.items():
        moves: dict[enum.StrEnum, list[str]] = {}
        for event, after in row.items():
            moves.setdefault(after, []).append(event.value)
        for after, events in moves.items():
            lines.append(f"    {state.name} --> {after.name}: {', '.join(events)}")
    lines.append(f"    {states[-1].name} --> [*]")
    return "\n".join(lines)


def diagrams() -> str:
    """Both tables' diagrams, as the docs hold them."""
    return (f"A call at a server:\n\n```mermaid\n{diagram(CALL_TRANSITIONS)}\n```\n\n"
            f"A call at a device:\n\n```mermaid\n{diagram(PHONE_TRANSITIONS)}\n```\n")


if __name__ == "__main__":
    sys.stdout.write(diagrams())
