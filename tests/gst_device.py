"""A device built on GStreamer's webrtcbin (libnice ICE, GStreamer's DTLS/SRTP) from
docs/protocol.md alone: no code of this project. Run with the system Python, whose ``gi`` has
GStreamer (Debian: python3-gst-1.0, gir1.2-gst-plugins-bad-1.0, gstreamer1.0-plugins-bad,
gstreamer1.0-nice, gstreamer1.0-plugins-good, gstreamer1.0-libav, python3-websocket):

    /usr/bin/python3 tests/gst_device.py ws://127.0.0.1:8080/v1/device gst-1 --codec VP8

It registers, answers every wake with ``woken``, answers the server's offer with every
candidate in it, sends a test picture and tone, decodes what it receives, sends
``first_frame`` on its first decoded frame and ``stats`` every second, and ends a call on
``hangup``. With --dial ADDRESS it starts one call itself. Each call it ended prints one JSON
line: the frames and audio buffers it decoded.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstWebRTC", "1.0")
gi.require_version("GstSdp", "1.0")
import websocket  # noqa: E402
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402

SENDERS = {
    "VP8": "videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,"
           "framerate=15/1 ! videoconvert ! vp8enc deadline=1 keyframe-max-dist=30 ! "
           "rtpvp8pay pt={pt}",
    "H264": "videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,"
            "framerate=15/1 ! videoconvert ! x264enc tune=zerolatency speed-preset=ultrafast "
            "key-int-max=30 ! video/x-h264,profile=constrained-baseline ! "
            "rtph264pay pt={pt} config-interval=-1",
    "OPUS": "audiotestsrc is-live=true wave=sine freq=440 ! audioconvert ! audioresample ! "
            "opusenc ! rtpopuspay pt={pt}",
}


def payload_type(sdp: str, media: str, codec: str) -> int:
    """The offer's payload type for ``codec`` in its ``media`` section (H.264: the
    Constrained Baseline one with packetization-mode=1)."""
    section = sdp.split(f"m={media}", 1)[1].split("\nm=", 1)[0]
    found = re.findall(rf"a=rtpmap:(\d+) {codec}/", section, re.I)
    if codec.upper() == "H264":
        for pt in found:
            fmtp = re.search(rf"a=fmtp:{pt} (.*)", section)
            if fmtp and "42e01f" in fmtp.group(1) and "packetization-mode=1" in fmtp.group(1):
                return int(pt)
    if not found:
        raise ValueError(f"the offer has no {codec} in its {media} section")
    return int(found[0])


class Call:
    def __init__(self, device: Device, call: str, leg: str, role: str, offer: str) -> None:
        self.device, self.call, self.leg, self.role = device, call, leg, role
        self.frames_in = self.audio_in = 0
        self.first_sent = False
        self.started = time.time()
        self.pipe = Gst.Pipeline.new(f"call-{call}")
        self.webrtc = Gst.ElementFactory.make("webrtcbin", "webrtc")
        self.webrtc.set_property("bundle-policy", GstWebRTC.WebRTCBundlePolicy.MAX_BUNDLE)
        self.pipe.add(self.webrtc)
        # libnice gathers on what it is given: loopback only (the project's tests stay there).
        # webrtcbin 1.22's ice-agent getter misses a reference: read it once, keep it.
        self.agent = self.webrtc.get_property("ice-agent")
        self.agent.emit("add-local-ip-address", "127.0.0.1")
        self.webrtc.connect("pad-added", self._incoming)
        self.webrtc.connect("notify::ice-gathering-state", self._gathering)
        self.pipe.set_state(Gst.State.PLAYING)
        _, message = GstSdp.SDPMessage.new_from_text(offer)
        description = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.OFFER,
                                                              message)
        promise = Gst.Promise.new_with_change_func(self._offer_set, offer)
        self.webrtc.emit("set-remote-description", description, promise)

    def _offer_set(self, promise: Gst.Promise, offer: str) -> None:
        # The sending branches, linked to the m-lines of the offer once it is set.
        lines = [m.split()[0] for m in offer.split("\nm=")[1:]]
        for index, media in enumerate(lines):
            codec = self.device.codec if media == "video" else "OPUS"
            pt = payload_type(offer, media, codec)
            branch = Gst.parse_bin_from_description(SENDERS[codec].format(pt=pt), True)
            self.pipe.add(branch)
            caps = Gst.ElementFactory.make("capsfilter")
            encoding = {"VP8": "VP8", "H264": "H264", "OPUS": "OPUS"}[codec]
            caps.set_property("caps", Gst.Caps.from_string(
                f"application/x-rtp,media={media},encoding-name={encoding},payload={pt}"))
            self.pipe.add(caps)
            branch.link(caps)
            caps.link_pads("src", self.webrtc, f"sink_{index}")
            branch.sync_state_with_parent()
            caps.sync_state_with_parent()
        promise = Gst.Promise.new_with_change_func(self._answered, None)
        self.webrtc.emit("create-answer", None, promise)

    def _answered(self, promise: Gst.Promise, _: object) -> None:
        reply = promise.get_reply()
        answer = reply.get_value("answer") if reply.has_field("answer") else None
        if answer is None:
            print(json.dumps({"error": f"create-answer failed: {reply.to_string()}"}),
                  flush=True)
            return
        self.webrtc.emit("set-local-description", answer, Gst.Promise.new())

    def _gathering(self, webrtc: Gst.Element, _: object) -> None:
        # No trickle: the answer goes once it holds every candidate.
        if webrtc.get_property("ice-gathering-state") == GstWebRTC.WebRTCICEGatheringState.COMPLETE:
            sdp = webrtc.get_property("local-description").sdp.as_text()
            self.device.send({"type": "answer", "call": self.call, "leg": self.leg, "sdp": sdp})

    def _incoming(self, webrtc: Gst.Element, pad: Gst.Pad) -> None:
        if pad.get_direction() != Gst.PadDirection.SRC:
            return
        decode = Gst.ElementFactory.make("decodebin")
        decode.connect("pad-added", self._decoded)
        self.pipe.add(decode)
        decode.sync_state_with_parent()
        pad.link(decode.get_static_pad("sink"))

    def _decoded(self, decode: Gst.Element, pad: Gst.Pad) -> None:
        kind = pad.get_current_caps().to_string()
        sink = Gst.ElementFactory.make("fakesink")
        sink.set_property("signal-handoffs", True)
        sink.set_property("sync", False)
        sink.connect("handoff", self._video if kind.startswith("video") else self._audio)
        self.pipe.add(sink)
        sink.sync_state_with_parent()
        pad.link(sink.get_static_pad("sink"))

    def _video(self, *_: object) -> None:
        self.frames_in += 1
        if not self.first_sent:
            self.first_sent = True
            self.device.send({"type": "first_frame", "call": self.call, "at": time.time()})

    def _audio(self, *_: object) -> None:
        self.audio_in += 1

    def stats(self) -> None:
        seconds = max(1e-3, time.time() - self.started)
        self.device.send({"type": "stats", "call": self.call, "media": {
            "frames": self.frames_in, "fps": round(self.frames_in / seconds, 2),
            "audio_frames": self.audio_in, "duration_s": round(seconds, 3)}})

    def end(self, reason: str) -> None:
        self.pipe.set_state(Gst.State.NULL)
        print(json.dumps({"call": self.call, "role": self.role, "codec": self.device.codec,
                          "reason": reason, "frames_in": self.frames_in,
                          "audio_in": self.audio_in}),
              flush=True)


class Device:
    def __init__(self, url: str, name: str, codec: str, dial: str | None) -> None:
        self.name, self.codec, self.dial = name, codec, dial
        self.calls: dict[str, Call] = {}
        self.roles: dict[str, str] = {}
        self.loop = GLib.MainLoop()
        self.lock = threading.Lock()
        self.ws = websocket.WebSocketApp(url, on_open=self._open, on_message=self._message,
                                         on_close=lambda *_: GLib.idle_add(self.loop.quit))

    def send(self, message: dict[str, object]) -> None:
        with self.lock:
            self.ws.send(json.dumps(message))

    def _open(self, ws: websocket.WebSocketApp) -> None:
        self.send({"type": "register", "device": self.name, "codecs": [f"video/{self.codec}"]})

    def _message(self, ws: websocket.WebSocketApp, raw: str) -> None:
        GLib.idle_add(self._handle, json.loads(raw))  # GStreamer work on GLib's thread

    def _handle(self, message: dict[str, object]) -> bool:
        kind = message["type"]
        if kind == "registered":
            print(json.dumps({"registered": message["address"]}), flush=True)
            if self.dial:
                self.send({"type": "dial", "callee": self.dial, "seq": 1})
        elif kind == "heartbeat":
            self.send(message)
        elif kind == "wake":
            self.roles[str(message["call"])] = str(message["role"])
            self.send({"type": "woken", "call": message["call"], "at": time.time()})
        elif kind == "offer":
            call = str(message["call"])
            self.calls[call] = Call(self, call, str(message["leg"]),
                                    self.roles.get(call, "?"), str(message["sdp"]))
        elif kind == "hangup":
            found = self.calls.pop(str(message["call"]), None)
            if found is not None:
                found.end(str(message["reason"]))
        elif kind == "error":
            print(json.dumps({"error": message}), flush=True)
        return False

    def _tick(self) -> bool:
        for call in self.calls.values():
            call.stats()
        return True

    def run(self, seconds: float) -> None:
        thread = threading.Thread(target=self.ws.run_forever, kwargs={"ping_interval": 0},
                                  daemon=True)
        thread.start()
        GLib.timeout_add(1000, self._tick)
        GLib.timeout_add(int(seconds * 1000), self.loop.quit)
        self.loop.run()
        for call in list(self.calls.values()):
            call.end("device stopped")
        self.ws.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("device")
    parser.add_argument("--codec", choices=("VP8", "H264"), default="VP8")
    parser.add_argument("--dial")
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    Gst.init(None)
    Device(args.url, args.device, args.codec, args.dial).run(args.seconds)
    sys.exit(0)


if __name__ == "__main__":
    main()
