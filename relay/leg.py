"""A Leg is one peer connection of a call at a server: to a device, or to the next server.

Every leg carries audio and video both ways. A server's call joins two legs with a Bridge:
what one leg receives, the other sends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.contrib.media import MediaRelay

from relay.logs import event
from relay.rtc import MediaSettings, new_peer_connection, restrict_host_candidates

log = logging.getLogger("relay.leg")

KINDS = ("audio", "video")


class Leg:
    """One aiortc peer connection, owned by a call; closed once, with a reason."""

    def __init__(self, call: str, name: str, media: MediaSettings,
                 on_track: Callable[[Leg, MediaStreamTrack], None],
                 on_failed: Callable[[Leg], None]) -> None:
        self.call = call
        self.name = name
        self.media = media
        self._pc: RTCPeerConnection | None = None
        self._senders: dict[str, RTCRtpSender] = {}
        self._pending: dict[str, MediaStreamTrack] = {}
        self._closed = False
        self._on_track = on_track
        self._on_failed = on_failed

    @property
    def pc(self) -> RTCPeerConnection:
        """The peer connection, made on first use: its DTLS certificate costs milliseconds,
        which must not sit between a call command and its response."""
        if self._pc is None:
            self._pc = new_peer_connection(self.media)
            self._pc.on("track", self._track)
            self._pc.on("connectionstatechange", self._state)
        return self._pc

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connection_state(self) -> str:
        return self._pc.connectionState if self._pc is not None else "new"

    async def create_offer(self) -> str:
        for kind in KINDS:
            transceiver = self.pc.addTransceiver(kind, direction="sendrecv")
            self._senders[kind] = transceiver.sender
        self._flush()
        restrict_host_candidates(self.pc, self.media.addresses)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def create_answer(self, sdp: str) -> str:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        for transceiver in self.pc.getTransceivers():
            transceiver.direction = "sendrecv"
            self._senders[transceiver.kind] = transceiver.sender
        self._flush()
        restrict_host_candidates(self.pc, self.media.addresses)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription.sdp

    async def accept_answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    def send(self, kind: str, track: MediaStreamTrack) -> None:
        """Send ``track`` on this leg (now, or as soon as the leg has its transceivers)."""
        self._pending[kind] = track
        self._flush()

    def _flush(self) -> None:
        for kind in list(self._pending):
            sender = self._senders.get(kind)
            if sender is not None:
                sender.replaceTrack(self._pending.pop(kind))

    def _track(self, track: MediaStreamTrack) -> None:
        if not self._closed:
            self._on_track(self, track)

    async def _state(self) -> None:
        state = self.pc.connectionState
        event(log, "leg.state", call=self.call, leg=self.name, state=state)
        if state == "failed" and not self._closed:
            self._on_failed(self)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for track in self._pending.values():
            track.stop()
        self._pending.clear()
        if self._pc is not None:
            await self._pc.close()


class FirstFrameWatch(MediaStreamTrack):
    """Passes a track through and calls ``on_first`` when its first frame goes by."""

    def __init__(self, source: MediaStreamTrack, on_first: Callable[[], None]) -> None:
        super().__init__()
        self.kind = source.kind
        self._source = source
        self._on_first: Callable[[], None] | None = on_first

    async def recv(self):
        frame = await self._source.recv()
        if self._on_first is not None:
            on_first, self._on_first = self._on_first, None
            on_first()
        return frame

    def stop(self) -> None:
        super().stop()
        self._source.stop()


class Bridge:
    """Joins two legs of one call: what one receives, the other sends.

    This first version decodes and re-encodes (aiortc's MediaRelay); forwarding encoded media
    without transcoding replaces it.
    """

    def __init__(self, relay: MediaRelay) -> None:
        self._relay = relay

    def connect(self, source: MediaStreamTrack, sink: Leg,
                on_first_frame: Callable[[], None] | None = None) -> None:
        track: MediaStreamTrack = self._relay.subscribe(source, buffered=False)
        if on_first_frame is not None:
            track = FirstFrameWatch(track, on_first_frame)
        sink.send(source.kind, track)

