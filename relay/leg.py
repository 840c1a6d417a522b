"""A Leg is one peer connection of a call at a server: to a device, or to the next server.

Every leg carries audio and video both ways. What a leg receives is not decoded here: the call's
Bridge (relay/forward.py) takes the packets off its receivers and sends them on the other leg.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiortc import RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription

from relay.logs import event
from relay.rtc import (
    MediaSettings,
    new_peer_connection,
    prefer_video_codec,
    restrict_host_candidates,
)

log = logging.getLogger("relay.leg")

KINDS = ("audio", "video")


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

    @property
    def pc(self) -> RTCPeerConnection:
        """The peer connection, made on first use: its DTLS certificate costs milliseconds,
        which must not sit between a call command and its response."""
        if self._pc is None:
            self._pc = new_peer_connection(self.media)
            self._pc.on("connectionstatechange", self._state)
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
        self._on_ready(transceivers)
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
        self._on_ready(transceivers)
        restrict_host_candidates(self.pc, self.media.addresses)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription.sdp

    async def accept_answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def _state(self) -> None:
        state = self.pc.connectionState
        event(log, "leg.state", call=self.call, leg=self.name, state=state)
        if state == "failed" and not self.closed:
            self._on_failed(self)

    async def close(self) -> None:
        """Close once, to the end, even if the caller is cancelled while waiting."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._pc.close() if self._pc is not None
                                                  else asyncio.sleep(0))
        await asyncio.shield(self._closing)
