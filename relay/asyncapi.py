"""The WebSocket protocol's AsyncAPI 3.0 description: every message on every link, generated
from the msgspec types of wire/messages.py, so it cannot drift from what the servers accept and
send. Served at ``GET /v1/asyncapi.json``; docs/protocol.md is the guide that goes with it.

Operations are a server's: it *receives* what a device (or a child server) sends and *sends*
what the device receives. Each message carries one example, built from the types themselves
(a struct that exists is a valid message), so the examples are valid by construction.
"""

from __future__ import annotations

from typing import Any

import msgspec

from wire.messages import (
    CHILD_TO_PARENT,
    DEVICE_TO_SERVER,
    MAX_MESSAGE_BYTES,
    PARENT_TO_CHILD,
    PROTOCOL_VERSION,
    SERVER_TO_DEVICE,
    TRUNK_VERSION,
    Announce,
    Answer,
    CallAccept,
    CallSetup,
    CallUpdate,
    Dial,
    Dialed,
    Directory,
    Error,
    FirstFrame,
    Hangup,
    Heartbeat,
    MediaStats,
    Message,
    Offer,
    Pickup,
    PlaceCall,
    Register,
    Registered,
    Stats,
    Wake,
    Welcome,
    Woken,
    message_types,
)
from wire.reasons import Code

SCHEMA_REF = "#/components/schemas/{name}"

_CALL = "6f1c2e1a-9b7d-4c1e-8a57-3d2f0b9e4c11"
_AT = 1796700000.125
_SDP = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n..."

#: One example of each message (a real call's values, SDP cut short).
EXAMPLES: dict[str, Message] = {m.TYPE: m for m in (
    Register(device="cam-1", codecs=["video/VP8", "video/H264"], token=None),
    Registered(server="lower-a", device="cam-1", address="lower-a/cam-1", heartbeat_s=2.0),
    Heartbeat(seq=7),
    Wake(call=_CALL, role="callee", peer="lower-a/cam-1"),
    Woken(call=_CALL, at=_AT),
    Pickup(call=_CALL, at=_AT + 2.5),
    Dial(callee="lower-b/cam-2", seq=1),
    Dialed(call=_CALL, callee="lower-b/cam-2", seq=1),
    PlaceCall(callee="lower-b/cam-2", ref=7),
    Offer(call=_CALL, leg=_CALL, sdp=_SDP),
    Answer(call=_CALL, leg=_CALL, sdp=_SDP),
    FirstFrame(call=_CALL, at=_AT + 0.3),
    Stats(call=_CALL, media=MediaStats(frames=290, fps=29.8, latency_ms_p50=48.0,
                                       latency_ms_p95=61.5, audio_frames=490)),
    Hangup(call=_CALL, reason=Code.HANGUP),
    Error(code=Code.BAD_MESSAGE, message="missing field 'device'", field="device",
          ref="register"),
    Announce(server="lower-a", url="http://lower-a:8080", role="lower"),
    Welcome(server="upper"),
    Directory(),
    CallSetup(call=_CALL, caller="lower-a/cam-1", callee="lower-b/cam-2", path=["lower-a"]),
    CallAccept(call=_CALL, callee="lower-b/cam-2", codec="video/VP8",
               path=["lower-a", "upper", "lower-b"]),
    CallUpdate(call=_CALL, events={"t_callee_woken": _AT}),
)}

_SUMMARIES: dict[str, str] = {
    "register": "A device's first message: its id on this server and the codecs it takes.",
    "registered": "The server took the registration.",
    "heartbeat": "Either side, any time; answered with the same seq.",
    "wake": "Wake the device for a call (as caller or callee).",
    "woken": "The device acknowledges its wake-up (ringing: a person must pick up).",
    "pickup": "A ringing callee was answered; its SDP answer follows.",
    "dial": "The device starts a call itself.",
    "dialed": "The dial was taken: the call's id.",
    "place_call": "The server asks a scripted device to dial a call itself (a probe scenario).",
    "offer": "An SDP offer, every ICE candidate in it (no trickle). To a device: the server's.",
    "answer": "The SDP answer: sends and receives audio and video, every candidate in it.",
    "first_frame": "The device decoded the first video frame of the other party.",
    "stats": "What the device measured of the media it received, about once a second.",
    "hangup": "End the call, with a reason code.",
    "error": "A message was refused (what was wrong, which field); nothing changed.",
    "announce": "A server's first message on the trunk to its parent.",
    "welcome": "The parent took the announce.",
    "directory": "Bounded increments of the tree's directory.",
    "call_setup": "A call entering the next server on its path.",
    "call_accept": "The callee's server took the call; travels back to the caller's.",
    "call_update": "Timeline events and media figures, passed along the call's path.",
}

#: (operation id, action, channel, messages): the server's side of each link.
_OPERATIONS: tuple[tuple[str, str, str, tuple[type[Message], ...]], ...] = (
    ("receiveFromDevice", "receive", "device", DEVICE_TO_SERVER),
    ("sendToDevice", "send", "device", SERVER_TO_DEVICE),
    ("receiveFromChild", "receive", "trunk", CHILD_TO_PARENT),
    ("sendToChild", "send", "trunk", PARENT_TO_CHILD),
)


def asyncapi(server: str = "lower-a", url: str = "http://127.0.0.1:8080") -> dict[str, Any]:
    """The AsyncAPI 3.0 document of both WebSocket links, as ``server`` at ``url`` serves them."""
    types = message_types()
    _, schemas = msgspec.json.schema_components(list(types.values()), ref_template=SCHEMA_REF)
    messages = {
        tag: {
            "name": tag,
            "title": cls.__name__,
            "summary": _SUMMARIES[tag],
            "description": (cls.__doc__ or _SUMMARIES[tag]).strip(),
            "contentType": "application/json",
            "payload": {"$ref": SCHEMA_REF.format(name=cls.__name__)},
            "examples": [{"name": tag, "payload": EXAMPLES[tag].to_dict()}],
        }
        for tag, cls in sorted(types.items())
    }
    on = {"device": {t.TYPE for t in DEVICE_TO_SERVER + SERVER_TO_DEVICE},
          "trunk": {t.TYPE for t in CHILD_TO_PARENT + PARENT_TO_CHILD}}
    host = url.split("://", 1)[-1].rstrip("/")
    secure = url.startswith(("https", "wss"))
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "vphone relay: device and trunk WebSocket protocol",
            "version": f"device {PROTOCOL_VERSION}, trunk {TRUNK_VERSION}",
            "description": (
                "JSON objects, one per WebSocket text frame, each with a `type` naming one of "
                f"the messages below; at most {MAX_MESSAGE_BYTES} bytes. A message that fails "
                "its schema is answered with `error` and changes nothing. The guide to writing "
                "a device is docs/protocol.md."),
        },
        "defaultContentType": "application/json",
        "servers": {server: {"host": host, "protocol": "wss" if secure else "ws",
                             "description": f"the server {server}"}},
        "channels": {
            "device": {
                "address": "/v1/device",
                "title": "device <-> lower server",
                "description": "One WebSocket per device; the first message is `register`.",
                "messages": {t: {"$ref": f"#/components/messages/{t}"}
                             for t in sorted(on["device"])},
            },
            "trunk": {
                "address": "/v1/trunk",
                "title": "child server <-> parent server",
                "description": "One WebSocket per child server; the first message is "
                               "`announce`.",
                "messages": {t: {"$ref": f"#/components/messages/{t}"}
                             for t in sorted(on["trunk"])},
            },
        },
        "operations": {
            op: {"action": action, "channel": {"$ref": f"#/channels/{channel}"},
                 "messages": [{"$ref": f"#/channels/{channel}/messages/{t.TYPE}"}
                              for t in kinds]}
            for op, action, channel, kinds in _OPERATIONS
        },
        "components": {"schemas": schemas, "messages": messages},
    }
