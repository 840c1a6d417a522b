"""A Leg is one peer connection of a call at a server: to a device, or to the next server.

Every leg carries audio and video both ways. What a leg receives is not decoded here: the call's
Bridge (relay/forward.py) makes it a transport of the media graph (rtc/graph.py): what it receives,
producers; what it sends, consumers of the other leg's producers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiortc import RTCPeerConnection, RTCRtpSender, RTCRtpTransceiver, RTCSessionDescription

from rtc.adapter import (
    MediaSettings,
    RtcpDispatcher,
    far_end_reception,
    new_peer_connection,
    prefer_video_codec,
    report_rtt,
    restrict_host_candidates,
    sender_rtt,
)
from wire.logs import event
from wire.messages import LegHop, Role
from wire.tasks import Tasks

log = logging.getLogger("relay.leg")

KINDS = ("audio", "video")
VIDEO_CLOCK = 90000  #: RTP clock rate of every video codec
#: seconds a leg closed by its peer waits for the call's hang-up before failing the call
CLOSED_GRACE_S = 0.75


class Leg:
    """One aiortc peer connection, owned by a call; closed once."""

    def __init__(self, call: str, name: str, media: MediaSettings,
                 on_ready: Callable[[dict[str, RTCRtpTransceiver], RtcpDispatcher], None],
                 on_failed: Callable[[Leg, str], None]) -> None:
        self.call = call
        self.name = name
        self.media = media
        self._pc: RTCPeerConnection | None = None
        self._closing: asyncio.Task[None] | None = None
        #: the leg's own tasks (its closing)
        self.tasks = Tasks(f"leg {name}")
        self._on_ready = on_ready
        self._on_failed = on_failed
        self._failed = False
        self._grace: asyncio.TimerHandle | None = None
        self.made_at = time.monotonic()
        #: when its offer went out, and when the answer to it was applied (this leg offered):
        #: the wait between is the far end's (a device that rings holds the offer until a
        #: person answers), not the leg's setup, and is taken out of ice_ms and dtls_ms
        self.offered_at: float | None = None
        self.answer_ms: float | None = None
        self.ice_ms: float | None = None  #: made -> ICE connected
        self.dtls_ms: float | None = None  #: made -> DTLS done
        self.transceivers: dict[str, RTCRtpTransceiver] = {}
        #: the one place the leg's RTCP feedback is taken (by the call's consumers, and here)
        self.rtcp = RtcpDispatcher()
        #: the smallest round trip of the video sender's RTCP reports (s): queueing a stalled
        #: peer adds to some reports, not all, so the least is the link's own
        self.rtt_min: float | None = None
        #: the offer this leg made, if it made one (an answer is checked against it)
        self.offer_sdp: str | None = None

    @property
    def pc(self) -> RTCPeerConnection:
        """The peer connection, made on first use: its DTLS certificate costs milliseconds,
        which must not sit between a call command and its response."""
        if self._pc is None:
            self._pc = new_peer_connection(self.media)
            self._pc.on("connectionstatechange", self._state)
            self._pc.on("iceconnectionstatechange", self._ice_state)
        return self._pc

    @property
    def closed(self) -> bool:
        return self._closing is not None

    @property
    def connection_state(self) -> str:
        return self._pc.connectionState if self._pc is not None else "new"

    async def create_offer(self, video_codec: str) -> str:
        """Offer audio and video both ways, ``video_codec`` first."""
        transceivers = {kind: self.pc.addTransceiver(kind, direction="sendrecv")
                        for kind in KINDS}
        prefer_video_codec(transceivers["video"], video_codec)
        self.transceivers = transceivers
        self._on_ready(transceivers, self.rtcp)
        self._sample_rtt(transceivers["video"].sender)
        restrict_host_candidates(self.pc, self.media.addresses)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.offer_sdp = self.pc.localDescription.sdp
        self.offered_at = time.monotonic()
        return self.offer_sdp

    async def create_answer(self, sdp: str, directions: dict[str, str] | None = None) -> str:
        """Answer an offer: audio and video both ways; or, with ``directions`` (a WHIP or WHEP
        session's), each kind as given, video required and audio optional."""
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        transceivers = {}
        for transceiver in self.pc.getTransceivers():
            transceiver.direction = (directions or {}).get(transceiver.kind, "sendrecv")
            transceivers[transceiver.kind] = transceiver
        needed = set(KINDS) if directions is None else {"video"}
        if not needed <= set(transceivers):
            raise ValueError(f"offer must carry {' and '.join(sorted(needed))}, not "
                             f"{sorted(transceivers)}")
        self.transceivers = transceivers
        self._on_ready(transceivers, self.rtcp)
        self._sample_rtt(transceivers["video"].sender)
        restrict_host_candidates(self.pc, self.media.addresses)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription.sdp

    async def accept_answer(self, sdp: str) -> None:
        if self.offered_at is not None and self.answer_ms is None:
            self.answer_ms = round((time.monotonic() - self.offered_at) * 1000, 3)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    def _setup_ms(self) -> float:
        """Since the leg was made, the far end's wait for its answer aside."""
        return round((time.monotonic() - self.made_at) * 1000 - (self.answer_ms or 0.0), 3)

    def _sample_rtt(self, sender: RTCRtpSender) -> None:
        """Take each round trip from the RTCP reports answering this sender's (as aiortc
        does, RFC 3550: now - LSR sent - DLSR), keeping the least."""

        def watch(sender: RTCRtpSender, packet: object) -> None:
            rtt = report_rtt(sender, packet, time.time())
            if rtt is not None and (self.rtt_min is None or rtt < self.rtt_min):
                self.rtt_min = rtt

        self.rtcp.watch_reports(sender, watch)

    async def _ice_state(self) -> None:
        if self.pc.iceConnectionState == "completed" and self.ice_ms is None:
            self.ice_ms = self._setup_ms()

    async def _state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and self.dtls_ms is None:
            self.dtls_ms = self._setup_ms()
        event(log, "leg.state", call=self.call, leg=self.name, state=state)
        if self.closed or self._failed:
            return
        if state == "failed":
            ice = self.pc.iceConnectionState
            self._fail("failed: ICE failed" if ice == "failed" else "failed: DTLS")
        elif state == "closed" and self._grace is None:
            # Closed under us: the peer shut DTLS down, or the transport's receive loop ended.
            # A peer that hangs up closes its media too, and that can arrive before its hang-up
            # does (UDP against the signalling's TCP): so the call fails only if it is still up
            # CLOSED_GRACE_S later (our own close, when the call ends, cancels this).
            self._grace = asyncio.get_running_loop().call_later(
                CLOSED_GRACE_S, self._fail, "closed by the peer or its transport")

    def _fail(self, why: str) -> None:
        """No media will flow on this leg: the call must end now, not sit until a timeout."""
        self._grace = None
        if self.closed or self._failed:
            return
        self._failed = True
        event(log, "leg.failed", logging.WARNING, call=self.call, leg=self.name, why=why)
        self._on_failed(self, why)

    def figures(self, toward: Role, peer: str) -> LegHop:
        """The leg's round trip (RTCP, of its video sender), its setup, and what the far end
        reported receiving of its video."""
        rtt_ms = far_lost = far_jitter_ms = None
        video = self.transceivers.get("video")
        if video is not None:
            rtt = sender_rtt(video.sender)
            rtt_ms = round(max(0.0, rtt) * 1000, 3) if rtt is not None else None
            reception = far_end_reception(video.sender)
            if reception is not None:
                far_lost = max(0, reception[0])
                far_jitter_ms = round(reception[1] * 1000 / VIDEO_CLOCK, 3)
        rtt_min_ms = round(self.rtt_min * 1000, 3) if self.rtt_min is not None else None
        return LegHop(toward=toward, peer=peer[:200], rtt_ms=rtt_ms, rtt_min_ms=rtt_min_ms,
                      ice_ms=self.ice_ms, dtls_ms=self.dtls_ms, answer_ms=self.answer_ms,
                      far_lost=far_lost, far_jitter_ms=far_jitter_ms)

    async def close(self) -> None:
        """Close once, to the end, even if the caller is cancelled while waiting."""
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if self._closing is None:
            self._closing = self.tasks.spawn(self._pc.close() if self._pc is not None
                                             else asyncio.sleep(0), f"{self.name}-close")
        await asyncio.shield(self._closing)
