"""A device: registers with its lower server, answers wake-ups and offers, sends its camera and
microphone (or the synthetic sources), and measures what it receives from the other party."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import typing
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import numpy as np
from aiortc import MediaStreamTrack, RTCRtpTransceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from endpoint import stamp
from endpoint.audiomark import MARK_MIN_BITRATE
from endpoint.bitrate import (
    DEFAULT_START,
    EncoderTarget,
    follow_remb,
    set_audio_bitrate,
    set_start_bitrate,
)
from endpoint.capture import (
    CaptureError,
    RtspTrack,
    StampedTrack,
    VideoSpec,
    open_audio,
    open_video,
)
from endpoint.meter import AudioMeter, PartMeter, SendLog, VideoMeter
from endpoint.packets import IdleTrack, PacketCounter, PacketLoop, PacketSender
from endpoint.playout import PlayoutBuffer
from endpoint.recovery import StallGuard
from endpoint.sources import EncodedLoop, PreEncodedVideoTrack, SyntheticVideoTrack, ToneTrack
from endpoint.view import Recorder, Viewer, ViewError
from rtc.adapter import (
    DatagramTap,
    MarkedFrameBuffer,
    MediaSettings,
    NextFrame,
    RtcpDispatcher,
    RtpHandler,
    new_peer_connection,
    prefer_video_codec,
    remote_ssrcs,
    replace_jitter_buffer,
    restrict_host_candidates,
    send_pli,
    timestamp_mapper,
    timestamp_origin,
    wrap_encoded_frames,
    wrap_rtp_handler,
)
from wire.auth import token_for
from wire.config import parent_url
from wire.links import WebSocketChannel, receive
from wire.logs import event
from wire.messages import (
    SERVER_TO_DEVICE,
    VIDEO_CODECS,
    WS_MAX_MSG_SIZE,
    Answer,
    AnswerMode,
    DevicePart,
    Dial,
    Dialed,
    Error,
    FirstFrame,
    Hangup,
    Heartbeat,
    MediaMode,
    Message,
    Offer,
    Pickup,
    PlaceCall,
    Register,
    Registered,
    Role,
    Script,
    Stats,
    Wake,
    Woken,
)
from wire.states import (
    PHONE_TRANSITIONS,
    LocalProtocolError,
    PhoneEvent,
    PhoneState,
    RemoteProtocolError,
)
from wire.tasks import Tasks

log = logging.getLogger("endpoint.device")


VIDEO_MODES = ("synthetic", "preencoded", "packets")


def set_audio_buffer(receiver: Any, frames: int) -> None:
    """Hold ``frames`` audio frames before playing one, and wait no longer than that for a
    lost packet (endpoint/playout.py). aiortc's receiver holds 4, 80 ms of audio behind a video
    that it holds one frame (rtc/adapter.py MarkedFrameBuffer: none here): lips would lag
    the voice by 40-75 ms on a clean LAN. One (20 ms) still puts two swapped packets back in
    order; a path with more jitter wants more (libwebrtc's NetEq adapts its target to it)."""
    replace_jitter_buffer(receiver, PlayoutBuffer(frames))


@dataclass(frozen=True)
class DeviceSettings:
    """How one endpoint process's devices capture and report."""

    width: int = 640
    height: int = 480
    fps: float = 30.0
    audio: bool = True
    #: "synthetic" (drawn and encoded live), "preencoded" (a VP8 loop encoded once per process,
    #: received decoded), "packets" (the same loop sent as ready RTP packets and received
    #: without decoding: see endpoint/packets.py), or a capture source (endpoint/capture.py):
    #: "v4l2:/dev/video0[:WxH@FPS]", "opencv:0", "file:PATH", "lavfi:GRAPH"
    video: str = "synthetic"
    #: with a capture source: draw the stamp into its frames (latency stays measurable)
    stamp: bool = False
    #: "tone", or a capture source: "alsa:DEVICE", "file:PATH" (``audio=False``: none)
    audio_source: str = "tone"
    #: show the other party in a window, with live figures (needs a display and opencv-python)
    show: bool = False
    #: record the received video: a directory (one file per call) or a file path
    record: str | None = None
    #: this device's credential when its server has auth on (else signed with
    #: VPHONE_AUTH_SECRET from the environment, if set; see wire/auth.py)
    token: str | None = None
    bitrate: int = 1_000_000  #: for the pre-encoded loop
    #: packet mode: the most bytes of an RTP video payload (None: aiortc's packetizer's 1,300)
    rtp_payload: int | None = None
    #: video codecs this device takes, in its order of preference
    codecs: tuple[str, ...] = VIDEO_CODECS
    media: MediaSettings = field(default_factory=MediaSettings)
    stats_interval_s: float = 1.0
    heartbeat_s: float = 2.0
    #: the least bitrate a live encoder is set to when the path reports less (endpoint/bitrate.py;
    #: aiortc's own floor is 250 kbit/s for VP8)
    min_bitrate: int = 100_000
    #: what a live encoder sends before the path reports anything (aiortc's own: 500 kbit/s)
    start_bitrate: int = DEFAULT_START
    #: Opus bitrate (aiortc's own is 96 kbit/s; 32 is WebRTC's usual for speech)
    audio_bitrate: int = 32_000
    #: audio frames (20 ms) the receiver holds before playing the first: see set_audio_buffer
    audio_buffer_frames: int = 1
    #: stamp and mark what is sent, read back and score what is received (off: frames and
    #: audio are only counted; benchmarks/measuring.py prints what measuring costs)
    measure: bool = True
    #: as the callee: "auto" answers as it wakes (synthetic devices, the probe's); "ring" rings
    #: until ``Device.pickup`` or ``Device.decline`` (or the server's ring timeout: no_answer);
    #: "decline" declines every call
    answer: AnswerMode = "auto"

    @property
    def video_codecs(self) -> tuple[str, ...]:
        """What the device tells its server it takes (a VP8 loop can only be VP8; an RTSP
        camera would rather send its own H.264 than be decoded and encoded again)."""
        if self.video in ("preencoded", "packets"):
            return ("video/VP8",)
        if self.video.startswith(("rtsp://", "rtsps://")) and "video/H264" in self.codecs \
                and not self.stamp:
            return ("video/H264", *(c for c in self.codecs if c != "video/H264"))
        return self.codecs

    @property
    def capture(self) -> VideoSpec | None:
        """The capture source, when the video is one (not a synthetic mode)."""
        return None if self.video in VIDEO_MODES else VideoSpec.parse(self.video)

    def __post_init__(self) -> None:
        stamp.block_size(self.width)
        if self.video not in VIDEO_MODES:
            try:
                VideoSpec.parse(self.video)
            except CaptureError as exc:
                raise ValueError(f"video must be one of {', '.join(VIDEO_MODES)} or a capture "
                                 f"source: {exc}") from None
        if not 1 <= self.fps <= 120:
            raise ValueError("fps must be between 1 and 120")
        if self.answer not in typing.get_args(AnswerMode):
            raise ValueError(f"answer must be one of {', '.join(typing.get_args(AnswerMode))}")


def offered_kinds(sdp: str) -> list[str]:
    """The media kinds of an offer's audio/video m-lines, in order, each once."""
    kinds: list[str] = []
    for line in sdp.splitlines():
        if line.startswith("m="):
            kind = line[2:].split(" ", 1)[0]
            if kind in ("audio", "video") and kind not in kinds:
                kinds.append(kind)
    return kinds


def offered_video_codec(sdp: str, accepted: tuple[str, ...]) -> str | None:
    """The video codec a call will carry: the offer's first (its order decides, the answerer
    takes it) that ``accepted`` holds, as ``video/NAME``; None when there is none."""
    order: list[str] = []
    names: dict[str, str] = {}
    in_video = False
    for line in sdp.splitlines():
        if line.startswith("m="):
            fields = line[2:].split()
            in_video = fields[0] == "video"
            if in_video:
                order = fields[3:]
        elif in_video and line.startswith("a=rtpmap:"):
            pt, _, rest = line[len("a=rtpmap:"):].partition(" ")
            names[pt] = "video/" + rest.split("/", 1)[0]
    wanted = {c.lower(): c for c in accepted}
    for pt in order:
        found = wanted.get(names.get(pt, "").lower())
        if found:
            return found
    return None


@dataclass
class MediaSupply:
    """What a process's devices share: the pre-encoded loop (encoded once, and packetized once
    for packet mode) and the send log."""

    loop: EncodedLoop | None = None
    send_log: SendLog = field(default_factory=SendLog)
    packets: PacketLoop | None = None

    @classmethod
    def for_settings(cls, settings: DeviceSettings) -> MediaSupply:
        if settings.video not in ("preencoded", "packets"):
            return cls()
        loop = EncodedLoop.encode(settings.width, settings.height, settings.fps,
                                  bitrate=settings.bitrate)
        return cls(loop, packets=PacketLoop.from_loop(loop, settings.rtp_payload)
                   if settings.video == "packets" else None)


class DeviceCall:
    """One call at a device: its peer connection, sources, meters and reporting task.

    ``channel`` is the device's server link (None for a direct call between two devices).
    """

    def __init__(self, call: str, role: Role, peer: str, settings: DeviceSettings,
                 channel: WebSocketChannel | None, clock: Callable[[], float],
                 address: str = "", supply: MediaSupply | None = None,
                 on_first_frame: Callable[[], None] | None = None) -> None:
        self.call, self.role, self.peer = call, role, peer
        self.on_first_frame = on_first_frame
        self.address = address
        self.settings = settings
        self.supply = supply or MediaSupply()
        self.channel = channel
        self.clock = clock
        self.pc = new_peer_connection(settings.media)
        #: the one place the call's RTCP feedback for its senders is taken
        self.rtcp = RtcpDispatcher()
        self.video = VideoMeter()
        self.audio = AudioMeter()
        #: this device's own part of the video it sends: captured -> last packet sent
        self.sender_part = PartMeter()
        #: a live encoder's target, following the path's REMB (None: the source cannot adapt)
        self.bitrate: EncoderTarget | None = None
        #: the video receiver's way out of a packet lost for good (decoded video only)
        self.stall_guard: StallGuard | None = None
        self._pts_origin: Any = None  #: aiortc's TimestampMapper of the video receiver
        #: the call's own tasks (reporting, receiving, sending), and its closing's
        self.tasks = Tasks(f"call {call}")
        self._closer = Tasks(f"call {call} closing")
        self.sources: list[MediaStreamTrack] = []
        #: packet mode: what sends and what counts, per kind
        self.senders: list[PacketSender] = []
        self.counters: dict[str, PacketCounter] = {}
        self._closing: asyncio.Task[None] | None = None
        self.pc.on("track", self._track)

    @property
    def closed(self) -> bool:
        return self._closing is not None

    def spawn(self, coro: Any) -> None:
        self.tasks.spawn(coro)

    def _add_transceivers(self, kinds: list[str], codec: str | None = None) -> None:
        """``codec``: the video codec the offer makes the call carry (None: not known)."""
        if self.settings.video == "packets":
            self._add_packet_transceivers(kinds)
            return
        for kind in kinds:
            if kind == "video":
                video = self._video_source(codec)
                self.sources.append(video)
                transceiver = self.pc.addTransceiver(video, direction="sendrecv")
                self._time_parts(transceiver, video)
                if isinstance(video, RtspTrack) and video.passthrough:
                    # the camera's own H.264, packetized as it comes: nothing here adapts it
                    prefer_video_codec(transceiver, "video/H264", only=True)
                    event(log, "device.passthrough", call=self.call, device=self.address,
                          source="rtsp", codec="video/H264")
                elif not isinstance(video, PreEncodedVideoTrack):  # a live encoder adapts
                    self.bitrate = EncoderTarget(floor=self.settings.min_bitrate,
                                                 target=self.settings.start_bitrate)
                    set_start_bitrate(transceiver.sender, self.settings.start_bitrate)
                    follow_remb(self.rtcp, transceiver.sender, self.bitrate)
                if isinstance(video, PreEncodedVideoTrack):
                    self.rtcp.on(transceiver.sender, keyframe=video.request_keyframe)
                    prefer_video_codec(transceiver, "video/VP8", only=True)
                elif len(self.settings.codecs) == 1:
                    # Restrict only: preferences on an answerer reorder its own codecs, and
                    # both ends of the leg would no longer send the same one. The device's order
                    # was given at registration; the server's offer already follows it.
                    prefer_video_codec(transceiver, self.settings.codecs[0], only=True)
            elif self.settings.audio:
                audio = (ToneTrack(880.0 if self.role == "callee" else 440.0,
                                   marks=self.settings.measure
                                   and self.settings.audio_bitrate >= MARK_MIN_BITRATE,
                                   clock=self.clock)
                         if self.settings.audio_source == "tone"
                         else open_audio(self.settings.audio_source))
                self.sources.append(audio)
                transceiver = self.pc.addTransceiver(audio, direction="sendrecv")
                set_audio_bitrate(transceiver.sender, self.settings.audio_bitrate)
                set_audio_buffer(transceiver.receiver, self.settings.audio_buffer_frames)
            else:
                transceiver = self.pc.addTransceiver("audio", direction="recvonly")
                set_audio_buffer(transceiver.receiver, self.settings.audio_buffer_frames)

    def _time_parts(self, transceiver: RTCRtpTransceiver, video: MediaStreamTrack) -> None:
        """Time this device's own parts of the video latency: as a sender, from a frame's
        capture to its last packet sent (the sender asks for the next frame right after
        sending the last packet of one); as a receiver, from a frame's first packet in to its
        decoding. Both keyed by the frame's RTP timestamp (its pts: 90 kHz both sides). A
        pre-encoded source's frame starts at its logged send time; a camera's is not known."""
        if isinstance(video, SyntheticVideoTrack | PreEncodedVideoTrack):
            part = self.sender_part
            video.on_captured = part.begin
            pending: list[int] = []

            def timed(next_frame: NextFrame) -> NextFrame:
                async def timed_next(codec: Any) -> Any:
                    if pending:
                        part.end(pending.pop(), self.clock())
                    frame = await next_frame(codec)
                    if frame is not None:
                        pending.append(frame.timestamp)
                    return frame

                return timed_next

            wrap_encoded_frames(transceiver.sender, timed)
        receiver = transceiver.receiver
        replace_jitter_buffer(receiver, MarkedFrameBuffer())  # before StallGuard's look
        arrived = self.video.receiver
        # aiortc rebases the decoded frames' pts on the first frame's RTP timestamp
        self._pts_origin = timestamp_mapper(receiver)

        guard = self.stall_guard = StallGuard(
            receiver, lambda ssrc: self.spawn(send_pli(receiver, ssrc)))

        def timing(handle: RtpHandler) -> RtpHandler:
            async def timed_handle(packet: Any, arrival_time_ms: int) -> None:
                # (aiortc's arrival_time_ms counts from 1900, and in whole ms: the clock here)
                now = self.clock()
                arrived.begin(packet.timestamp, now)
                await handle(packet, arrival_time_ms)
                guard.after(packet, now)

            return timed_handle

        wrap_rtp_handler(receiver, timing)

    def _add_packet_transceivers(self, kinds: list[str]) -> None:
        packets = self.supply.packets
        assert packets is not None, "packet mode needs a MediaSupply with a PacketLoop"
        for kind in kinds:
            if kind == "audio" and not self.settings.audio:
                self.pc.addTransceiver("audio", direction="recvonly")
                continue
            track = IdleTrack(kind)
            self.sources.append(track)
            transceiver = self.pc.addTransceiver(track, direction="sendrecv")
            if kind == "video":
                prefer_video_codec(transceiver, "video/VP8", only=True)
                self.senders.append(PacketSender(
                    transceiver, kind, packets, self.rtcp,
                    functools.partial(self.supply.send_log.sent, self.address), self.clock,
                    part=self.sender_part))
            else:
                self.senders.append(PacketSender(transceiver, kind, packets, self.rtcp))

    def _start_packets(self) -> None:
        """Packet mode, once both descriptions are set: send, and count what arrives."""
        if self.settings.video != "packets" or self.closed:
            return
        assert self.supply.packets is not None
        for sender in self.senders:
            self.spawn(sender.run())
        transceivers = self.pc.getTransceivers()
        if not transceivers:
            return
        tap = DatagramTap(transceivers[0])  # one bundled transport
        for kind, ssrc in remote_ssrcs(self.pc).items():
            counter = PacketCounter(kind, self.video, self.audio, len(self.supply.packets.frames),
                                    self.supply.send_log, self.peer, self._first_frame,
                                    self.clock, arrival=tap.kernel_arrival)
            self.counters[kind] = counter
            tap.route(ssrc, counter.on_datagram)

    def _first_frame(self, now: float) -> None:
        event(log, "media.first_frame", call=self.call, role=self.role, peer=self.peer)
        if self.on_first_frame is not None:
            self.on_first_frame()
        if self.channel is not None:
            self.spawn(self.channel.send(FirstFrame(call=self.call, at=now)))

    def _video_source(self, codec: str | None = None) -> MediaStreamTrack:
        if self.settings.video == "preencoded":
            assert self.supply.loop is not None, "pre-encoded video needs a MediaSupply loop"
            log, address = self.supply.send_log, self.address
            return PreEncodedVideoTrack(self.supply.loop,
                                        lambda k, n, at: log.sent(address, k, n, at))
        capture = self.settings.capture
        if capture is not None:
            # an RTSP camera's H.264 goes out as it came when the call carries H.264 (and
            # nothing is drawn into it)
            passthrough = (capture.kind == "rtsp" and codec == "video/H264"
                           and not self.settings.stamp)
            track = open_video(capture, self.settings.width, self.settings.height,
                               self.settings.fps, passthrough=passthrough)
            return StampedTrack(track, self.clock) if self.settings.stamp else track
        track = SyntheticVideoTrack(self.settings.width, self.settings.height, self.settings.fps)
        track.picture.stamped = self.settings.measure
        return track

    async def answer(self, offer: Offer) -> str:
        # Transceivers first: codec preferences only count before setRemoteDescription. They
        # are made in the offer's m-line order (aiortc bundles wrongly otherwise).
        self._add_transceivers(offered_kinds(offer.sdp),
                               offered_video_codec(offer.sdp, self.settings.video_codecs))
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer"))
        restrict_host_candidates(self.pc, self.settings.media.addresses)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        self._start_packets()
        self.spawn(self._report())
        return self.pc.localDescription.sdp

    async def offer(self) -> str:
        """Offer a call straight to another device (no server between: a baseline)."""
        self._add_transceivers(["audio", "video"])
        restrict_host_candidates(self.pc, self.settings.media.addresses)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def accept(self, answer_sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))
        self._start_packets()

    def _track(self, track: MediaStreamTrack) -> None:
        # (packet mode counts packets off the socket: aiortc's tracks never see them)
        if not self.closed and self.settings.video != "packets":
            self.spawn(self._consume_video(track) if track.kind == "video"
                       else self._consume_audio(track))

    def _outputs(self) -> tuple[Viewer | None, Recorder | None]:
        viewer = recorder = None
        if self.settings.show:
            try:
                viewer = Viewer(f"{self.address or self.call} <- {self.peer}")
            except ViewError as exc:
                event(log, "device.no_window", logging.WARNING, call=self.call, reason=str(exc))
        if self.settings.record:
            path = Path(self.settings.record)
            if path.suffix not in (".mp4", ".mkv", ".webm"):
                path = path / f"{self.call}-{self.role}.mp4"
            recorder = Recorder(path, self.settings.fps)
            event(log, "device.recording", call=self.call, path=str(path))
        return viewer, recorder

    async def _consume_video(self, track: MediaStreamTrack) -> None:
        viewer, recorder = self._outputs()
        try:
            await self._receive_video(track, viewer, recorder)
        finally:
            if viewer is not None:
                viewer.close()
            if recorder is not None:
                recorder.close()
                event(log, "device.recorded", call=self.call, path=str(recorder.path),
                      frames=recorder.frames)

    async def _receive_video(self, track: MediaStreamTrack, viewer: Viewer | None,
                             recorder: Recorder | None) -> None:
        send_log = self.supply.send_log
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                now = self.clock()
                mapper = self._pts_origin
                origin = timestamp_origin(mapper) if mapper is not None else None
                if frame.pts is not None and origin is not None:
                    self.video.receiver.end((frame.pts + origin) & 0xFFFFFFFF, now)
                if recorder is not None:
                    recorder.write(frame, now)
                if viewer is not None:
                    viewer.show(frame, lambda now=now: self.video.stats(now))
                if not self.settings.measure:
                    if self.video.frame(None, now):
                        self._first_frame(now)
                    continue
                plane = frame.planes[0]
                luma = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)
                found = stamp.read(luma[:, : frame.width])
                self.video.quality.frame(luma[:, : frame.width], found)
                if found is not None and send_log.knows(self.peer):
                    # a pre-encoded peer in this process: its stamps are loop indexes
                    found = send_log.lookup(self.peer, found.counter)
                if self.video.frame(found, now):
                    self._first_frame(now)

    async def _consume_audio(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                if not self.settings.measure:
                    self.audio.frames += 1
                    continue
                mark = self.audio.frame(frame.to_ndarray(), self.clock(), frame.pts,
                                        channels=len(frame.layout.channels),
                                        rate=frame.sample_rate)
                if mark is not None:
                    self.audio.pair(self.video)

    def stats(self) -> Stats:
        return Stats(call=self.call, media=self.video.stats(self.clock(), self.audio,
                                                            window=True),
                     sender=self.sender())

    def sender(self) -> DevicePart:
        """This device's own part of the video it sends, and whether and how it adapts."""
        part = self.sender_part.part() or DevicePart()
        rate = self.bitrate
        if rate is None:
            return msgspec.structs.replace(part, adapts=False)
        return msgspec.structs.replace(
            part, adapts=True, target_kbps=rate.target / 1000, restarts=rate.changes,
            reported_kbps=rate.reported / 1000 if rate.reported is not None else None)

    async def _report(self) -> None:
        while self.channel is not None:
            await asyncio.sleep(self.settings.stats_interval_s)
            if self.video.first_at is not None:
                await self.channel.send(self.stats())

    async def close(self) -> None:
        """Close once, to the end: the work runs as its own task, so a caller cancelled while
        waiting cannot leave the peer connection (and aiortc's decoder threads) half closed."""
        if self._closing is None:
            self._closing = self._closer.spawn(self._close(), f"{self.call}-close")
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        await self.tasks.close()
        for source in self.sources:
            source.stop()
        await self.pc.close()


class DialError(Exception):
    """The server refused a dial: ``code`` is the refusal's (as ``POST /v1/calls`` gives it)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class CallEnd:
    """How one of this device's calls ended, and what this device received in it."""

    call: str
    reason: str
    #: this device's final figures for what it received (None: media never started here)
    stats: Stats | None
    #: who ended it: "local" (this device hung up or declined) or "remote"
    by: str


#: how many ended calls a device remembers for ``Device.ended``
ENDED_KEPT = 64


class NotInCall(LocalProtocolError, KeyError):
    """A person's action that the call's state does not allow here (a pickup of a call that
    does not ring, a hang-up of a call this device is not in)."""


@dataclass
class Phone:
    """One call at this device: where it stands in the table (wire/states.py
    PHONE_TRANSITIONS), the wake-up that started it, the offer it holds while it rings, and
    its media once it answered the offer."""

    wake: Wake
    state: PhoneState = PhoneState.NEW
    offer: Offer | None = None
    media: DeviceCall | None = None

    def handle(self, what: PhoneEvent) -> PhoneState:
        """Move by the table; an event it does not take raises RemoteProtocolError (the
        server's message) and changes nothing. The caller turns a person's misuse into
        NotInCall."""
        after = PHONE_TRANSITIONS[self.state].get(what)
        if after is None:
            raise RemoteProtocolError(f"{what.value} is not taken by a call in state "
                                      f"{self.state.value}")
        self.state = after
        return after


class Device:
    """One device, kept registered with its server (reconnecting with backoff). Besides
    answering, it can ``dial`` another address, and (``answer="ring"``) ``pickup`` or
    ``decline`` a call that rings it, and ``hangup`` any call it is in."""

    def __init__(self, server: str, device_id: str, settings: DeviceSettings,
                 clock: Callable[[], float] = time.time, supply: MediaSupply | None = None,
                 on_ring: Callable[[Wake], None] | None = None) -> None:
        self.url = parent_url(server, "/v1/device")
        self.id = device_id
        self.settings = settings
        self.supply = supply or MediaSupply.for_settings(settings)
        self.clock = clock
        #: this device's calls that have not ended, each with its place in the table
        self.phones: dict[str, Phone] = {}
        #: its own tasks: heartbeats, and what a call's script does when (ring, hang up)
        self.tasks = Tasks(f"device {device_id}")
        #: called when a call starts ringing here (answer="ring")
        self.on_ring = on_ring
        self.registered = asyncio.Event()
        #: why the device is not registered now, in words (None: registered, or not tried)
        self.waiting_for: str | None = None
        self.address: str | None = None
        #: the last heartbeat the server echoed
        self.last_heartbeat: int | None = None
        self.channel: WebSocketChannel | None = None
        self._dial_seq = 0
        self._dials: OrderedDict[int, asyncio.Future[str]] = OrderedDict()
        self._ends: dict[str, asyncio.Future[CallEnd]] = {}
        #: the calls that ended here, newest last (at most ENDED_KEPT)
        self.ended: OrderedDict[str, CallEnd] = OrderedDict()

    @property
    def calls(self) -> dict[str, DeviceCall]:
        """The calls whose media is up or connecting here."""
        return {c: p.media for c, p in self.phones.items() if p.media is not None}

    @property
    def ringing(self) -> dict[str, Wake]:
        """The calls ringing here (answer="ring"): a person picks up or declines."""
        return {c: p.wake for c, p in self.phones.items() if p.state is PhoneState.RINGING}

    def _person(self, call_id: str, what: PhoneEvent) -> Phone:
        """The call a person acts on, moved by ``what``; NotInCall if the table refuses."""
        phone = self.phones.get(call_id)
        if phone is None:
            raise NotInCall(f"{self.id} is in no call {call_id!r}")
        try:
            phone.handle(what)
        except RemoteProtocolError as exc:
            raise NotInCall(f"{self.id}, call {call_id}: {exc.message}") from None
        return phone

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Stay registered: connect, register, serve; on any failure say what it is waiting
        for (``waiting_for``; logged when it changes) and retry with backoff."""
        backoff = 0.2
        while True:
            try:
                async with session.ws_connect(self.url, heartbeat=self.settings.heartbeat_s,
                                              max_msg_size=WS_MAX_MSG_SIZE) as ws:
                    channel = WebSocketChannel(ws, "server")
                    await channel.send(Register(device=self.id,
                                                token=token_for(f"device:{self.id}",
                                                                self.settings.token),
                                                codecs=list(self.settings.video_codecs)))
                    async with asyncio.timeout(10):
                        reply = await receive(ws, SERVER_TO_DEVICE, "server")
                    if not isinstance(reply, Registered):
                        reason = (f"{reply.code}: {reply.message}" if isinstance(reply, Error)
                                  else "the server closed the link without a reply")
                        raise ConnectionError(f"the server refused the registration ({reason})")
                    self.address = reply.address
                    self.channel = channel
                    self.registered.set()
                    self.waiting_for = None
                    backoff = 0.2
                    event(log, "device.registered", device=self.id, address=reply.address)
                    beat = self.tasks.spawn(self._heartbeat(channel), f"{self.id}-heartbeat")
                    try:
                        await self._serve(channel)
                    finally:
                        beat.cancel()
                        self.channel = None
                        self.registered.clear()
                        await self._end_all("device_gone")
                        event(log, "device.disconnected", logging.WARNING, device=self.id)
            except (aiohttp.ClientError, ConnectionError, OSError, TimeoutError) as exc:
                self._waiting(exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    # ------------------------------------------------------------------ what a person does

    async def dial(self, callee: str, media_mode: MediaMode = "full",
                   timeout_s: float = 10.0, script: Script | None = None,
                   ref: int | None = None) -> str:
        """Start a call from this device to ``callee`` (an address anywhere in the tree):
        its call id. Raises DialError with the server's refusal code (as ``POST /v1/calls``
        would give it), ConnectionError when not registered, TimeoutError without a reply."""
        channel = self.channel
        if channel is None:
            raise ConnectionError(f"{self.id} is not registered: {self.waiting_for or 'not yet'}")
        self._dial_seq += 1
        seq = self._dial_seq
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._dials[seq] = future
        try:
            if not await channel.send(Dial(callee=callee, media_mode=media_mode, seq=seq,
                                           script=script, ref=ref)):
                raise ConnectionError(f"{self.id} lost its server link while dialing")
            async with asyncio.timeout(timeout_s):
                call = await future
        finally:
            self._dials.pop(seq, None)
        event(log, "device.dialed", call=call, device=self.id, callee=callee)
        return call

    async def pickup(self, call_id: str) -> None:
        """Answer a call that rings here (``answer="ring"``). NotInCall if it does not."""
        channel = self.channel
        if channel is None:
            raise NotInCall(f"{self.id} is not registered: no call rings on it")
        phone = self._person(call_id, PhoneEvent.PICKUP)
        await channel.send(Pickup(call=call_id, at=self.clock()))
        event(log, "device.answered", call=call_id, device=self.id, peer=phone.wake.peer)
        offer, phone.offer = phone.offer, None
        if offer is not None:
            await self._answer(channel, offer)

    async def decline(self, call_id: str) -> None:
        """Turn down a call that rings here: it ends with reason ``declined``."""
        self._person(call_id, PhoneEvent.DECLINE)
        await self._hang_up(call_id, "declined")

    async def hangup(self, call_id: str) -> CallEnd:
        """End a call this device is in (ringing, being set up or up): how it ended."""
        self._person(call_id, PhoneEvent.HANGUP)
        return await self._hang_up(call_id, "hangup")

    async def wait_end(self, call_id: str, timeout_s: float | None = None) -> CallEnd:
        """Wait until a call of this device ends (at once if it has)."""
        if call_id in self.ended:
            return self.ended[call_id]
        future = self._ends.setdefault(call_id, asyncio.get_running_loop().create_future())
        async with asyncio.timeout(timeout_s):
            return await asyncio.shield(future)

    async def _hang_up(self, call_id: str, reason: str) -> CallEnd:
        channel = self.channel
        final = await self._finish(call_id, reason, "local")
        if channel is not None:
            if final.stats is not None and final.stats.media.frames:
                await channel.send(final.stats)  # the last figures, while the call is up
            await channel.send(Hangup(call=call_id, reason=reason))  # type: ignore[arg-type]
        return final

    async def _finish(self, call_id: str, reason: str, by: str) -> CallEnd:
        """Close what this device has of a call and remember how it ended."""
        phone = self.phones.pop(call_id, None)
        if phone is not None:
            phone.state = PhoneState.ENDED  # (HANGUP, DECLINE or LOST: the table's end)
        call = phone.media if phone is not None else None
        stats = None
        if call is not None:
            stats = call.stats()
            await call.close()
        end = CallEnd(call=call_id, reason=reason, stats=stats, by=by)
        self.ended[call_id] = end
        while len(self.ended) > ENDED_KEPT:
            self.ended.popitem(last=False)
        future = self._ends.pop(call_id, None)
        if future is not None and not future.done():
            future.set_result(end)
        event(log, "device.call_ended", call=call_id, device=self.id, reason=reason, by=by,
              frames=stats.media.frames if stats else None,
              latency_ms_p50=stats.media.latency_ms_p50 if stats else None)
        return end

    # ------------------------------------------------------------------ the server link

    def _waiting(self, exc: BaseException, retry_s: float) -> None:
        """What the device waits for, in words a person can act on; logged once per change."""
        if isinstance(exc, aiohttp.WSServerHandshakeError) and exc.status in (404, 405):
            what = (f"{self.url} has no device route (HTTP {exc.status}): is --server a lower "
                    "server? (an upper server takes no devices)")
        elif isinstance(exc, aiohttp.WSServerHandshakeError):
            what = f"{self.url} refused the WebSocket (HTTP {exc.status}: {exc.message})"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            what = f"nothing answers at {self.url} ({exc.os_error.strerror or exc}): is the " \
                   "server up?"
        elif isinstance(exc, TimeoutError):
            what = f"{self.url} did not answer the registration within 10 s"
        else:
            what = str(exc) or repr(exc)
        if what != self.waiting_for:
            event(log, "device.waiting", logging.WARNING, device=self.id, url=self.url,
                  waiting_for=what, retry_s=retry_s)
        self.waiting_for = what

    async def _heartbeat(self, channel: WebSocketChannel) -> None:
        """An application-level heartbeat, answered by the server with the same ``seq``."""
        seq = 0
        while await channel.send(Heartbeat(seq=seq)):
            seq += 1
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _serve(self, channel: WebSocketChannel) -> None:
        while True:
            message = await receive(channel.ws, SERVER_TO_DEVICE, "server")
            if message is None:
                return
            await self._handle(channel, message)

    async def _refuse(self, channel: WebSocketChannel, message: Message, code: str,
                      text: str) -> None:
        """The server sent what this device's calls cannot take: tell it, change nothing."""
        call = getattr(message, "call", None)
        event(log, "device.refused", logging.WARNING, device=self.id, call=call, code=code,
              reason=text, ref=message.TYPE)
        await channel.send(Error(code=code, message=text, call=call, ref=message.TYPE))  # type: ignore[arg-type]

    async def _handle(self, channel: WebSocketChannel, message: Message) -> None:
        if isinstance(message, Wake):
            if message.call in self.phones:
                await self._refuse(channel, message, "duplicate_call",
                                   f"call {message.call} already woke this device")
                return
            await self._wake(channel, message)
        elif isinstance(message, Offer):
            phone = self.phones.get(message.call)
            if phone is None:
                await self._refuse(channel, message, "unknown_call", "offer without wake-up")
                return
            try:
                phone.handle(PhoneEvent.OFFER)
            except RemoteProtocolError as exc:
                await self._refuse(channel, message, exc.code, exc.message)
                return
            if phone.state is PhoneState.RINGING:
                phone.offer = message  # answered at pickup
            else:
                await self._answer(channel, message)
        elif isinstance(message, PlaceCall):
            if self.settings.answer != "auto":  # a person's phone: a person dials
                await self._refuse(channel, message, "protocol_error",
                                   f"{self.id} rings for a person (--answer "
                                   f"{self.settings.answer}): it dials only when a person does")
                return
            self.tasks.spawn(self._place(message), f"place-{message.ref}")
        elif isinstance(message, Dialed):
            future = self._dials.get(message.seq)
            if future is not None and not future.done():
                future.set_result(message.call)
        elif isinstance(message, Hangup):
            if message.call in self.phones:
                end = await self._finish(message.call, message.reason, "remote")
                if end.stats is not None:
                    await channel.send(end.stats)
        elif isinstance(message, Heartbeat):
            self.last_heartbeat = message.seq
        elif isinstance(message, Error):
            event(log, "device.server_error", logging.WARNING, device=self.id,
                  code=message.code, reason=message.message, call=message.call)
            if message.ref == Dial.TYPE and self._dials:
                # dials are answered in order: this refusal is the oldest one waiting
                future = next((f for f in self._dials.values() if not f.done()), None)
                if future is not None:
                    future.set_exception(DialError(message.code, message.message))

    async def _wake(self, channel: WebSocketChannel, wake: Wake) -> None:
        mode = self.settings.answer if wake.role == "callee" else "auto"
        # a call's script (a load's scenario) steers a device that answers by itself; a
        # person's phone (answer="ring") rings for the person
        script = wake.script if self.settings.answer == "auto" else None
        scripted_ring = (script is not None and wake.role == "callee"
                         and (script.ring_s > 0 or script.decline))
        phone = self.phones[wake.call] = Phone(wake)
        # a device that declines rings too (for no time): it never answers
        rings = mode != "auto" or scripted_ring
        phone.handle(PhoneEvent.WAKE_RINGING if rings else PhoneEvent.WAKE)
        await channel.send(Woken(call=wake.call, at=self.clock(), ringing=rings))
        event(log, "device.woken", call=wake.call, device=self.id, role=wake.role,
              peer=wake.peer, answer=mode, script=script.to_dict() if script else None)
        if mode == "decline":
            await self._hang_up(wake.call, "declined")
        elif mode == "ring" and self.on_ring is not None:
            self.on_ring(wake)
        elif scripted_ring and script is not None:
            self.tasks.spawn(self._ring_out(wake.call, script), f"{wake.call}-ring")

    async def _place(self, place: PlaceCall) -> None:
        """Dial as the server asked (a scenario's dial from the device)."""
        try:
            call = await self.dial(place.callee, place.media_mode, script=place.script,
                                   ref=place.ref)
        except (DialError, ConnectionError, TimeoutError) as exc:
            event(log, "device.place_failed", logging.WARNING, device=self.id,
                  callee=place.callee, ref=place.ref, error=str(exc))
            return
        event(log, "device.placed", call=call, device=self.id, callee=place.callee,
              ref=place.ref)

    async def _ring_out(self, call_id: str, script: Script) -> None:
        """A scripted callee: ring for the script's time, then pick up or decline."""
        await asyncio.sleep(script.ring_s)
        phone = self.phones.get(call_id)
        if phone is None or phone.state is not PhoneState.RINGING:
            return  # it ended meanwhile (the caller hung up, the ring timeout)
        if script.decline:
            await self.decline(call_id)
        else:
            await self.pickup(call_id)

    async def _hold_then_hang_up(self, call_id: str, hold_s: float) -> None:
        """A scripted device that hangs up: hold the call, then end it."""
        await asyncio.sleep(hold_s)
        if call_id in self.phones:
            await self.hangup(call_id)

    async def _answer(self, channel: WebSocketChannel, offer: Offer) -> None:
        """Answer the offer of a call the table has moved to CONNECTING."""
        phone = self.phones[offer.call]
        if phone.state is not PhoneState.CONNECTING:  # picked up: the held offer's turn
            phone.handle(PhoneEvent.OFFER)
        wake = phone.wake
        call = DeviceCall(offer.call, wake.role, wake.peer, self.settings, channel,
                          self.clock, self.address or self.id, self.supply,
                          on_first_frame=lambda: self._first_frame(offer.call))
        phone.media = call
        try:
            sdp = await call.answer(offer)
        except Exception as exc:  # a bad offer ends this call only
            event(log, "device.bad_offer", logging.WARNING, call=offer.call,
                  device=self.id, error=repr(exc))
            await self._hang_up(offer.call, "bad_sdp")
            return
        if not call.closed:
            await channel.send(Answer(call=offer.call, leg=offer.leg, sdp=sdp))

    def _first_frame(self, call_id: str) -> None:
        phone = self.phones.get(call_id)
        if phone is not None and phone.state is PhoneState.CONNECTING:
            phone.handle(PhoneEvent.FIRST_FRAME)
            script = phone.wake.script if self.settings.answer == "auto" else None
            if script is not None and script.hangup_by == phone.wake.role:
                self.tasks.spawn(self._hold_then_hang_up(call_id, script.hold_s),
                                 f"{call_id}-hold")

    async def _end_all(self, reason: str) -> None:
        for future in self._dials.values():
            if not future.done():
                future.set_exception(ConnectionError(f"{self.id} lost its server link"))
        ids = list(self.phones)
        await asyncio.gather(*(self._finish(c, reason, "remote") for c in ids),
                             return_exceptions=True)

    async def close(self) -> None:
        """Close every call of this device (after its run() task was cancelled)."""
        await self.tasks.close()
        await self._end_all("device_gone")
