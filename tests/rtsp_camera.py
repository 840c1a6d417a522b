"""An IP camera on loopback, for tests: a small RTSP/1.0 server (RFC 2326) that streams live
H.264 (RFC 6184: single NAL units and FU-A) over RTP interleaved in the RTSP connection (TCP),
as most IP cameras do when asked. Each session encodes its own picture with libx264 (PyAV):
a moving test pattern with the stamp (endpoint/stamp.py) drawn in, carrying the time each
frame is sent, so a receiver measures glass-to-glass latency through a relay that never
decodes it.

Not a general server: one video track, TCP only (a client asking for UDP is answered 461).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import itertools
import random
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import av
import numpy as np

from endpoint import stamp

MTU = 1200
CLOCK = 90_000


def nal_units(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B access unit, without their start codes."""
    units, i, n = [], 0, len(data)
    starts = []
    while i < n - 2:
        if data[i] == 0 and data[i + 1] == 0 and data[i + 2] == 1:
            starts.append(i + 3)
            i += 3
        else:
            i += 1
    for k, begin in enumerate(starts):
        end = starts[k + 1] - 3 if k + 1 < len(starts) else n
        unit = data[begin:end].rstrip(b"\x00") if k + 1 < len(starts) else data[begin:end]
        if unit:
            units.append(unit)
    return units


def rtp_payloads(units: list[bytes], mtu: int = MTU) -> list[bytes]:
    """RFC 6184 packetization mode 1: a NAL unit per packet, FU-A fragments for large ones."""
    out = []
    for unit in units:
        if len(unit) <= mtu:
            out.append(unit)
            continue
        header, body = unit[0], unit[1:]
        indicator = (header & 0xE0) | 28
        chunks = [body[i:i + mtu] for i in range(0, len(body), mtu)]
        for k, chunk in enumerate(chunks):
            fu = (header & 0x1F) | (0x80 if k == 0 else 0) | (0x40 if k == len(chunks) - 1 else 0)
            out.append(bytes([indicator, fu]) + chunk)
    return out


@dataclass
class Camera:
    """What the camera serves: its picture and how it encodes it."""

    width: int = 320
    height: int = 240
    fps: float = 15.0
    gop: int = 15  #: a keyframe every this many frames (a camera's "I-frame interval")
    path: str = "/stream1"
    profile: str = "baseline"  #: libx264's: baseline, main, high
    sessions: int = 0  #: sessions that played
    frames_sent: int = 0
    clients: dict[asyncio.Task[None], asyncio.StreamWriter] = field(default_factory=dict)

    def encoder(self) -> av.CodecContext:
        codec = av.CodecContext.create("libx264", "w")
        codec.width, codec.height = self.width, self.height
        codec.pix_fmt = "yuv420p"
        codec.time_base = fractions.Fraction(1, CLOCK)
        codec.framerate = fractions.Fraction(int(self.fps), 1)
        codec.gop_size = self.gop
        # ultrafast uses no tool past baseline: x264 would call any stream of it baseline
        preset = "ultrafast" if self.profile == "baseline" else "superfast"
        codec.options = {"preset": preset, "tune": "zerolatency", "profile": self.profile,
                         "x264-params": f"keyint={self.gop}:min-keyint={self.gop}:scenecut=0"}
        return codec

    def picture(self, n: int, sent_ms: int) -> av.VideoFrame:
        y = np.full((self.height, self.width), 60, np.uint8)
        x = (n * 4) % self.width
        y[:, x:x + 16] = 220  # a moving bar: the picture changes
        y[self.height // 2:, :] = (np.arange(self.width) % 256).astype(np.uint8)
        stamp.draw(y, stamp.Stamp(n, sent_ms))
        u = np.full((self.height // 2, self.width // 2), 128, np.uint8)
        frame = av.VideoFrame.from_ndarray(np.concatenate([y, u.reshape(-1, self.width),
                                                           u.reshape(-1, self.width)]),
                                           format="yuv420p")
        return frame

    def sdp(self, host: str) -> str:
        return ("v=0\r\n"
                f"o=- {random.randrange(1 << 30)} 1 IN IP4 {host}\r\n"
                "s=vphone test camera\r\n"
                "c=IN IP4 0.0.0.0\r\n"
                "t=0 0\r\n"
                "m=video 0 RTP/AVP 96\r\n"
                "a=rtpmap:96 H264/90000\r\n"
                "a=fmtp:96 packetization-mode=1;profile-level-id=42e01f\r\n"
                "a=control:track1\r\n")


class Session:
    """One client's RTSP connection: requests in, RTP over channel 0 out once it plays."""

    def __init__(self, camera: Camera, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.camera = camera
        self.reader, self.writer = reader, writer
        self.id = f"{random.randrange(1 << 31):08x}"
        self.channel = 0
        self.streaming: asyncio.Task[None] | None = None

    async def serve(self) -> None:
        try:
            while True:
                first = await self.reader.readexactly(1)
                if first == b"$":  # the client's RTCP, interleaved: read and let go
                    _, size = struct.unpack("!BH", await self.reader.readexactly(3))
                    await self.reader.readexactly(size)
                    continue
                head = first + await self.reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, url, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines[1:] if line)}
                if int(headers.get("content-length", "0")):
                    await self.reader.readexactly(int(headers["content-length"]))
                await self.answer(method, url, headers)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if self.streaming is not None:
                self.streaming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.streaming
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()

    async def reply(self, cseq: str, status: str = "200 OK", headers: dict[str, str] | None = None,
                    body: str = "") -> None:
        lines = [f"RTSP/1.0 {status}", f"CSeq: {cseq}", "Server: vphone-test-camera"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body:
            lines.append(f"Content-Length: {len(body.encode())}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n" + body).encode())
        await self.writer.drain()

    async def answer(self, method: str, url: str, headers: dict[str, str]) -> None:
        cseq = headers.get("cseq", "0")
        path = "/" + url.split("://", 1)[-1].split("/", 1)[-1] if "://" in url else url
        if method == "OPTIONS":
            await self.reply(cseq, headers={
                "Public": "OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN, GET_PARAMETER"})
        elif method == "DESCRIBE":
            if not path.startswith(self.camera.path):
                await self.reply(cseq, "404 Not Found")
                return
            host = self.writer.get_extra_info("sockname")[0]
            await self.reply(cseq, headers={"Content-Type": "application/sdp",
                                            "Content-Base": url.rstrip("/") + "/"},
                             body=self.camera.sdp(host))
        elif method == "SETUP":
            transport = headers.get("transport", "")
            if "TCP" not in transport.upper():
                await self.reply(cseq, "461 Unsupported Transport")
                return
            await self.reply(cseq, headers={
                "Transport": "RTP/AVP/TCP;unicast;interleaved=0-1",
                "Session": f"{self.id};timeout=60"})
        elif method == "PLAY":
            await self.reply(cseq, headers={"Session": self.id, "Range": "npt=0.000-"})
            if self.streaming is None:
                self.camera.sessions += 1
                self.streaming = asyncio.create_task(self.stream())
        elif method == "TEARDOWN":
            await self.reply(cseq, headers={"Session": self.id})
            raise ConnectionError("teardown")
        else:  # GET_PARAMETER (keep-alive) and the rest
            await self.reply(cseq, headers={"Session": self.id})

    async def stream(self) -> None:
        camera = self.camera
        encoder = camera.encoder()
        ssrc = random.randrange(1 << 32)
        seq = itertools.count(random.randrange(1 << 16))
        start = time.monotonic()
        for n in itertools.count():
            await asyncio.sleep(max(0.0, start + n / camera.fps - time.monotonic()))
            frame = camera.picture(n, int(time.time() * 1000))
            frame.pts = int(n * CLOCK / camera.fps)
            frame.time_base = fractions.Fraction(1, CLOCK)
            for packet in encoder.encode(frame):
                payloads = rtp_payloads(nal_units(bytes(packet)))
                timestamp = (packet.pts or 0) & 0xFFFFFFFF
                for k, payload in enumerate(payloads):
                    marker = 0x80 if k == len(payloads) - 1 else 0
                    header = struct.pack("!BBHII", 0x80, marker | 96, next(seq) & 0xFFFF,
                                         timestamp, ssrc)
                    rtp = header + payload
                    self.writer.write(b"$" + struct.pack("!BH", self.channel, len(rtp)) + rtp)
                camera.frames_sent += 1
            await self.writer.drain()


@contextlib.asynccontextmanager
async def serving(camera: Camera | None = None) -> AsyncIterator[tuple[str, Camera]]:
    """An RTSP camera on 127.0.0.1 (a free port): its URL, and the camera."""
    camera = camera or Camera()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        camera.clients[task] = writer
        try:
            await Session(camera, reader, writer).serve()
        finally:
            camera.clients.pop(task, None)

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"rtsp://127.0.0.1:{port}{camera.path}", camera
    finally:
        server.close()
        tasks = list(camera.clients)
        for writer in camera.clients.values():  # each session sees its connection end
            writer.transport.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

