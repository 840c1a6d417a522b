"""Every message that crosses a wire in this project, and nothing else.

Device <-> lower server and lower <-> upper server speak JSON over one WebSocket each, one
object per frame, with a ``type`` field naming one of the classes below. The probe speaks HTTP +
JSON to the servers; its request and response bodies are defined here too, so the three services
share one vocabulary and nothing is spelled twice.

Messages are frozen dataclasses that validate themselves when built, so a message that exists is a
valid message. :func:`decode` turns untrusted input into a message or raises :class:`MessageError`,
which says which field was wrong and why; handlers answer it with :class:`Error` and change nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar, Literal, get_args, get_origin

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024
MAX_SDP_CHARS = 64 * 1024

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CALL_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")

DeviceState = Literal["idle", "busy"]
Role = Literal["caller", "callee"]
ServerRole = Literal["lower", "upper"]

#: Timeline events, as DESIGN.md names them; a call's timeline holds only these keys.
TIMELINE_EVENTS: tuple[str, ...] = (
    "t_received",
    "t_caller_woken",
    "t_routed",
    "t_callee_woken",
    "t_media_up",
    "t_first_frame_callee",
    "t_first_frame_caller",
    "t_end",
)
#: Video codecs devices and servers negotiate, by mime type.
VIDEO_CODECS: tuple[str, ...] = ("video/VP8", "video/H264")
#: "full": a real call with audio and video both ways; "none": signalling only (devices are
#: woken and acknowledge, no media leg is made), to time a server's command handling alone.
MEDIA_MODES: tuple[str, ...] = ("full", "none")


def check_media(value: str) -> None:
    if value not in MEDIA_MODES:
        raise MessageError(f"media_mode must be one of {', '.join(MEDIA_MODES)}, not "
                           f"{value!r}", field="media_mode")
#: Media directions, named by who sends: ``caller_to_callee`` is measured at the callee.
DIRECTIONS: tuple[str, ...] = ("caller_to_callee", "callee_to_caller")


class MessageError(ValueError):
    """The peer sent something we cannot accept. Nothing was changed because of it."""

    def __init__(self, message: str, field: str | None = None, code: str = "bad_message") -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.code = code


def check_token(value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 128):
        raise MessageError("token must be a string of 1 to 128 characters", field="token")


def check_name(value: str, what: str) -> str:
    """A device or server name: 1-64 of letters, digits, '.', '_', '-', not starting with a sign."""
    if not _NAME.match(value):
        raise MessageError(
            f"{what} {value!r} is not a valid name (1-64 characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit)",
            field=what,
        )
    return value


def check_call_id(value: str, what: str = "call") -> str:
    if not _CALL_ID.match(value):
        raise MessageError(f"{what} {value!r} is not a valid call id", field=what)
    return value


def check_address(value: str, what: str) -> str:
    """A device address: ``SERVER/DEVICE``, or a bare ``DEVICE`` to be resolved in the tree."""
    parts = value.split("/")
    if len(parts) > 2:
        raise MessageError(f"{what} {value!r} must be SERVER/DEVICE or DEVICE", field=what)
    for part in parts:
        check_name(part, what)
    return value


def split_address(address: str) -> tuple[str | None, str]:
    """``"lower-a/cam-1"`` -> ``("lower-a", "cam-1")``; ``"cam-1"`` -> ``(None, "cam-1")``."""
    server, _, device = address.rpartition("/")
    return (server or None), device


def check_codecs(codecs: list[str], what: str) -> None:
    if not codecs:
        raise MessageError(f"{what} must name at least one video codec", field=what)
    for i, codec in enumerate(codecs):
        if codec not in VIDEO_CODECS:
            raise MessageError(f"{what}[{i}] {codec!r} is not one of {', '.join(VIDEO_CODECS)}",
                               field=f"{what}[{i}]")


def check_time(value: float, what: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise MessageError(f"{what} must be a finite, non-negative number of seconds", field=what)
    return value


# --------------------------------------------------------------------------------------------
# Decoding machinery: JSON objects to dataclasses, checking every field's type on the way.


@dataclass(frozen=True)
class Body:
    """Base of every message and body: conversion to and from plain JSON objects."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        tag = getattr(type(self), "TYPE", None)
        if tag:
            out["type"] = tag
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = _plain(value)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any, path: str = "") -> typing.Self:
        if not isinstance(data, dict):
            raise MessageError(f"{path or 'message'} must be a JSON object", field=path or None)
        hints = _hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(data) - known - {"type"}
        if extra:
            name = sorted(extra)[0]
            raise MessageError(f"unknown field {name!r}", field=_join(path, name))
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            where = _join(path, f.name)
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise MessageError(f"missing field {f.name!r}", field=where)
                continue
            kwargs[f.name] = _convert(data[f.name], hints[f.name], where)
        try:
            return cls(**kwargs)
        except MessageError as exc:
            if exc.field and path and not exc.field.startswith(path):
                exc.field = _join(path, exc.field)
            raise


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _plain(value: Any) -> Any:
    if isinstance(value, Body):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except MessageError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            choices = ", ".join(map(repr, allowed))
            raise MessageError(f"{where} must be one of {choices}, not {value!r}", field=where)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise MessageError(f"{where} must be a list", field=where)
        (item,) = get_args(hint)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MessageError(f"{where} must be an object", field=where)
        _, item = get_args(hint)
        return {str(k): _convert(v, item, _join(where, str(k))) for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, Body):
        return hint.from_dict(value, where)
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MessageError(f"{where} must be a number", field=where)
        if not math.isfinite(value):
            raise MessageError(f"{where} must be finite", field=where)
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MessageError(f"{where} must be an integer", field=where)
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise MessageError(f"{where} must be {_TYPE_NAMES[hint]}", field=where)
        return value
    raise TypeError(f"unsupported field type {hint!r} at {where}")  # a bug in this module


# --------------------------------------------------------------------------------------------
# Parts shared by several messages.


@dataclass(frozen=True)
class DeviceInfo(Body):
    """A device as its server and the directory describe it."""

    id: str
    server: str
    state: DeviceState = "idle"
    #: video codecs the device takes, in its order of preference
    codecs: list[str] = field(default_factory=lambda: list(VIDEO_CODECS))

    def __post_init__(self) -> None:
        check_name(self.id, "id")
        check_name(self.server, "server")
        check_codecs(self.codecs, "codecs")

    @property
    def address(self) -> str:
        return f"{self.server}/{self.id}"

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "address": self.address}

    @classmethod
    def from_dict(cls, data: Any, path: str = "") -> DeviceInfo:
        if isinstance(data, dict) and "address" in data:
            data = {k: v for k, v in data.items() if k != "address"}
        return super().from_dict(data, path)


@dataclass(frozen=True)
class MediaStats(Body):
    """What one device measured of the media it received in one call (one direction)."""

    frames: int = 0  #: video frames decoded (stamped or not)
    frames_lost: int = 0  #: stamped frames never seen (gaps in the frame counter)
    unreadable: int = 0  #: of the decoded frames, those without a readable stamp
    fps: float = 0.0  #: decoded frames per second since the first one
    latency_ms_p50: float | None = None  #: send (stamp) -> decoded at the receiver
    latency_ms_p95: float | None = None
    latency_ms_max: float | None = None
    gaps: int = 0  #: freezes: inter-frame gap >= max(3 x mean interval, mean + 150 ms)
    audio_frames: int = 0  #: audio frames received
    audio_level_dbfs: float | None = None  #: mean level of the received audio
    duration_s: float = 0.0  #: first stamped frame -> this report

    def __post_init__(self) -> None:
        for name in ("frames", "frames_lost", "unreadable", "gaps", "audio_frames"):
            if getattr(self, name) < 0:
                raise MessageError(f"{name} must not be negative", field=name)


# --------------------------------------------------------------------------------------------
# WebSocket messages. Each has a TYPE; decode() picks the class by it.

_TYPES: dict[str, type[Message]] = {}


@dataclass(frozen=True)
class Message(Body):
    TYPE: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            _TYPES[cls.TYPE] = cls


@dataclass(frozen=True)
class Error(Message):
    """Answer to a message that was refused; ``field`` names the part that was wrong."""

    TYPE = "error"
    code: str
    message: str
    field: str | None = None
    call: str | None = None
    ref: str | None = None  #: the type of the refused message, when known

    @classmethod
    def from_exception(cls, exc: MessageError, ref: str | None = None,
                       call: str | None = None) -> Error:
        return cls(code=exc.code, message=exc.message, field=exc.field, call=call, ref=ref)


@dataclass(frozen=True)
class Heartbeat(Message):
    """Either side, any time; the other side answers with the same ``seq``."""

    TYPE = "heartbeat"
    seq: int = 0


# Device -> lower server.


@dataclass(frozen=True)
class Register(Message):
    """First message of a device: claims an id, unique on this server."""

    TYPE = "register"
    device: str
    version: int = PROTOCOL_VERSION
    #: video codecs the device can send and receive, in its order of preference
    codecs: list[str] = field(default_factory=lambda: list(VIDEO_CODECS))
    token: str | None = None  #: HMAC credential for "device:ID" when auth is on (relay/auth.py)

    def __post_init__(self) -> None:
        check_name(self.device, "device")
        check_codecs(self.codecs, "codecs")
        check_token(self.token)
        if self.version != PROTOCOL_VERSION:
            raise MessageError(
                f"protocol version {self.version} is not supported (this server speaks "
                f"{PROTOCOL_VERSION})", field="version", code="unsupported_version")


@dataclass(frozen=True)
class Registered(Message):
    TYPE = "registered"
    server: str
    device: str
    address: str
    heartbeat_s: float


@dataclass(frozen=True)
class _Moment(Message):
    """Something that happened at a device during a call, at ``at`` on the device's clock."""

    call: str
    at: float

    def __post_init__(self) -> None:
        check_call_id(self.call)
        check_time(self.at, "at")


@dataclass(frozen=True)
class Woken(_Moment):
    """The device acknowledges a wake-up."""

    TYPE = "woken"


@dataclass(frozen=True)
class FirstFrame(_Moment):
    """The device decoded the first video frame of the other party."""

    TYPE = "first_frame"


@dataclass(frozen=True)
class Stats(Message):
    """The device's figures for the media it received in this call so far."""

    TYPE = "stats"
    call: str
    media: MediaStats

    def __post_init__(self) -> None:
        check_call_id(self.call)


# Lower server -> device.


@dataclass(frozen=True)
class Wake(Message):
    """Wake a device for a call; it answers with Woken, then gets an Offer."""

    TYPE = "wake"
    call: str
    role: Role
    peer: str  #: the address of the other party
    media_mode: str = "full"  #: "none": acknowledge only, no offer follows

    def __post_init__(self) -> None:
        check_call_id(self.call)
        check_address(self.peer, "peer")
        check_media(self.media_mode)


# Both ways, on device and trunk links.


@dataclass(frozen=True)
class _Description(Message):
    """An SDP description for one leg of a call (every ICE candidate included: no trickle)."""

    call: str
    leg: str
    sdp: str

    def __post_init__(self) -> None:
        check_call_id(self.call)
        check_call_id(self.leg, "leg")
        if len(self.sdp) > MAX_SDP_CHARS:
            raise MessageError(f"sdp is longer than {MAX_SDP_CHARS} characters", field="sdp")
        if not self.sdp.startswith("v=0"):
            raise MessageError("sdp must be an SDP session description starting with 'v=0'",
                               field="sdp")


@dataclass(frozen=True)
class Offer(_Description):
    TYPE = "offer"


@dataclass(frozen=True)
class Answer(_Description):
    TYPE = "answer"


@dataclass(frozen=True)
class Hangup(Message):
    """End a call; travels along the call's path away from whoever ended it."""

    TYPE = "hangup"
    call: str
    reason: str

    def __post_init__(self) -> None:
        check_call_id(self.call)
        check_name(self.reason, "reason")


# Lower <-> upper (trunk).


@dataclass(frozen=True)
class Announce(Message):
    """A lower server's first message on its trunk: who it is and which devices it holds."""

    TYPE = "announce"
    server: str
    url: str
    devices: list[DeviceInfo] = field(default_factory=list)
    version: int = PROTOCOL_VERSION
    token: str | None = None  #: HMAC credential for "server:NAME" when auth is on

    def __post_init__(self) -> None:
        check_name(self.server, "server")
        check_token(self.token)
        for i, device in enumerate(self.devices):
            if device.server != self.server:
                raise MessageError(
                    f"device {device.id!r} is announced by {self.server!r} but names server "
                    f"{device.server!r}", field=f"devices[{i}].server")
        if self.version != PROTOCOL_VERSION:
            raise MessageError(f"protocol version {self.version} is not supported",
                               field="version", code="unsupported_version")


@dataclass(frozen=True)
class Welcome(Message):
    """The upper server accepted an Announce."""

    TYPE = "welcome"
    server: str


@dataclass(frozen=True)
class Directory(Message):
    """Device changes. Up the tree: a lower server's own devices. Down: the whole tree's.

    ``full`` replaces what the receiver knew from this sender; otherwise it is a delta.
    """

    TYPE = "directory"
    devices: list[DeviceInfo] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  #: addresses
    full: bool = False

    def __post_init__(self) -> None:
        for i, address in enumerate(self.removed):
            check_address(address, f"removed[{i}]")


@dataclass(frozen=True)
class CallSetup(Message):
    """A call entering the next server on its path: find the callee and set up the next leg."""

    TYPE = "call_setup"
    call: str
    caller: str
    callee: str
    #: the video codec the call's trunks carry (the caller's first choice the callee shares)
    codec: str = VIDEO_CODECS[0]
    media_mode: str = "full"  #: see MEDIA_MODES

    def __post_init__(self) -> None:
        check_call_id(self.call)
        check_codecs([self.codec], "codec")
        check_media(self.media_mode)
        check_address(self.caller, "caller")
        check_address(self.callee, "callee")


@dataclass(frozen=True)
class CallUpdate(Message):
    """Timeline events and media figures of a call, passed along its path to every server."""

    TYPE = "call_update"
    call: str
    events: dict[str, float] = field(default_factory=dict)
    media: dict[str, MediaStats] = field(default_factory=dict)
    transcoded: list[str] = field(default_factory=list)  #: "SERVER:KIND:DIRECTION"

    def __post_init__(self) -> None:
        check_call_id(self.call)
        for name, at in self.events.items():
            if name not in TIMELINE_EVENTS:
                raise MessageError(f"unknown timeline event {name!r}", field=f"events.{name}")
            check_time(at, f"events.{name}")
        for name in self.media:
            if name not in DIRECTIONS:
                raise MessageError(f"unknown media direction {name!r}", field=f"media.{name}")


def decode(raw: str | bytes | dict[str, Any],
           allowed: typing.Collection[type[Message]] | None = None) -> Message:
    """Parse one WebSocket frame. Raises MessageError naming what is wrong."""
    if isinstance(raw, str | bytes):
        if len(raw) > MAX_MESSAGE_BYTES:
            raise MessageError(f"message is larger than {MAX_MESSAGE_BYTES} bytes",
                               code="too_large")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise MessageError(f"message is not valid JSON: {exc}") from None
    else:
        data = raw
    if not isinstance(data, dict):
        raise MessageError("message must be a JSON object")
    tag = data.get("type")
    if not isinstance(tag, str):
        raise MessageError("message has no 'type' string", field="type")
    cls = _TYPES.get(tag)
    if cls is None:
        raise MessageError(f"unknown message type {tag!r}", field="type", code="unknown_type")
    if allowed is not None and cls not in allowed:
        raise MessageError(f"message type {tag!r} is not accepted on this link", field="type",
                           code="unexpected_type")
    return cls.from_dict(data)


def message_types() -> dict[str, type[Message]]:
    """Every WebSocket message type, by its ``type`` tag (for docs and tests)."""
    return dict(_TYPES)


#: What each link accepts, per direction.
DEVICE_TO_SERVER: tuple[type[Message], ...] = (
    Register, Heartbeat, Woken, Answer, FirstFrame, Stats, Hangup, Error)
SERVER_TO_DEVICE: tuple[type[Message], ...] = (
    Registered, Heartbeat, Wake, Offer, Hangup, Error)
CHILD_TO_PARENT: tuple[type[Message], ...] = (
    Announce, Directory, Heartbeat, CallSetup, Offer, Answer, CallUpdate, Hangup, Error)
PARENT_TO_CHILD: tuple[type[Message], ...] = (
    Welcome, Directory, Heartbeat, CallSetup, Offer, Answer, CallUpdate, Hangup, Error)


# --------------------------------------------------------------------------------------------
# HTTP bodies (probe <-> server).


@dataclass(frozen=True)
class CreateCall(Body):
    """``POST /v1/calls``: the caller must be a device of the server that gets the command."""

    caller: str
    callee: str
    media_mode: str = "full"  #: see MEDIA_MODES

    def __post_init__(self) -> None:
        check_address(self.caller, "caller")
        check_address(self.callee, "callee")
        check_media(self.media_mode)


@dataclass(frozen=True)
class CallInfo(Body):
    """``GET /v1/calls/{id}``: a call's state, timeline and media figures at one server."""

    call: str
    state: str
    caller: str
    callee: str
    server: str
    timeline: dict[str, float] = field(default_factory=dict)
    media: dict[str, MediaStats] = field(default_factory=dict)
    reason: str | None = None
    codec: str | None = None  #: the video codec the call's trunks carry
    #: where media is decoded and re-encoded on its way ("SERVER:KIND:DIRECTION"), if anywhere
    transcoded: list[str] = field(default_factory=list)
    server_time_ms: float | None = None  #: time the server spent on this request


@dataclass(frozen=True)
class ChildInfo(Body):
    name: str
    url: str
    devices: int


@dataclass(frozen=True)
class ServerInfo(Body):
    """``GET /v1/server``."""

    name: str
    role: ServerRole
    url: str
    parent: str | None = None
    parent_connected: bool = False
    children: list[ChildInfo] = field(default_factory=list)
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class DeviceList(Body):
    """``GET /v1/devices``: a lower server's own devices, an upper server's whole tree."""

    server: str
    devices: list[DeviceInfo] = field(default_factory=list)


@dataclass(frozen=True)
class ErrorBody(Body):
    """Every HTTP error: ``{"error": {"code", "message", "field"}}``."""

    error: Error
