"""The call state machine, as pure logic: events and timer ticks in (with ``now``), changes out.

Every server on a call's path keeps one :class:`Call`. It imports neither aiohttp nor aiortc;
the signalling core (:mod:`relay.switch`) feeds it and acts on what it returns.

States::

    setup ──(first frame at both devices)──► active
      (a one-way call, with a WHIP or WHEP party: the first frame of its one direction)
      │                                        │
      └──────(hangup / failure / timeout)──────┴──► ended

A callee that rings (wire/messages.py ``Woken.ringing``) has ``t_callee_woken`` and not yet
``t_answered``: while it rings the call waits for a person, not for the network, so the setup
clock stops and the ring timeout (``no_answer``) runs instead. Timers count on this server's
clock, from when it first saw each event (the events' own times are the devices' clocks).

An event that does not fit the current state raises :class:`CallStateError` and changes nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from wire.messages import (
    DIRECTIONS,
    FIRST_FRAME,
    TIMELINE_EVENTS,
    DevicePart,
    HopFigures,
    MediaStats,
)
from wire.reasons import Code


class CallState(enum.StrEnum):
    SETUP = "setup"
    ACTIVE = "active"
    ENDED = "ended"


class CallStateError(Exception):
    """An event arrived that the call cannot take in its state; nothing was changed."""

    def __init__(self, call: str, message: str, code: Code = Code.PROTOCOL_ERROR) -> None:
        super().__init__(f"call {call}: {message}")
        self.call = call
        self.message = message
        self.code = code


# Events the machine takes.


@dataclass(frozen=True)
class Milestone:
    """A timeline event happened at ``at`` (see TIMELINE_EVENTS)."""

    name: str
    at: float
    #: when this server learned of it, by its own clock (the ring timeout counts from that)
    seen: float | None = None


@dataclass(frozen=True)
class MediaReport:
    """A device's figures for one direction of media."""

    direction: str
    stats: MediaStats


@dataclass(frozen=True)
class End:
    """The call is over: hung up, refused, failed or timed out, with a reason code."""

    reason: str
    at: float
    #: what exactly went wrong, for a person (which leg failed and how), if anyone said
    detail: str | None = None


CallEvent = Milestone | MediaReport | End

#: transitions[state][event type] -> next state. A missing pair is a protocol error.
#: A Milestone that completes media both ways promotes SETUP to ACTIVE (see Call._after).
TRANSITIONS: dict[CallState, dict[type, CallState]] = {
    CallState.SETUP: {Milestone: CallState.SETUP, MediaReport: CallState.SETUP,
                      End: CallState.ENDED},
    CallState.ACTIVE: {Milestone: CallState.ACTIVE, MediaReport: CallState.ACTIVE,
                       End: CallState.ENDED},
    # Late media reports after the end are kept: a device's last figures arrive after hang-up.
    CallState.ENDED: {MediaReport: CallState.ENDED},
}

#: The milestones that together mean "both devices see each other".
MEDIA_BOTH_WAYS = ("t_first_frame_callee", "t_first_frame_caller")
#: What makes a signalling-only call (media "none") active: both woken, and the callee answered.
BOTH_WOKEN = ("t_caller_woken", "t_callee_woken", "t_answered")


@dataclass(frozen=True)
class Timeouts:
    """How long a call may stay in each phase before it is ended (seconds)."""

    wake: float = 5.0  #: command -> both devices acknowledged their wake-up
    setup: float = 20.0  #: command -> first frame at both devices (time spent ringing aside)
    ring: float = 30.0  #: a ringing callee rung -> answered (else ``no_answer``)


@dataclass(frozen=True)
class Transition:
    """What an event changed: the state before and after, and whether it ended the call."""

    before: CallState
    after: CallState

    @property
    def ended(self) -> bool:
        return self.before is not CallState.ENDED and self.after is CallState.ENDED

    @property
    def activated(self) -> bool:
        return self.before is CallState.SETUP and self.after is CallState.ACTIVE


@dataclass
class Call:
    """One call as one server sees it."""

    id: str
    caller: str  #: full address SERVER/DEVICE
    callee: str
    created_at: float
    timeouts: Timeouts = field(default_factory=Timeouts)
    codec: str = "video/VP8"  #: the video codec the trunks carry
    media_mode: str = "full"  #: "none": signalling only, up once both devices are woken
    state: CallState = CallState.SETUP
    timeline: dict[str, float] = field(default_factory=dict)
    media: dict[str, MediaStats] = field(default_factory=dict)
    reason: str | None = None
    #: what exactly ended it, for a person (which leg failed and how), when known
    detail: str | None = None
    #: where this call's media is decoded and re-encoded ("SERVER:KIND:DIRECTION"); empty when
    #: every hop forwards
    transcoded: list[str] = field(default_factory=list)
    #: each server's own figures of the call (relay/hops.py), by server
    hops: dict[str, HopFigures] = field(default_factory=dict)
    #: the sending device's own part of each direction
    senders: dict[str, DevicePart] = field(default_factory=dict)
    #: the servers the call crosses, from the caller's to the callee's (whole once routed)
    path: list[str] = field(default_factory=list)
    #: "api" (POST /v1/calls) or "device" (the caller dialed)
    started_by: str = "api"
    #: the directions it carries media in (one only where a party only sends or receives:
    #: WHIP, WHEP); it is active once the first frame of each has arrived
    directions: tuple[str, ...] = DIRECTIONS
    #: when this server first saw the callee rung and the answer (its own clock; see tick)
    rung_seen: float | None = None
    answered_seen: float | None = None

    @property
    def ringing(self) -> bool:
        """The callee is rung and has not answered yet."""
        return "t_callee_woken" in self.timeline and "t_answered" not in self.timeline

    def handle(self, event: CallEvent) -> Transition:
        """Apply one event. Raises CallStateError (and changes nothing) if it does not fit."""
        before = self.state
        after = TRANSITIONS[before].get(type(event))
        if after is None:
            raise CallStateError(self.id, f"{type(event).__name__} not allowed in state "
                                          f"{before.value}", code=Code.CALL_ENDED)
        if isinstance(event, Milestone):
            self._check_milestone(event)
            self.timeline[event.name] = event.at
            if event.seen is not None:
                self._seen(event.seen)
        elif isinstance(event, MediaReport):
            if event.direction not in DIRECTIONS:
                raise CallStateError(self.id, f"unknown media direction {event.direction!r}")
            self.media[event.direction] = event.stats
        elif isinstance(event, End):
            self.reason = event.reason
            self.detail = event.detail
            self.timeline["t_end"] = event.at
        self.state = self._after(after)
        return Transition(before, self.state)

    def record(self, name: str, at: float) -> Transition:
        return self.handle(Milestone(name, at))

    def end(self, reason: str, at: float, detail: str | None = None) -> Transition:
        """End the call unless it already ended (then nothing changes)."""
        if self.state is CallState.ENDED:
            return Transition(self.state, self.state)
        return self.handle(End(reason, at, detail))

    def tick(self, now: float) -> Transition:
        """Enforce the timeouts; ends the call with a reason when one has passed."""
        if self.state is not CallState.SETUP:
            return Transition(self.state, self.state)
        self._seen(now)
        age = now - self.created_at
        woken = "t_caller_woken" in self.timeline and "t_callee_woken" in self.timeline
        if not woken and age > self.timeouts.wake:
            who = "caller" if "t_caller_woken" not in self.timeline else "callee"
            return self.handle(End(Code(f"{who}_wake_timeout"), now))
        if self.ringing:
            assert self.rung_seen is not None
            if now - self.rung_seen > self.timeouts.ring:
                return self.handle(End(Code.NO_ANSWER, now))
            return Transition(self.state, self.state)
        if age - self.rang_s > self.timeouts.setup:
            return self.handle(End(Code.SETUP_TIMEOUT, now))
        return Transition(self.state, self.state)

    @property
    def rang_s(self) -> float:
        """How long the callee rang before it was answered (0: it answered at once)."""
        if self.rung_seen is None or self.answered_seen is None:
            return 0.0
        return max(0.0, self.answered_seen - self.rung_seen)

    def _seen(self, now: float) -> None:
        if self.rung_seen is None and "t_callee_woken" in self.timeline:
            self.rung_seen = now
        if self.answered_seen is None and "t_answered" in self.timeline:
            self.answered_seen = now

    def next_deadline(self) -> float | None:
        """When tick() may next change something, or None."""
        if self.state is not CallState.SETUP:
            return None
        woken = "t_caller_woken" in self.timeline and "t_callee_woken" in self.timeline
        wake = None if woken else self.created_at + self.timeouts.wake
        if self.ringing and self.rung_seen is not None:
            ring = self.rung_seen + self.timeouts.ring
            return min(ring, wake) if wake is not None else ring
        setup = self.created_at + self.rang_s + self.timeouts.setup
        return min(setup, wake) if wake is not None else setup

    def _check_milestone(self, event: Milestone) -> None:
        if event.name not in TIMELINE_EVENTS or event.name == "t_end":
            raise CallStateError(self.id, f"unknown timeline event {event.name!r}")
        if event.name in self.timeline:
            # Every event happens once; a repeat is a peer's mistake, not a new fact.
            if self.timeline[event.name] == event.at:
                return
            raise CallStateError(self.id, f"{event.name} already recorded")

    @property
    def needed(self) -> tuple[str, ...]:
        """The milestones that make the call active."""
        if self.media_mode != "full":
            return BOTH_WOKEN
        return tuple(FIRST_FRAME[d] for d in self.directions)

    def _after(self, state: CallState) -> CallState:
        if state is CallState.SETUP and all(m in self.timeline for m in self.needed):
            return CallState.ACTIVE
        return state
