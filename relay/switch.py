"""The signalling core of one server: calls, links and messages in (with ``now``), effects out.

It does no I/O and imports neither aiohttp nor aiortc, in the manner of aioquic's
``QuicConnection``: the server (relay/node.py) feeds it every message that arrives, every link
that opens or closes, every media event, and its own timer (it says when it next needs waking:
``timer``; then ``handle_timer``), and carries out what it puts in the outbox
(relay/effects.py): messages to send, legs to open, offers to apply, legs to close.

A call at a server is a :class:`Session` with two ports: ``up`` toward the caller and ``down``
toward the callee, each a named link (a device, a child, the parent). A call is set up in two
passes along its path:

1. ``call_setup`` goes from the caller's server toward the callee's, each server choosing the next
   link (relay/routing.py) and adding itself to ``path``;
2. the callee's server wakes the callee, picks the video codec (the caller's first that the callee
   takes) and sends ``call_accept`` back with the whole path; each server it passes starts its two
   legs (it offers on device legs and on the downstream trunk, and answers on the upstream one).

Timeline events and media figures travel the path to every server (relay/timeline.py); a hang-up
travels away from whoever ended the call. Who may join a link, and what the directory hears of
it, is relay/membership.py. Messages are dispatched by :data:`HANDLERS` (link kind, message
type): a pair that is not in the table is refused, and nothing changes.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from msgspec.structs import replace

from relay.admission import Limits, admit
from relay.call import Call, CallState, Timeouts
from relay.directory import TreeDirectory
from relay.effects import (
    DIRECTORY_FLUSH_S,
    PARENT,
    CallChanged,
    Link,
    LinkKind,
    Negotiate,
    PortPlan,
    StartMedia,
    StopMedia,
)
from relay.ended import Ended, EndedCalls
from relay.hops import links_of
from relay.membership import Counters, Membership
from relay.routing import Local, route
from relay.session import Port, Session
from relay.timeline import Timeline
from wire.auth import Auth
from wire.logs import event
from wire.messages import (
    MAX_PATH,
    Announce,
    Answer,
    CallAccept,
    CallInfo,
    CallSetup,
    CallUpdate,
    CreateCall,
    DeviceInfo,
    DeviceKind,
    Dial,
    Dialed,
    Directory,
    Error,
    FirstFrame,
    Hangup,
    Heartbeat,
    HopFigures,
    Message,
    Offer,
    Pickup,
    PlaceCall,
    Register,
    Role,
    Stats,
    Wake,
    Welcome,
    Woken,
    split_address,
)
from wire.reasons import Code, Refused

log = logging.getLogger("relay.switch")

#: why a call ends when one of its links closes, by the link's kind
LINK_LOST: dict[LinkKind, Code] = {"device": Code.DEVICE_GONE, "child": Code.SERVER_GONE,
                                   "parent": Code.TRUNK_LOST}


def carried(caller: DeviceInfo | None, callee: DeviceInfo | None) -> tuple[str, ...]:
    """The directions a call between these two can carry media in (None: a party not known
    here, which may do both). A WHIP publisher only sends; a WHEP viewer only receives."""
    def sends(info: DeviceInfo | None) -> bool:
        return info is None or info.kind != "whep"

    def receives(info: DeviceInfo | None) -> bool:
        return info is None or info.kind != "whip"

    out = []
    if sends(caller) and receives(callee):
        out.append("caller_to_callee")
    if sends(callee) and receives(caller):
        out.append("callee_to_caller")
    return tuple(out)


def new_call_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(frozen=True)
class Placing:
    """A call the caller's device was asked to dial itself (``place_call``, for ``POST
    /v1/calls`` with ``dial_from: device``): its ``dial`` with ``ref`` makes the call, by
    ``deadline`` (else ``no_dial``). :attr:`Switch.placed` holds the outcome."""

    ref: int
    device: str
    deadline: float


class Switch:
    """Calls at one server: set up, carried and ended; the entry point for everything the
    server's I/O layer feeds the core."""

    def __init__(self, directory: TreeDirectory, limits: Limits | None = None,
                 timeouts: Timeouts | None = None, auth: Auth | None = None,
                 heartbeat_s: float = 2.0, call_id: Callable[[], str] = new_call_id,
                 keep_ended_s: float | None = None) -> None:
        self.directory = directory
        self.outbox = directory.outbox
        self.limits = limits or Limits()
        self.timeouts = timeouts or Timeouts()
        self.auth = auth or Auth()
        self.heartbeat_s = heartbeat_s
        self.new_call_id = call_id
        self.sessions: dict[str, Session] = {}
        self.ended = EndedCalls(keep_ended_s)
        self.counters = Counters()
        #: set on SIGTERM: new calls and links are refused while the calls in progress end
        self.draining = False
        self.membership = Membership(directory, self.limits, self.auth, self.counters,
                                     heartbeat_s, lambda: (self.draining, len(self.sessions)))
        self.timeline = Timeline(self.outbox)
        #: ended calls whose legs are closing, by id (CallState.ENDING)
        self.closing: dict[str, Call] = {}
        #: (deadline, call id): a call's next deadline, pushed whenever it changes; an entry
        #: whose call has moved on is dropped when it comes up (see timer)
        self._timers: list[tuple[float, str]] = []
        #: when the directory changes waiting now go out (None: none wait)
        self._flush_at: float | None = None
        #: calls devices were asked to dial, by ref, and what came of each (read by the API)
        self.placing: dict[int, Placing] = {}
        self.placed: dict[int, Call | Refused] = {}
        self._refs = itertools.count(1)

    @property
    def name(self) -> str:
        return self.directory.name

    # ------------------------------------------------------------------ links

    def device_register(self, register: Register, now: float,
                        kind: DeviceKind = "device") -> Refused | None:
        """A device's first message (or a WHIP/WHEP session's, ``kind``). Returns the
        refusal, or None when it is registered."""
        return self.membership.device(register, kind)

    def child_announce(self, announce: Announce, now: float) -> Refused | None:
        """A child server's first message. Returns the refusal, or None when it is welcomed."""
        return self.membership.child(announce)

    def parent_welcomed(self, welcome: Welcome, now: float) -> None:
        self.membership.welcomed(welcome)

    def link_lost(self, link: Link, now: float) -> None:
        """A link closed: every call over it ends, and the directory forgets what it brought."""
        reason = LINK_LOST[link.kind]
        for session in list(self.sessions.values()):
            if session.port_for(link) is not None:
                self._end(session, reason, now, source=link)
        self.membership.lost(link)

    # ------------------------------------------------------------------ the probe's commands

    def create_call(self, request: CreateCall, now: float,
                    dial: Dial | None = None) -> Call | Placing | Refused:
        """``POST /v1/calls`` at the caller's server, or the caller's own ``dial`` (answered
        with ``dialed`` ahead of its wake-up): the call, or the refusal (nothing changed; the
        caller counts it: the API's error middleware, or :meth:`_dial`, once). With
        ``dial_from: device``, the :class:`Placing`: the caller is asked to dial it."""
        try:
            return self._create_call(request, now, dial)
        except Refused as refusal:
            return refusal

    def _create_call(self, request: CreateCall, now: float,
                     dial: Dial | None) -> Call | Placing:
        started_by = "api" if dial is None else "device"
        refusal = admit("call", self.name, self.limits, self.draining, len(self.sessions))
        if refusal is not None:
            raise refusal
        if self.directory.role != "lower":
            raise Refused(Code.NOT_A_LOWER_SERVER, f"{self.name} is an upper server: send call "
                          "commands to the caller's lower server")
        caller = self._own_caller(request.caller)
        where = route(self.directory, request.callee)
        if isinstance(where, Local) and where.device == caller.id:
            raise Refused(Code.SAME_DEVICE, "caller and callee are the same device", "callee")
        local_callee = self.directory.own.get(where.device) if isinstance(where, Local) \
            else None
        for info, what in ((caller, "caller"), (local_callee, "callee")):
            if info is not None and info.state == "busy":
                raise Refused(Code.BUSY_DEVICE, f"{what} {info.address} is busy (in a call)",
                              what)
        directions = carried(caller, local_callee)
        if not directions:
            raise Refused(Code.NO_MEDIA_PATH, f"{caller.address} ({caller.kind}) and "
                          f"{local_callee.address if local_callee else request.callee} "
                          f"({local_callee.kind if local_callee else '?'}) have no direction "
                          "in which one sends what the other receives", "callee")
        if request.dial_from == "device" and dial is None:
            return self._place(caller, request, now)
        call = Call(self.new_call_id(), caller.address, "", now, self.timeouts,
                    media_mode=request.media_mode, path=[self.name], started_by=started_by,
                    directions=directions, script=request.script)
        call.timeline["t_received"] = now
        up = Port(Link("device", caller.id), "caller", tuple(caller.codecs))
        if dial is not None:
            self.outbox.send(up.link, Dialed(call=call.id, callee=dial.callee, seq=dial.seq))
        self.counters.started_by[started_by] = self.counters.started_by.get(started_by, 0) + 1
        if isinstance(where, Local):
            callee = self.directory.own[where.device]
            call.callee = callee.address
            # The caller's first choice that the callee takes too; with none in common, the
            # caller's, and this server transcodes for the callee alone.
            call.codec = next((c for c in caller.codecs if c in callee.codecs),
                              caller.codecs[0])
            session = Session(call, up, Port(Link("device", callee.id), "callee",
                                             tuple(callee.codecs)), routed=True)
            self._open(session)
            self._wake(session, session.up)
            self._wake(session, session.down)
            self._start_media(session)
        else:
            call.callee = where.callee
            call.codec = caller.codecs[0]
            session = Session(call, up, Port(where.link))
            self._open(session)
            self._wake(session, session.up)
            self.outbox.send(where.link, CallSetup(
                call=call.id, caller=call.caller, callee=where.callee, codecs=list(caller.codecs),
                media_mode=request.media_mode, path=[self.name], started_by=started_by,  # type: ignore[arg-type]
                directions=list(directions), script=request.script))  # type: ignore[arg-type]
        event(log, "call.started", call=call.id, caller=call.caller, callee=call.callee,
              started_by=started_by)
        return call

    def _place(self, caller: DeviceInfo, request: CreateCall, now: float) -> Placing:
        """Ask the caller's device to dial the call itself; the API waits for its ``dial``."""
        if caller.kind != "device":
            raise Refused(Code.NO_DIAL, f"{caller.address} is a {caller.kind} session: it does "
                          "not dial", "dial_from")
        placing = Placing(next(self._refs), caller.id, now + self.timeouts.wake)
        self.placing[placing.ref] = placing
        self.outbox.send(Link("device", caller.id), PlaceCall(
            callee=request.callee, ref=placing.ref, media_mode=request.media_mode,
            script=request.script))
        event(log, "call.place", device=caller.id, callee=request.callee, ref=placing.ref)
        return placing

    def _placed(self, ref: int, outcome: Call | Refused) -> None:
        self.placing.pop(ref, None)
        self.placed[ref] = outcome
        self.outbox.add(CallChanged(outcome.id if isinstance(outcome, Call) else ""))

    def _dial(self, link: Link, dial: Dial, now: float) -> None:
        """A device starts a call: as ``POST /v1/calls`` with it as the caller. Answered with
        ``dialed`` ahead of its wake-up, or an error with the refusal's code. A dial with a
        ``ref`` carries out a ``place_call``: its outcome is the command's."""
        placing = self.placing.get(dial.ref) if dial.ref is not None else None
        if dial.ref is not None and (placing is None or placing.device != link.name):
            refusal: Call | Placing | Refused = Refused(
                Code.NO_DIAL, f"no place_call {dial.ref} waits for {link.name} (it timed out, "
                "or was another device's)", "ref")
        else:
            refusal = self.create_call(CreateCall(caller=link.name, callee=dial.callee,
                                                  media_mode=dial.media_mode,
                                                  script=dial.script), now, dial)
            if placing is not None:
                assert not isinstance(refusal, Placing)
                self._placed(placing.ref, refusal)
        if isinstance(refusal, Refused):
            self.counters.refused(refusal.code)
            event(log, "call.dial_refused", logging.INFO, device=link.name, callee=dial.callee,
                  code=refusal.code, reason=refusal.message)
            self.outbox.send(link, Error(code=refusal.code, message=refusal.message[:1024],
                                         field=refusal.field, ref=dial.TYPE))

    def _own_caller(self, address: str) -> DeviceInfo:
        server, device = split_address(address)
        if server not in (None, self.name):
            if self.directory.server(server or "") is None:
                raise Refused(Code.UNKNOWN_SERVER, f"no server {server!r} in the tree", "caller")
            raise Refused(Code.CALLER_NOT_HERE, f"caller {address} is on {server}, not "
                          f"{self.name}: send the command to the caller's server", "caller")
        info = self.directory.own.get(device)
        if info is None:
            raise Refused(Code.UNKNOWN_DEVICE, f"no device {device!r} on {self.name}", "caller")
        return info

    def hangup(self, call_id: str, now: float) -> Call | None:
        """``DELETE /v1/calls/{id}``: end the call (reason hangup); the call, or None."""
        session = self.sessions.get(call_id)
        if session is not None:
            event(log, "call.hangup_requested", call=call_id)
            self._end(session, Code.HANGUP, now)
        return self.find_call(call_id)

    def find_call(self, call_id: str) -> Call | None:
        session = self.sessions.get(call_id)
        if session is not None:
            return session.call
        ended = self.ended.get(call_id)
        return ended.call if ended is not None else None

    def call_info(self, call: Call) -> CallInfo:
        return CallInfo(call=call.id, state=call.state.value, caller=call.caller,  # type: ignore[arg-type]
                        callee=call.callee or call.caller, server=self.name,
                        path=list(call.path), started_by=call.started_by,  # type: ignore[arg-type]
                        timeline=dict(call.timeline),
                        media=dict(call.media), reason=call.reason, detail=call.detail,
                        codec=call.codec, directions=list(call.directions),  # type: ignore[arg-type]
                        transcoded=list(call.transcoded),
                        hops=[call.hops[name] for name in call.path if name in call.hops],
                        links=links_of(call.path, call.caller, call.callee or call.caller,
                                       call.hops),
                        senders=dict(call.senders))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ messages

    def receive(self, link: Link, message: Message, now: float) -> None:
        """A valid message arrived on ``link``."""
        handler = HANDLERS.get((link.kind, type(message)))
        if handler is None:
            self._refuse(link, message, Code.UNEXPECTED_TYPE,
                         f"{message.TYPE!r} is not expected on a {link.kind} link", "type")
            return
        handler(self, link, message, now)

    def _echo(self, link: Link, message: Heartbeat, now: float) -> None:
        self.outbox.send(link, message)

    def _heard(self, link: Link, message: Heartbeat, now: float) -> None:
        pass

    def _again(self, link: Link, message: Message, now: float) -> None:
        self._refuse(link, message, Code.ALREADY_REGISTERED if link.kind == "device"
                     else Code.PROTOCOL_ERROR, f"{message.TYPE} was already received on this "
                     "link", "type")

    def _peer_error(self, link: Link, message: Error, now: float) -> None:
        event(log, "peer.error", logging.WARNING, peer=str(link), code=message.code,
              reason=message.message, field=message.field, call=message.call, ref=message.ref)
        if message.ref == PlaceCall.TYPE and link.kind == "device":
            # the device will not dial: its oldest place_call is refused with its words
            placing = next((p for p in self.placing.values() if p.device == link.name), None)
            if placing is not None:
                self._placed(placing.ref, Refused(Code.NO_DIAL, f"{link.name} would not dial: "
                                                  f"{message.message}", "dial_from"))

    def _directory(self, link: Link, update: Directory, now: float) -> None:
        refused = self.membership.update(link, update)
        if refused:
            first = refused[0]
            more = f" ({len(refused)} of {update.size} entries refused)" if len(refused) > 1 \
                else ""
            self._refuse(link, update, first.code, first.message + more, first.field)

    # ------------------------------------------------------------------ call setup

    def _setup(self, link: Link, setup: CallSetup, now: float) -> None:
        """A call entering this server from a neighbour."""
        if setup.call in self.sessions or setup.call in self.ended:
            self._refuse(link, setup, Code.DUPLICATE_CALL,
                         f"call {setup.call!r} already exists here", "call")
            return
        problem = self._setup_problem(link, setup)
        if problem is None:
            refusal = admit("call", self.name, self.limits, self.draining, len(self.sessions))
            problem = (refusal.code, refusal.message) if refusal else None
        if problem is not None:
            self._turn_away(link, setup, *problem, now)
            return
        if self.directory.role == "lower":
            self._terminate(link, setup, now)
        else:
            self._transit(link, setup, now)

    def _turn_away(self, link: Link, setup: CallSetup, code: Code, text: str,
                   now: float) -> None:
        """Refuse a call arriving over ``link``: a hang-up back with the reason. The refused
        call is kept as ended, so what crossed with the refusal is dropped quietly and
        ``GET /v1/calls/{id}`` here says why."""
        self.counters.refused(code)
        event(log, "call.refused", logging.WARNING, call=setup.call, caller=setup.caller,
              callee=setup.callee, code=code, reason=text, peer=str(link))
        self.outbox.send(link, Hangup(call=setup.call, reason=code,
                                      path=[*setup.path, self.name]))
        if setup.call not in self.ended:
            call = Call(setup.call, setup.caller, setup.callee, now, self.timeouts,
                        media_mode=setup.media_mode, path=[*setup.path, self.name])
            call.end(code, now)
            call.close(now)  # it has no legs here
            self.ended.add(Ended(call, (link,)), now)

    def _setup_problem(self, link: Link, setup: CallSetup) -> tuple[Code, str] | None:
        """Why a call_setup from ``link`` cannot be taken (None: it can)."""
        caller_server, _ = split_address(setup.caller)
        sender = link.name if link.kind == "child" else self.directory.parent
        if caller_server != setup.path[0] or setup.path[-1] != sender:
            return Code.NOT_YOURS, f"path {setup.path} must run from the caller's server " \
                f"{caller_server!r} to the sender {sender!r}"
        if link.kind == "child":
            if self.directory.via.get(caller_server or "") != link.name:
                return Code.NOT_YOURS, f"{link.name} may not start calls for " \
                    f"{caller_server!r}: it is not in its subtree"
        elif caller_server == self.name or caller_server in self.directory.below:
            return Code.NOT_YOURS, f"the parent may not start calls for {caller_server!r}: " \
                "it is in this server's subtree"
        if self.name in setup.path or len(setup.path) >= MAX_PATH:
            return Code.MISROUTED, f"the call has crossed {self.name} already: {setup.path}"
        if len(set(setup.path)) != len(setup.path):
            return Code.MISROUTED, f"the path names a server twice: {setup.path}"
        return None

    def _terminate(self, link: Link, setup: CallSetup, now: float) -> None:
        """We are the callee's server: wake the callee, pick the codec, accept."""
        server, device = split_address(setup.callee)
        info = self.directory.own.get(device) if server in (None, self.name) else None
        if info is None:
            self._turn_away(link, setup, Code.UNKNOWN_DEVICE,
                            f"no device {device!r} on {self.name}", now)
            return
        source = self._tap_source(info, setup) if info.state == "busy" else None
        if info.state == "busy" and source is None:
            self._turn_away(link, setup, Code.CALLEE_BUSY, f"{info.address} is in a call", now)
            return
        directions = tuple(d for d in carried(None, info) if d in setup.directions)
        if not directions:
            self._turn_away(link, setup, Code.NO_MEDIA_PATH, f"{info.address} ({info.kind}) "
                            f"cannot take what the caller sends ({', '.join(setup.directions)})",
                            now)
            return
        path = [*setup.path, self.name]
        codec = source.call.codec if source is not None else \
            next((c for c in setup.codecs if c in info.codecs), setup.codecs[0])
        call = Call(setup.call, setup.caller, info.address, now, self.timeouts, codec=codec,
                    media_mode=setup.media_mode, path=path, started_by=setup.started_by,
                    directions=directions, script=setup.script)
        session = Session(call, Port(link), Port(Link("device", info.id), "callee",
                                                 tuple(info.codecs),
                                                 tap=source.call.id if source else None),
                          routed=True)
        self._open(session)
        self.outbox.send(link, CallAccept(call=call.id, callee=info.address, codec=codec,
                                          path=path, directions=list(directions)))  # type: ignore[arg-type]
        if source is None:
            self._wake(session, session.down)
        else:  # awake and sending already: its stream is fanned out to this call too
            event(log, "call.tapped", call=call.id, device=info.address, source=source.call.id)
            self.timeline.record(session, "t_callee_woken", now, None, now)
            self.timeline.record(session, "t_answered", now, None, now)
        self._start_media(session)

    def _tap_source(self, info: DeviceInfo, setup: CallSetup) -> Session | None:
        """The call a busy device is in, if a call that only watches it (media toward the
        caller alone: a WHEP player) may take its stream from there (the same codec)."""
        if setup.media_mode != "full" or list(setup.directions) != ["callee_to_caller"]:
            return None
        link = Link("device", info.id)
        for session in self.sessions.values():
            port = session.port_for(link)
            if port is not None and port.tap is None and session.routed and \
                    session.call.media_mode == "full" and session.call.codec in setup.codecs:
                return session
        return None

    def _transit(self, link: Link, setup: CallSetup, now: float) -> None:
        try:
            where = route(self.directory, setup.callee)
        except Refused as refusal:
            self._turn_away(link, setup, refusal.code, refusal.message, now)
            return
        assert not isinstance(where, Local)  # an upper server holds no devices
        if where.link == link:
            self._turn_away(link, setup, Code.MISROUTED, f"{setup.callee} is back where the "
                            "call came from", now)
            return
        path = [*setup.path, self.name]
        call = Call(setup.call, setup.caller, where.callee, now, self.timeouts,
                    codec=setup.codecs[0], media_mode=setup.media_mode, path=path,
                    started_by=setup.started_by)
        session = Session(call, Port(link), Port(where.link))
        self._open(session)
        self.outbox.send(where.link, replace(setup, callee=where.callee, path=path))
        if self._hands_over(session):
            # The last upper server on the path hands the call to the callee's server. The
            # callee's server hears of it once it has accepted (see _accept).
            self.timeline.record(session, "t_routed", now, session.down.link)

    def _accept(self, session: Session, link: Link, accept: CallAccept, now: float) -> None:
        call = session.call
        if session.routed or link != session.down.link or accept.path[:len(call.path)] != \
                call.path:
            self._refuse(link, accept, Code.PROTOCOL_ERROR, "call_accept out of turn, or with "
                         f"a path that does not continue {call.path}", "path")
            return
        call.path, call.codec, call.callee = list(accept.path), accept.codec, accept.callee
        call.directions = tuple(accept.directions)
        session.routed = True
        if session.up.link.is_trunk:
            self.outbox.send(session.up.link, accept)
        routed = call.timeline.get("t_routed")
        if routed is not None and self._hands_over(session):
            self.outbox.send(link, CallUpdate(call=call.id, events={"t_routed": routed}))
        self._start_media(session)
        self.outbox.add(CallChanged(call.id))

    def _hands_over(self, session: Session) -> bool:
        """This server passes the call straight to the callee's (lower) server."""
        link = session.down.link
        entry = self.directory.server(link.name) if link.kind == "child" else None
        return entry is not None and entry.role == "lower"

    def _open(self, session: Session) -> None:
        call = session.call
        self.sessions[call.id] = session
        call.on_change = self._schedule
        self._schedule(call)
        self.counters.calls_started += 1
        for port in session.ports:
            if port.role is not None:
                self.directory.device_state(port.link.name, "busy")
        event(log, "call.session", call=call.id, caller=call.caller, callee=call.callee,
              upstream=str(session.up.link), downstream=str(session.down.link))

    def _wake(self, session: Session, port: Port) -> None:
        assert port.role is not None
        call = session.call
        peer = call.callee if port.role == "caller" else call.caller
        self.outbox.send(port.link, Wake(call=call.id, role=port.role, peer=peer,
                                         media_mode=call.media_mode, script=call.script))  # type: ignore[arg-type]

    def _start_media(self, session: Session) -> None:
        call = session.call
        if call.media_mode != "full":
            return  # signalling only: no legs

        def plan(port: Port, offer: bool) -> PortPlan:
            codec = call.codec if port.role is None or call.codec in port.codecs \
                else port.codecs[0]  # the device's own: this server transcodes for it
            return PortPlan(port.link, offer and port.tap is None, codec, port.role, port.tap)
        self.outbox.add(StartMedia(call.id, plan(session.up, session.up.role is not None),
                                   plan(session.down, True), call.directions))

    # ------------------------------------------------------------------ calls in progress

    def _call_message(self, link: Link, message: Message, now: float) -> None:
        call_id: str = message.call  # type: ignore[attr-defined]
        session = self.sessions.get(call_id)
        port = session.port_for(link) if session is not None else None
        if session is None or port is None:
            self._late(link, message, now)
            return
        if isinstance(message, Hangup):
            call = session.call
            if message.path and not session.routed and link == session.down.link and \
                    message.path[:len(call.path)] == call.path:
                call.path = list(message.path)  # how far it got, and who turned it away
            self._end(session, message.reason, now, source=link, detail=message.detail)
        elif isinstance(message, CallUpdate) and link.is_trunk:
            self.timeline.update(session, link, message, self._beyond(session.call, link), now)
        elif isinstance(message, CallAccept):
            self._accept(session, link, message, now)
        elif isinstance(message, Offer | Answer):
            # This server answers on the upstream trunk and offers everywhere else.
            expects_offer = port is session.up and link.is_trunk
            if session.routed and isinstance(message, Offer) == expects_offer and \
                    session.call.media_mode == "full":
                self.outbox.add(Negotiate(call_id, link, message))
            else:
                self._refuse(link, message, Code.PROTOCOL_ERROR, f"no {message.TYPE} is "
                             "expected on this leg now", "type")
        elif isinstance(message, Woken | FirstFrame) and port.role is not None:
            name = (f"t_{port.role}_woken" if isinstance(message, Woken)
                    else f"t_first_frame_{port.role}")
            taken = self.timeline.record(session, name, message.at, None, now, link,
                                         message.TYPE)
            if taken and isinstance(message, Woken) and port.role == "callee":
                if message.ringing:
                    event(log, "call.ringing", call=call_id, callee=session.call.callee)
                else:  # answered as it woke
                    self.timeline.record(session, "t_answered", message.at, None, now, link,
                                         message.TYPE)
        elif isinstance(message, Pickup) and port.role == "callee":
            if not session.call.ringing:
                self._refuse(link, message, Code.PROTOCOL_ERROR, "pickup of a call that is "
                             "not ringing (no woken with ringing, or answered already)", "type")
                return
            event(log, "call.answered", call=call_id, callee=session.call.callee)
            self.timeline.record(session, "t_answered", message.at, None, now, link,
                                 message.TYPE)
        elif isinstance(message, Stats) and port.role is not None:
            self.timeline.report(session.call, port.role, message, session.links, link)
        else:
            self._refuse(link, message, Code.UNEXPECTED_TYPE,
                         f"{message.TYPE!r} is not expected here", "type")

    def _late(self, link: Link, message: Message, now: float) -> None:
        """A message for a call this server does not carry over ``link``: what the timeline
        keeps of an ended call, or else an unknown call."""
        call_id: str = message.call  # type: ignore[attr-defined]
        ended = self.ended.get(call_id)
        if ended is None or not self.timeline.late(ended, link, message,
                                                   self._beyond(ended.call, link)):
            self._refuse(link, message, Code.UNKNOWN_CALL, f"no call {call_id!r} on this link",
                         "call")

    # ------------------------------------------------------------------ the media layer

    def media_up(self, call_id: str, now: float) -> None:
        """The caller's first packet reached this server (the caller's server only)."""
        session = self.sessions.get(call_id)
        if session is not None and "t_media_up" not in session.call.timeline:
            self.timeline.record(session, "t_media_up", now, None)

    def media_failed(self, call_id: str, code: Code, detail: str | None, now: float) -> None:
        """A leg of the call failed or closed here (``detail``: which, and how): the call ends
        at once, at every server of its path, saying so."""
        session = self.sessions.get(call_id)
        if session is not None:
            self._end(session, code, now, detail=f"{self.name}: {detail}"[:300]
                      if detail else None)

    def _beyond(self, call: Call, link: Link) -> set[str]:
        """The servers of the call's path on the far side of trunk ``link`` from here."""
        path = call.path
        neighbour = link.name if link.kind == "child" else self.directory.parent
        if not link.is_trunk or self.name not in path or neighbour not in path:
            return set()
        here, there = path.index(self.name), path.index(neighbour)
        return set(path[there:]) if there > here else set(path[:there + 1])

    def hop_figures(self, call_id: str, figures: HopFigures, now: float) -> None:
        """This server's own figures of a call (the media layer's, relay/hops.py): kept in
        the call's record and passed along its path, while it is up and once it ended."""
        session = self.sessions.get(call_id)
        if session is not None:
            self.timeline.hops(session.call, figures, session.links)
            return
        ended = self.ended.get(call_id)
        if ended is not None:
            self.timeline.hops(ended.call, figures, list(ended.trunks))

    def transcoded(self, call_id: str, where: str, now: float) -> None:
        """A direction of this call fell back to transcoding here: the call's record says
        where, at every server."""
        session = self.sessions.get(call_id)
        if session is not None:
            self.timeline.transcoded(session, where)

    def undeliverable(self, link: Link, message: Message, now: float) -> None:
        """A message could not be sent: a wake-up or a call setup ends its call."""
        if isinstance(message, Wake):
            session = self.sessions.get(message.call)
            if session is not None:
                self._end(session, Code(f"{message.role}_unreachable"), now)
        elif isinstance(message, CallSetup):
            session = self.sessions.get(message.call)
            if session is not None:
                self._end(session, Code.SERVER_UNREACHABLE, now)

    # ------------------------------------------------------------------ ending, time

    def _end(self, session: Session, reason: Code, now: float, source: Link | None = None,
             detail: str | None = None) -> None:
        """End a call here, tell the rest of its path (not ``source``), close its legs."""
        if session.call.end(reason, now, detail).ended:
            self._finish(session, reason, source, now)

    def _finish(self, session: Session, reason: str, source: Link | None, now: float) -> None:
        call = session.call
        self.sessions.pop(call.id, None)
        self.counters.ended_by_reason[reason] = self.counters.ended_by_reason.get(reason, 0) + 1
        path = list(call.path) if not session.routed else None
        for port in session.ports:
            if port.link != source and port.tap is None:
                self.outbox.send(port.link, Hangup(
                    call=call.id, reason=Code(reason),
                    path=path if port is session.up and port.link.is_trunk else None,
                    detail=call.detail))
        if session.routed and call.media_mode == "full":
            self.closing[call.id] = call  # until the media layer says its legs are closed
            self.outbox.add(StopMedia(call.id))
        else:
            call.close(now)
        devices: dict[str, Role] = {}
        for port in session.ports:
            if port.role is not None and port.tap is None:
                devices[port.link.name] = port.role
                self.directory.device_state(port.link.name, "idle")
                for tapping in [s for s in self.sessions.values()
                                if (p := s.port_for(port.link)) is not None
                                and p.tap == call.id]:
                    # the stream they watched is gone with this call
                    self._end(tapping, Code.SOURCE_ENDED, now)
        self.ended.add(Ended(call, tuple(p.link for p in session.ports if p.link.is_trunk),
                             devices), now)
        self.outbox.add(CallChanged(call.id))
        event(log, "call.ended", call=call.id, caller=call.caller, callee=call.callee,
              reason=reason, detail=call.detail,
              was_active=call.was_active,
              duration_s=round(call.timeline["t_end"] - call.created_at, 3))

    def media_closed(self, call_id: str, now: float) -> None:
        """The media layer closed an ended call's legs here: the call is ENDED."""
        call = self.closing.pop(call_id, None)
        if call is not None and call.close(now).after is CallState.ENDED:
            self.outbox.add(CallChanged(call_id))

    def _schedule(self, call: Call) -> None:
        deadline = call.next_deadline()
        if deadline is not None:
            heapq.heappush(self._timers, (deadline, call.id))

    def _timed(self, call_id: str) -> Call | None:
        session = self.sessions.get(call_id)
        return session.call if session is not None else self.closing.get(call_id)

    def timer(self, now: float) -> float | None:
        """When the core next needs :meth:`handle_timer` (UNIX time), or None: a call's
        deadline (relay/call.py), an ending call's close timer, an ended call to forget, or
        directory changes to send (they wait DIRECTORY_FLUSH_S, to go out together)."""
        timers = self._timers
        while timers:
            deadline, call_id = timers[0]
            call = self._timed(call_id)
            if call is not None and call.next_deadline() == deadline:
                break
            heapq.heappop(timers)  # that call moved on
        if self._flush_at is None and self.outbox.directory_pending:
            self._flush_at = now + DIRECTORY_FLUSH_S
        placing = min((p.deadline for p in self.placing.values()), default=None)
        found = [t for t in (timers[0][0] if timers else None, self.ended.next_expiry(),
                             self._flush_at, placing) if t is not None]
        return min(found) if found else None

    def handle_timer(self, now: float) -> None:
        """Whatever is due by ``now``: calls past a deadline end (or, ending, are taken as
        closed), ended calls past their keep are forgotten, waiting directory changes go out."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, call_id = heapq.heappop(timers)
            call = self._timed(call_id)
            if call is None or call.next_deadline() != deadline:
                continue
            transition = call.tick(now)
            session = self.sessions.get(call_id)
            if transition.ended and session is not None:
                self._finish(session, call.reason or Code.SETUP_TIMEOUT, None, now)
            elif call.state is CallState.ENDED and self.closing.pop(call_id, None):
                event(log, "call.close_timeout", logging.WARNING, call=call_id,
                      caller=call.caller, callee=call.callee)
                self.outbox.add(CallChanged(call_id))
        for placing in [p for p in self.placing.values() if p.deadline <= now]:
            event(log, "call.no_dial", logging.WARNING, device=placing.device, ref=placing.ref)
            self._placed(placing.ref, Refused(
                Code.NO_DIAL, f"{placing.device} was asked to dial and did not within "
                f"{self.timeouts.wake:g} s (it follows no scripts, or is stuck)", "dial_from"))
        self.ended.expire(now)
        if self._flush_at is not None and now >= self._flush_at:
            self._flush_at = None
            self.outbox.flush_directory()

    def end_all(self, reason: Code, now: float) -> None:
        for session in list(self.sessions.values()):
            self._end(session, reason, now)

    def _refuse(self, link: Link, message: Message, code: Code, text: str,
                field_name: str | None = None) -> None:
        """Answer a message we will not act on; log it once."""
        call = getattr(message, "call", None)
        self.counters.refused(code)
        event(log, "message.refused", logging.WARNING, peer=str(link), code=code, reason=text,
              field=field_name, call=call, ref=message.TYPE)
        self.outbox.send(link, Error(code=code, message=text[:1024], field=field_name,
                                     call=call, ref=message.TYPE))


Handler = Callable[[Switch, Link, Message, float], None]
_CALL = Switch._call_message
#: (link kind, message type) -> handler. A pair that is not here is refused (unexpected_type).
HANDLERS: dict[tuple[LinkKind, type[Message]], Handler] = {
    # A heartbeat is asked from below (a device, a child) and answered from above: one that
    # comes down from the parent is an answer, taken and not echoed (two servers echoing each
    # other's would ping-pong for ever).
    **{(kind, Heartbeat): Switch._echo for kind in ("device", "child")},
    ("parent", Heartbeat): Switch._heard,
    **{(kind, Error): Switch._peer_error for kind in ("device", "child", "parent")},
    ("device", Register): Switch._again,
    ("child", Announce): Switch._again,
    ("parent", Welcome): Switch._again,
    **{("device", t): _CALL for t in (Woken, Pickup, FirstFrame, Stats, Answer, Hangup)},
    ("device", Dial): Switch._dial,
    **{(kind, t): _CALL for kind in ("child", "parent")
       for t in (CallAccept, Offer, Answer, CallUpdate, Hangup)},
    ("child", CallSetup): Switch._setup,
    ("parent", CallSetup): Switch._setup,
    ("child", Directory): Switch._directory,
    ("parent", Directory): Switch._directory,
}  # type: ignore[dict-item]

__all__ = ["HANDLERS", "PARENT", "Counters", "Port", "Session", "Switch"]
