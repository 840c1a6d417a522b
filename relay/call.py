"""A call at one server: the table of wire/states.py, fed with events and ``now``.

Every server on a call's path keeps one :class:`Call`. It imports neither aiohttp nor aiortc;
the signalling core (:mod:`relay.switch`) feeds it and acts on what it returns. Its states and
every move between them are :data:`wire.states.CALL_TRANSITIONS`; which deadlines run in a
state are :data:`wire.states.CALL_TIMERS`. A milestone is named for the table by
:func:`wire.states.classify` (the last wake-up makes the call READY; the last first frame
FLOWING, and so on); an event the table does not take raises :class:`CallStateError` and
changes nothing.

A callee that rings (wire/messages.py ``Woken.ringing``) waits for a person, not for the
network: the setup clock stops while it rings and the ring timeout (``no_answer``) runs instead.
Timers count on this server's clock, from when it first saw each event (the events' own times
are the devices' clocks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from wire.messages import (
    DIRECTIONS,
    FIRST_FRAME,
    TIMELINE_EVENTS,
    DevicePart,
    HopFigures,
    MediaStats,
    Script,
)
from wire.reasons import Code
from wire.states import (
    CALL_TIMERS,
    CALL_TRANSITIONS,
    TIMER_REASONS,
    WOKEN,
    CallEvent,
    CallState,
    RemoteProtocolError,
    classify,
)


class CallStateError(RemoteProtocolError):
    """An event arrived that the call cannot take in its state; nothing was changed. Events
    come from peers (devices, the other servers of the path): the switch answers the one that
    sent it."""

    def __init__(self, call: str, message: str, code: Code = Code.PROTOCOL_ERROR) -> None:
        super().__init__(f"call {call}: {message}", code)
        self.call = call


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


@dataclass(frozen=True)
class Timeout:
    """A deadline of the call's state passed (its timer), ending it with ``reason`` (None: the
    legs of an ending call did not close in time)."""

    at: float
    reason: str | None = None


@dataclass(frozen=True)
class Closed:
    """The call's legs at this server are closed (or it had none)."""

    at: float


CallInput = CallEvent | Milestone | MediaReport | End | Timeout | Closed

@dataclass(frozen=True)
class Timeouts:
    """How long a call may stay in each phase before it is ended (seconds)."""

    wake: float = 5.0  #: command -> both devices acknowledged their wake-up
    setup: float = 20.0  #: command -> first frame at both devices (time spent ringing aside)
    ring: float = 30.0  #: a ringing callee rung -> answered (else ``no_answer``)
    close: float = 5.0  #: ended -> its legs closed (else it is closed all the same)


@dataclass(frozen=True)
class Transition:
    """What an event changed: the state before and after."""

    before: CallState
    after: CallState

    @property
    def ended(self) -> bool:
        """The call ended with this event (it was not ending or ended before)."""
        over = (CallState.ENDING, CallState.ENDED)
        return self.before not in over and self.after in over

    @property
    def activated(self) -> bool:
        return self.before is not CallState.ACTIVE and self.after is CallState.ACTIVE


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
    state: CallState = CallState.WAKING
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

    #: when its legs closed here (this server's clock)
    closed_at: float | None = None
    #: what scripted devices do in it (a load's scenario), passed to both wake-ups
    script: Script | None = None
    #: told after every change (the switch keeps its timers by it)
    on_change: Callable[[Call], None] | None = field(default=None, repr=False, compare=False)

    @property
    def over(self) -> bool:
        """Ended here (its legs may still be closing)."""
        return self.state in (CallState.ENDING, CallState.ENDED)

    def handle(self, event: CallInput) -> Transition:
        """Apply one event. Raises CallStateError (and changes nothing) if the table does not
        take it in the call's state."""
        if isinstance(event, Milestone):
            self._check_milestone(event)
            if self.timeline.get(event.name) == event.at:
                # Every event happens once; the same one again (two routes) is no news.
                return Transition(self.state, self.state)
            kind = classify(event.name, {**self.timeline, event.name: event.at}, self.needed)
        elif isinstance(event, MediaReport):
            if event.direction not in DIRECTIONS:
                raise CallStateError(self.id, f"unknown media direction {event.direction!r}")
            kind = CallEvent.REPORT
        elif isinstance(event, End):
            kind = CallEvent.END
        elif isinstance(event, Timeout):
            kind = CallEvent.TIMEOUT
        else:
            kind = CallEvent.CLOSED
        before = self.state
        after = CALL_TRANSITIONS[before].get(kind)
        if after is None:
            raise CallStateError(self.id, f"{kind.value} is not taken in state {before.value}",
                                 code=Code.CALL_ENDED if self.over else Code.PROTOCOL_ERROR)
        if isinstance(event, Milestone):
            self.timeline[event.name] = event.at
            if event.seen is not None:
                self._seen(event.seen)
        elif isinstance(event, MediaReport):
            self.media[event.direction] = event.stats
        elif isinstance(event, End | Timeout) and not self.over:
            self.reason = event.reason
            self.detail = event.detail if isinstance(event, End) else None
            self.timeline["t_end"] = event.at
        else:  # Closed, or an ending call's close timer
            self.closed_at = event.at
        self.state = after
        if self.on_change is not None:
            self.on_change(self)
        return Transition(before, after)

    def record(self, name: str, at: float) -> Transition:
        return self.handle(Milestone(name, at))

    def end(self, reason: str, at: float, detail: str | None = None) -> Transition:
        """End the call unless it already ended (then nothing changes)."""
        if self.over:
            return Transition(self.state, self.state)
        return self.handle(End(reason, at, detail))

    def close(self, at: float) -> Transition:
        """Its legs here are closed: ENDING becomes ENDED (elsewhere nothing changes)."""
        if self.state is not CallState.ENDING:
            return Transition(self.state, self.state)
        return self.handle(Closed(at))

    @property
    def ringing(self) -> bool:
        return self.state is CallState.RINGING

    def deadline(self) -> tuple[float, str] | None:
        """The first deadline running in the call's state (CALL_TIMERS), and its name."""
        found: list[tuple[float, str]] = []
        for timer in CALL_TIMERS.get(self.state, ()):
            if timer == "wake":
                if not all(m in self.timeline for m in ("t_caller_woken", "t_callee_woken")):
                    found.append((self.created_at + self.timeouts.wake, timer))
            elif timer == "ring" and self.rung_seen is not None:
                found.append((self.rung_seen + self.timeouts.ring, timer))
            elif timer == "setup":
                found.append((self.created_at + self.rang_s + self.timeouts.setup, timer))
            elif timer == "close":
                found.append((self.timeline.get("t_end", self.created_at)
                              + self.timeouts.close, timer))
        return min(found) if found else None

    def next_deadline(self) -> float | None:
        """When tick() may next change something, or None."""
        found = self.deadline()
        return found[0] if found else None

    def tick(self, now: float) -> Transition:
        """Enforce the deadline of the call's state: past it, the call ends with the timer's
        reason (an ending call whose legs did not close is taken as closed)."""
        if self._seen(now) and self.on_change is not None:
            self.on_change(self)
        found = self.deadline()
        if found is None or now < found[0]:
            return Transition(self.state, self.state)
        timer = found[1]
        reason = TIMER_REASONS[timer]
        if timer == "wake":  # whoever has not acknowledged it
            reason = Code("caller_wake_timeout" if "t_caller_woken" not in self.timeline
                          else "callee_wake_timeout")
        return self.handle(Timeout(now, reason))

    @property
    def rang_s(self) -> float:
        """How long the callee rang before it was answered (0: it answered at once)."""
        if self.rung_seen is None or self.answered_seen is None:
            return 0.0
        return max(0.0, self.answered_seen - self.rung_seen)

    def _seen(self, now: float) -> bool:
        """Note when this server first saw the callee rung and answered; True if it is news
        (a deadline moved)."""
        news = False
        if self.rung_seen is None and "t_callee_woken" in self.timeline:
            self.rung_seen, news = now, True
        if self.answered_seen is None and "t_answered" in self.timeline:
            self.answered_seen, news = now, True
        return news

    def _check_milestone(self, event: Milestone) -> None:
        if event.name not in TIMELINE_EVENTS or event.name == "t_end":
            raise CallStateError(self.id, f"unknown timeline event {event.name!r}")
        if event.name in self.timeline and self.timeline[event.name] != event.at:
            raise CallStateError(self.id, f"{event.name} already recorded")

    @property
    def needed(self) -> tuple[str, ...]:
        """The first frames that make the call active (none: signalling only, active once
        both are woken and the callee answered)."""
        if self.media_mode != "full":
            return ()
        return tuple(FIRST_FRAME[d] for d in self.directions)

    @property
    def was_active(self) -> bool:
        return all(m in self.timeline for m in (*WOKEN, *self.needed))
