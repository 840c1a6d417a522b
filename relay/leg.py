"""A Leg is one peer connection of a call at a server: to a device, or to the next server.

Every leg carries audio and video both ways. What a leg receives is not decoded here: the call's
Bridge (relay/forward.py) takes the packets off its receivers and sends them on the other leg.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiortc import RTCPeerConnection, RTCRtpSender, RTCRtpTransceiver, RTCSessionDescription
from aiortc.rtp import RtcpRrPacket, RtcpSrPacket

from relay.logs import event
from relay.messages import LegHop, Role
from relay.rtc import (
    MediaSettings,
    new_peer_connection,
    prefer_video_codec,
    restrict_host_candidates,
)

log = logging.getLogger("relay.leg")

KINDS = ("audio", "video")
VIDEO_CLOCK = 90000  #: RTP clock rate of every video codec


class Leg:
    """One aiortc peer connection, owned by a call; closed once."""

    def __init__(self, call: str, name: str, media: MediaSettings,
                 on_ready: Callable[[dict[str, RTCRtpTransceiver]], None],
                 on_failed: Callable[[Leg], None]) -> None:
        self.call = call
        self.name = name
        self.media = media
        self._pc: RTCPeerConnection | None = None
        self._closing: asyncio.Task[None] | None = None
        self._on_ready = on_ready
        self._on_failed = on_failed
        self.made_at = time.monotonic()
        self.ice_ms: float | None = None  #: made -> ICE connected
        self.dtls_ms: float | None = None  #: made -> DTLS done
        self.transceivers: dict[str, RTCRtpTransceiver] = {}
        #: the smallest round trip of the video sender's RTCP reports (s): queueing a stalled
        #: peer adds to some reports, not all, so the least is the link's own
        self.rtt_min: float | None = None

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
        self._on_ready(transceivers)
        self._sample_rtt(transceivers["video"].sender)
        restrict_host_candidates(self.pc, self.media.addresses)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def create_answer(self, sdp: str) -> str:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        transceivers = {}
        for transceiver in self.pc.getTransceivers():
            transceiver.direction = "sendrecv"
            transceivers[transceiver.kind] = transceiver
        if set(transceivers) != set(KINDS):
            raise ValueError(f"offer must carry audio and video, not {sorted(transceivers)}")
        self.transceivers = transceivers
        self._on_ready(transceivers)
        self._sample_rtt(transceivers["video"].sender)
        restrict_host_candidates(self.pc, self.media.addresses)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription.sdp

    async def accept_answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    def _sample_rtt(self, sender: RTCRtpSender) -> None:
        """Take each round trip from the RTCP reports answering this sender's (as aiortc
        does, RFC 3550: now - LSR sent - DLSR), keeping the least."""
        original = sender._handle_rtcp_packet

        async def handle(packet: object) -> None:
            if isinstance(packet, RtcpRrPacket | RtcpSrPacket):
                sent = getattr(sender, "_RTCRtpSender__lsr_time", None)
                for report in packet.reports:
                    if report.ssrc == sender._ssrc and report.dlsr and sent is not None and \
                            report.lsr == getattr(sender, "_RTCRtpSender__lsr", None):
                        rtt = time.time() - sent - report.dlsr / 65536
                        if rtt >= 0 and (self.rtt_min is None or rtt < self.rtt_min):
                            self.rtt_min = rtt
            await original(packet)

        sender._handle_rtcp_packet = handle  # type: ignore[method-assign]

    async def _ice_state(self) -> None:
        if self.pc.iceConnectionState == "completed" and self.ice_ms is None:
            self.ice_ms = round((time.monotonic() - self.made_at) * 1000, 3)

    async def _state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and self.dtls_ms is None:
            self.dtls_ms = round((time.monotonic() - self.made_at) * 1000, 3)
        event(log, "leg.state", call=self.call, leg=self.name, state=state)
        if state == "failed" and not self.closed:
            self._on_failed(self)

    def figures(self, toward: Role, peer: str) -> LegHop:
        """The leg's round trip (RTCP, of its video sender), its setup, and what the far end
        reported receiving of its video."""
        rtt_ms = far_lost = far_jitter_ms = None
        video = self.transceivers.get("video")
        if video is not None:
            sender = video.sender
            rtt = getattr(sender, "_RTCRtpSender__rtt", None)
            rtt_ms = round(max(0.0, rtt) * 1000, 3) if rtt is not None else None
            stats = getattr(sender, "_RTCRtpSender__stats", {})
            for stat in list(stats.values()):
                if getattr(stat, "type", None) == "remote-inbound-rtp":
                    far_lost = max(0, stat.packetsLost)
                    far_jitter_ms = round(stat.jitter * 1000 / VIDEO_CLOCK, 3)
        rtt_min_ms = round(self.rtt_min * 1000, 3) if self.rtt_min is not None else None
        return LegHop(toward=toward, peer=peer[:200], rtt_ms=rtt_ms, rtt_min_ms=rtt_min_ms,
                      ice_ms=self.ice_ms,
                      dtls_ms=self.dtls_ms, far_lost=far_lost, far_jitter_ms=far_jitter_ms)

    async def close(self) -> None:
        """Close once, to the end, even if the caller is cancelled while waiting."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._pc.close() if self._pc is not None
                                                  else asyncio.sleep(0))
        await asyncio.shield(self._closing)
