"""A device written from docs/protocol.md alone, as an outside implementer would: raw JSON over
the device WebSocket and a plain aiortc peer connection, none of endpoint/. Its answer can be
spoiled on purpose (``edit``) to play a peer that answers what cannot work.

Only loopback placement comes from this project (rtc/adapter.py): aioice leaves 127.0.0.1 out
of its candidates, and the tests keep their traffic on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiortc import RTCSessionDescription, VideoStreamTrack
from aiortc.contrib.media import MediaBlackhole
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError

from rtc.adapter import MediaSettings, new_peer_connection, restrict_host_candidates

LOOPBACK = MediaSettings(addresses=("127.0.0.1",))


class OutsideDevice:
    def __init__(self, url: str, device: str, edit: Callable[[str], str] | None = None) -> None:
        self.url = url.replace("http://", "ws://") + "/v1/device"
        self.device = device
        self.edit = edit or (lambda sdp: sdp)
        self.received: list[dict[str, Any]] = []
        self.frames = 0
        self.registered = asyncio.Event()
        self.first_frame = asyncio.Event()
        self._pcs: list[Any] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    def got(self, type_: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m["type"] == type_]

    async def run(self, session: aiohttp.ClientSession) -> None:
        async with session.ws_connect(self.url, heartbeat=2.0) as ws:
            self._ws = ws
            await ws.send_json({"type": "register", "device": self.device})
            async for frame in ws:
                if frame.type != aiohttp.WSMsgType.TEXT:
                    break
                message = json.loads(frame.data)
                self.received.append(message)
                kind = message["type"]
                if kind == "registered":
                    self.registered.set()
                elif kind == "heartbeat":
                    await ws.send_json(message)
                elif kind == "wake":
                    await ws.send_json({"type": "woken", "call": message["call"],
                                        "at": time.time()})
                elif kind == "offer":
                    self._spawn(self._answer(ws, message))

    async def _answer(self, ws: aiohttp.ClientWebSocketResponse, offer: dict[str, Any]) -> None:
        pc = new_peer_connection(LOOPBACK)
        self._pcs.append(pc)
        call = offer["call"]

        @pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind == "video":
                self._spawn(self._watch(ws, call, track))
            else:
                sink = MediaBlackhole()
                sink.addTrack(track)
                self._spawn(sink.start())

        await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
        for transceiver in pc.getTransceivers():
            transceiver.direction = "sendrecv"
            transceiver.sender.replaceTrack(
                VideoStreamTrack() if transceiver.kind == "video" else AudioStreamTrack())
        restrict_host_candidates(pc, LOOPBACK.addresses)
        await pc.setLocalDescription(await pc.createAnswer())
        await ws.send_json({"type": "answer", "call": call, "leg": offer["leg"],
                            "sdp": self.edit(pc.localDescription.sdp)})

    async def _watch(self, ws: aiohttp.ClientWebSocketResponse, call: str, track: Any) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                self.frames += 1
                if not self.first_frame.is_set():
                    self.first_frame.set()
                    await ws.send_json({"type": "first_frame", "call": call, "at": time.time()})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(pc.close() for pc in self._pcs), return_exceptions=True)
        if self._ws is not None:
            await self._ws.close()
