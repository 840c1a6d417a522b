"""WHIP (RFC 9725) and WHEP on a lower server: standard publishers and players as devices.

A WHIP publisher (OBS, FFmpeg's ``whip`` muxer, GStreamer's whipclientsink) POSTs its SDP offer
to ``/v1/whip/{device}`` and becomes a device of that id, kind ``whip``: listed, callable, the
caller gets its audio and video; it receives nothing. Its media arrives whether or not it is in
a call, as producers of its own router (rtc/graph.py) that outlive the calls consuming them, so
a call joins a live stream at its next keyframe.

A WHEP player POSTs its offer to ``/v1/whep/{address}`` (any device of the tree:
``/v1/whep/lower-b/cam-2``) and watches that device: the server makes the player a device of
kind ``whep`` here and calls the watched one from it, one way. The call crosses the tree like
any other, so the player can be anywhere; the watched device is woken as a callee and sends its
media; nothing is sent to it.

Each session is a device whose signalling peer is this module (:class:`GatewayChannel`: a wake
is acknowledged at once) and whose leg is the session's own peer connection, answered in the
POST: the media plane (relay/media.py) uses it instead of making a leg. ``Location`` names the
session; ``DELETE`` on it ends it; ``PATCH`` (trickle ICE, ICE restart) is not supported: 405.
The answer carries every candidate (the server gathers before answering).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from relay.effects import Link
from relay.leg import Leg
from relay.node import Node
from rtc.graph import Producer, Router
from rtc.sdp import rate_feedback, section
from wire.auth import bearer
from wire.http import read_body
from wire.logs import event
from wire.messages import (
    MAX_SDP_CHARS,
    VIDEO_CODECS,
    CreateCall,
    DeviceKind,
    Hangup,
    Message,
    Register,
    Wake,
    Woken,
    check_address,
    check_name,
)
from wire.reasons import Code, Refused
from wire.tasks import Tasks

log = logging.getLogger("relay.gateway")

SDP_TYPE = "application/sdp"
TRICKLE_TYPE = "application/trickle-ice-sdpfrag"


@dataclass
class GatewaySession:
    """One WHIP or WHEP session: the device it is, its leg, and (WHIP) its producers."""

    id: str
    kind: DeviceKind
    device: str  #: the device id it is on this server
    leg: Leg
    watched: str | None = None  #: WHEP: the address it watches
    call: str | None = None  #: WHEP: its call
    router: Router | None = None  #: WHIP: its producers' router (outlives calls)
    producers: dict[str, Producer] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    closed: bool = False
    answer: str = ""  #: the SDP answer given in the POST

    @property
    def link(self) -> Link:
        return Link("device", self.device)


class GatewayChannel:
    """The signalling end of a session, in place of a device's WebSocket: what the core sends
    its device is answered here, at once."""

    def __init__(self, gateways: Gateways, session: GatewaySession) -> None:
        self.gateways = gateways
        self.session = session
        self.peer = f"{session.kind}:{session.id}"

    @property
    def open(self) -> bool:
        return not self.session.closed

    def post(self, message: Message) -> None:
        node = self.gateways.node
        if isinstance(message, Wake):
            # Acknowledged after the core's current input, as a device's woken would be.
            woken = Woken(call=message.call, at=node.clock())
            asyncio.get_running_loop().call_soon(node.receive, self.session.link, woken)
        elif isinstance(message, Hangup) and self.session.kind == "whep":
            # A viewer's call is its session: when it ends, so does the session.
            self.gateways.spawn(self.gateways.end(self.session, f"call ended: {message.reason}"))

    async def flush(self, timeout: float = 2.0) -> None:
        return None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.gateways.end(self.session, reason or "closed")


class Gateways:
    """A lower server's WHIP and WHEP sessions, by id; what the media plane asks for by
    device."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.sessions: dict[str, GatewaySession] = {}
        self._tasks = Tasks("gateway")

    def spawn(self, coro: Any) -> None:
        self._tasks.spawn(coro)

    def _leg(self, name: str, session_id: str) -> Leg:
        return Leg(session_id, name, self.node.settings.media, on_ready=lambda *_: None,
                   on_failed=lambda leg, why: self.spawn(self._failed(session_id, why)))

    async def _failed(self, session_id: str, why: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            await self.end(session, f"its peer connection {why}")

    async def publish(self, device: str, offer: str, token: str | None) -> GatewaySession:
        """WHIP: a publisher's offer; it becomes device ``device`` here."""
        video = _offered(offer, "video", sends=True)
        session_id = _new_id()
        session = GatewaySession(session_id, "whip", device,
                                 self._leg(f"whip:{device}", session_id))
        self._register(session, video, token)
        try:
            answer = await session.leg.create_answer(
                offer, directions={"audio": "recvonly", "video": "recvonly"})
            router = session.router = Router(f"whip:{device}", self.node.media.stats,
                                             measure=self.node.settings.hop_figures,
                                             congestion=self.node.settings.congestion_control)
            transport = router.transport(f"whip:{device}", session.leg.transceivers,
                                         session.leg.rtcp)
            for kind in session.leg.transceivers:
                session.producers[kind] = router.produce(transport, kind, f"whip:{device}:{kind}")
            if "video" in session.producers:  # can the publisher follow the path's rate?
                session.producers["video"].cannot_adapt = rate_feedback(
                    section(offer, "video"))
        except Exception as exc:
            await self.end(session, "its offer could not be answered")
            raise _refused(exc) from None
        session.answer = answer
        self.node.media.sources[device] = session.producers
        event(log, "whip.published", session=session.id, device=device,
              codecs=",".join(video))
        return session

    async def watch(self, address: str, offer: str) -> GatewaySession:
        """WHEP: a player's offer to watch ``address`` (the probe's token was checked: it places
        a call); answered once the call is placed."""
        video = _offered(offer, "video", sends=False)
        session_id = _new_id()
        session = GatewaySession(session_id, "whep", f"whep-{session_id[:12]}",
                                 self._leg(f"whep:{address}", session_id), watched=address)
        auth = self.node.settings.auth  # the player was let in with the probe's token
        self._register(session, video, auth.token(f"device:{session.device}") if auth.on
                       else None)
        try:
            answer = await session.leg.create_answer(
                offer, directions={"audio": "sendonly", "video": "sendonly"})
            self.node.media.sinks[session.device] = session.leg
            call = self.node.feed(self.node.core.create_call, CreateCall(
                caller=f"{self.node.name}/{session.device}", callee=address))
            if isinstance(call, Refused):
                raise call
        except BaseException as exc:
            await self.end(session, "its offer could not be answered, or its call placed")
            if isinstance(exc, Exception):
                raise _refused(exc) from None
            raise
        session.call = call.id
        session.answer = answer
        event(log, "whep.watching", session=session.id, device=session.device,
              watched=address, call=call.id)
        return session

    def _register(self, session: GatewaySession, codecs: list[str], token: str | None) -> None:
        node = self.node
        register = Register(device=session.device, codecs=codecs, token=token)  # type: ignore[arg-type]
        refusal = node.feed(lambda now: node.core.device_register(register, now, session.kind),
                            carry_out=False)
        if refusal is not None:
            raise refusal
        self.sessions[session.id] = session
        node.attach(session.link, GatewayChannel(self, session))  # type: ignore[arg-type]

    async def end(self, session: GatewaySession, why: str) -> None:
        """End a session once: its device leaves (ending its call), its leg closes."""
        if session.closed:
            return
        session.closed = True
        self.sessions.pop(session.id, None)
        node = self.node
        if session.call is not None:  # a viewer's call ends as hung up, not as a lost device
            node.feed(node.core.hangup, session.call)
        node.media.sources.pop(session.device, None)
        node.media.sinks.pop(session.device, None)
        channel = node.channels.get(session.link)
        if channel is not None:
            node.detach(session.link, channel)
        if session.router is not None:
            session.router.close(why)
        await session.leg.close()
        event(log, f"{session.kind}.ended", session=session.id, device=session.device, why=why,
              call=session.call)

    def drain_estimates(self, now: float) -> None:
        for session in self.sessions.values():
            if session.router is not None:
                session.router.drain_estimates(now)

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            await self.end(session, "server shutting down")
        await self._tasks.close()


def _refused(exc: Exception) -> Refused:
    """What went wrong with an offer, as the client's error (a refusal stays one)."""
    if isinstance(exc, Refused):
        return exc
    event(log, "gateway.bad_offer", logging.INFO, error=repr(exc)[:300])
    return Refused(Code.BAD_SDP, f"the offer could not be answered: {exc}"[:500], "sdp")


def _new_id() -> str:
    return secrets.token_hex(12)


def _offered(offer: str, kind: str, sends: bool) -> list[str]:
    """The video codecs of an offer that this project forwards, in the offer's order; refused
    when the offer does not send (WHIP) or receive (WHEP) video in one of them."""
    found = section(offer, kind)
    if found is None or found.port == 0:
        raise Refused(Code.BAD_SDP, f"the offer has no {kind} m-line", "sdp")
    if (sends and not found.sends) or (not sends and not found.receives):
        raise Refused(Code.BAD_SDP, f"the offer's {kind} is {found.direction}: a "
                      f"{'publisher must send' if sends else 'player must receive'} it", "sdp")
    names = {c.lower(): c for c in VIDEO_CODECS}
    codecs = list(dict.fromkeys(names[c.lower()] for c in found.codecs if c.lower() in names))
    if not codecs:
        raise Refused(Code.BAD_SDP, f"the offer's video codecs ({', '.join(found.codecs)}) "
                      f"include none of {', '.join(VIDEO_CODECS)}", "sdp")
    return codecs


# -------------------------------------------------------------------------------- HTTP


async def _read_sdp(request: web.Request) -> str:
    content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type != SDP_TYPE:
        raise Refused(Code.UNSUPPORTED_MEDIA_TYPE, f"the body must be {SDP_TYPE}, not "
                      f"{content_type or 'nothing'}", "Content-Type")
    body = await read_body(request, MAX_SDP_CHARS,
                           request.app[GATEWAYS].node.settings.http_body_timeout_s, "offer")
    sdp = body.decode(errors="replace")
    if not sdp.startswith("v=0"):
        raise Refused(Code.BAD_SDP, "the body is not an SDP offer (it must start with v=0)",
                      "sdp")
    return sdp


def _created(request: web.Request, session: GatewaySession) -> web.Response:
    headers = {"Location": f"/v1/sessions/{session.id}", "ETag": f'"{session.id}"',
               "Content-Type": SDP_TYPE, "Accept-Patch": TRICKLE_TYPE}
    links = [f'<{url}>; rel="ice-server"'
             for url in request.app[GATEWAYS].node.settings.media.ice_servers]
    if links:
        headers["Link"] = ", ".join(links)
    return web.Response(status=201, text=session.answer, headers=headers)


async def whip_post(request: web.Request) -> web.Response:
    """``POST /v1/whip/{device}``: publish as device ``device`` (RFC 9725)."""
    device = check_name(request.match_info["device"], "device")
    offer = await _read_sdp(request)
    token = bearer(request.headers.get("Authorization", ""))
    session = await request.app[GATEWAYS].publish(device, offer, token)
    return _created(request, session)


async def whep_post(request: web.Request) -> web.Response:
    """``POST /v1/whep/{address}``: watch a device of the tree (``lower-b/cam-2``)."""
    address = check_address(request.match_info["address"], "address")
    offer = await _read_sdp(request)
    session = await request.app[GATEWAYS].watch(address, offer)
    return _created(request, session)


def _session(request: web.Request) -> GatewaySession:
    gateways = request.app[GATEWAYS]
    session = gateways.sessions.get(request.match_info["session"])
    if session is None:
        raise Refused(Code.UNKNOWN_SESSION, f"no WHIP or WHEP session "
                      f"{request.match_info['session'][:64]!r} on {gateways.node.name}",
                      "session")
    auth = gateways.node.settings.auth
    if auth.on and session.kind == "whip":
        # the publisher's own credential (a WHEP session's was checked as the probe's)
        refusal = auth.check(f"device:{session.device}",
                             bearer(request.headers.get("Authorization", "")))
        if refusal is not None:
            raise Refused(Code(refusal[0]), refusal[1] + " (send the publisher's token)")
    return session


async def session_delete(request: web.Request) -> web.Response:
    """``DELETE /v1/sessions/{session}``: end a WHIP or WHEP session."""
    session = _session(request)
    await request.app[GATEWAYS].end(session, "DELETE by its client")
    return web.Response(status=200)


async def session_patch(request: web.Request) -> web.Response:
    """``PATCH /v1/sessions/{session}``: trickle ICE and ICE restarts are not supported (the
    answer carries every candidate): 405, as RFC 9725 allows."""
    _session(request)
    raise Refused(Code.METHOD_NOT_ALLOWED, "this server does not take trickle ICE or ICE "
                  "restarts: the answer carried every candidate")


GATEWAYS = web.AppKey("gateways", Gateways)

#: paths that check their own credential (a WHIP publisher's is a device's), not the probe's
OWN_AUTH_PREFIXES = ("/v1/whip/", "/v1/sessions/")


def setup_gateway_routes(app: web.Application, node: Node) -> None:
    gateways = Gateways(node)
    app[GATEWAYS] = gateways
    app.router.add_post("/v1/whip/{device}", whip_post)
    app.router.add_post("/v1/whep/{address:[^{}]+}", whep_post)
    app.router.add_delete("/v1/sessions/{session}", session_delete)
    app.router.add_patch("/v1/sessions/{session}", session_patch)

    async def close(app: web.Application) -> None:
        await gateways.close()

    app.on_shutdown.append(close)
