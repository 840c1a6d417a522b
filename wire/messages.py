"""Every message that crosses a wire in this project, and nothing else.

Device <-> lower server and child <-> parent server speak JSON over one WebSocket each, one object
per frame, with a ``type`` field naming one of the messages below. The probe speaks HTTP + JSON to
the servers; its request and response bodies are defined here too, so the three services share one
vocabulary and nothing is spelled twice.

Messages are frozen msgspec structs. Types, patterns, bounds and lengths are checked by msgspec's
decoder as it parses (in C); what a type cannot say (no duplicate codecs, a URL's shape, the
protocol version) is checked in ``__post_init__``. A message that exists is a valid message.
:func:`decode` turns untrusted input into a message or raises :class:`MessageError`, which says
which field was wrong and why; handlers answer it with :class:`Error` and change nothing.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Collection, Iterable
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import msgspec

from wire.reasons import Code

#: Device link protocol (register.version).
PROTOCOL_VERSION = 1
#: Trunk protocol (announce.version): 2 is the tree of any depth with bounded directory updates.
TRUNK_VERSION = 2
MAX_MESSAGE_BYTES = 256 * 1024
#: What to give aiohttp as max_msg_size: it refuses a frame of exactly its limit, and the
#: protocol's limit is "at most MAX_MESSAGE_BYTES".
WS_MAX_MSG_SIZE = MAX_MESSAGE_BYTES + 1
MAX_SDP_CHARS = 64 * 1024
#: At most this many entries in each list of one directory message; more go in more messages.
MAX_DIRECTORY_ENTRIES = 500
MAX_URL_CHARS = 2048
#: Servers a call may cross (a path longer than this is a routing loop or a hostile peer).
MAX_PATH = 32
MAX_DETAIL = 300  #: characters of a hang-up's detail

# The (?!\n) refuses a trailing newline, which Python's "$" would let through; JSON Schema's
# (ECMA) "$" never matches before one, so the same pattern means the same in both.
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
NAME_PATTERN = rf"^{_NAME}$(?!\n)"
CALL_ID_PATTERN = r"^[A-Za-z0-9-]{1,64}$(?!\n)"
ADDRESS_PATTERN = rf"^({_NAME}/)?{_NAME}$(?!\n)"
SDP_PATTERN = r"^v=0"
_NAME_RE = re.compile(NAME_PATTERN)
_CALL_ID_RE = re.compile(CALL_ID_PATTERN)
_ADDRESS_RE = re.compile(ADDRESS_PATTERN)

#: What each pattern means, for error messages a person can read.
_PATTERN_TEXT = {
    NAME_PATTERN: "a name: 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit",
    CALL_ID_PATTERN: "a call id: 1-64 characters of A-Z a-z 0-9 -",
    ADDRESS_PATTERN: "SERVER/DEVICE or DEVICE, each a name of 1-64 characters of A-Z a-z 0-9 . _ -",
    SDP_PATTERN: "an SDP session description starting with 'v=0'",
}

Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
CallId = Annotated[str, msgspec.Meta(pattern=CALL_ID_PATTERN)]
Address = Annotated[str, msgspec.Meta(pattern=ADDRESS_PATTERN)]
Sdp = Annotated[str, msgspec.Meta(pattern=SDP_PATTERN, max_length=MAX_SDP_CHARS)]
#: May be empty: an empty token is no token, refused as ``unauthorized`` when auth is on.
Token = Annotated[str, msgspec.Meta(max_length=128)]
#: Seconds since the epoch on the sender's clock (finite, not negative).
Time = Annotated[float, msgspec.Meta(ge=0, lt=1e11)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Text = Annotated[str, msgspec.Meta(max_length=1024)]

DeviceState = Literal["idle", "busy"]
#: What a device is: one that speaks the device protocol ("device"), a WHIP publisher (sends,
#: receives nothing) or a WHEP viewer (receives, sends nothing), both made by a lower server
#: for an HTTP session (relay/gateway.py)
DeviceKind = Literal["device", "whip", "whep"]
Role = Literal["caller", "callee"]
ServerRole = Literal["lower", "upper"]
VideoCodec = Literal["video/VP8", "video/H264"]
MediaMode = Literal["full", "none"]
Direction = Literal["caller_to_callee", "callee_to_caller"]
TimelineEvent = Literal["t_received", "t_caller_woken", "t_routed", "t_callee_woken",
                        "t_answered", "t_media_up", "t_first_frame_callee",
                        "t_first_frame_caller", "t_end"]
#: Who started a call: the probe or another client of ``POST /v1/calls`` ("api"), or the caller
#: itself, with a ``dial`` on its device link ("device").
StartedBy = Literal["api", "device"]
#: How a device answers a wake-up as the callee: at once ("auto": synthetic devices, the
#: probe's), after ringing until a person picks up or declines ("ring"), or never ("decline").
AnswerMode = Literal["auto", "ring", "decline"]

#: Timeline events, as DESIGN.md names them; a call's timeline holds only these keys.
TIMELINE_EVENTS: tuple[str, ...] = typing.get_args(TimelineEvent)
#: Video codecs devices and servers negotiate, by mime type.
VIDEO_CODECS: tuple[str, ...] = ("video/VP8", "video/H264")
Codecs = Annotated[list[VideoCodec], msgspec.Meta(min_length=1, max_length=len(VIDEO_CODECS))]
#: "full": a real call with audio and video both ways; "none": signalling only (devices are
#: woken and acknowledge, no media leg is made), to time a server's command handling alone.
MEDIA_MODES: tuple[str, ...] = typing.get_args(MediaMode)
#: Media directions, named by who sends: ``caller_to_callee`` is measured at the callee.
DIRECTIONS: tuple[str, ...] = typing.get_args(Direction)
#: The timeline event that means media arrived in a direction: its receiver's first frame.
FIRST_FRAME: dict[str, str] = {"caller_to_callee": "t_first_frame_callee",
                               "callee_to_caller": "t_first_frame_caller"}


class MessageError(ValueError):
    """The peer sent something we cannot accept. Nothing was changed because of it."""

    def __init__(self, message: str, field: str | None = None,
                 code: Code = Code.BAD_MESSAGE, ref: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.code = code
        self.ref = ref  #: the type of the refused message, when it could be read


# --------------------------------------------------------------------------------------------
# Checks for what a type cannot say. Each raises MessageError naming the field.


def check_name(value: str, what: str) -> str:
    """A device or server name: 1-64 of letters, digits, '.', '_', '-', not starting with a sign."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise MessageError(f"{what} {value!r} is not {_PATTERN_TEXT[NAME_PATTERN]}", field=what)
    return value


def check_call_id(value: str, what: str = "call") -> str:
    if not isinstance(value, str) or not _CALL_ID_RE.match(value):
        raise MessageError(f"{what} {value!r} is not a valid call id", field=what)
    return value


def check_address(value: str, what: str) -> str:
    """A device address: ``SERVER/DEVICE``, or a bare ``DEVICE`` to be resolved in the tree."""
    if not isinstance(value, str) or not _ADDRESS_RE.match(value):
        raise MessageError(f"{what} {value!r} must be SERVER/DEVICE or DEVICE", field=what)
    return value


def split_address(address: str) -> tuple[str | None, str]:
    """``"lower-a/cam-1"`` -> ``("lower-a", "cam-1")``; ``"cam-1"`` -> ``(None, "cam-1")``."""
    server, _, device = address.rpartition("/")
    return (server or None), device


def check_url(value: str, what: str = "url") -> str:
    """A server's URL as others reach it: http(s) or ws(s), a host, printable, bounded."""
    if len(value) > MAX_URL_CHARS:
        raise MessageError(f"{what} is longer than {MAX_URL_CHARS} characters", field=what)
    if not value.isprintable() or any(c.isspace() for c in value):
        raise MessageError(f"{what} must be printable, with no spaces", field=what)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise MessageError(f"{what} {value[:80]!r} must be an http://, https://, ws:// or wss:// "
                           "URL with a host", field=what)
    return value


def _unique(codecs: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for i, codec in enumerate(codecs):
        if codec in seen:
            raise MessageError(f"{what}[{i}] {codec!r} is named twice", field=f"{what}[{i}]")
        seen.add(codec)


def _version(version: int, expected: int) -> None:
    if version != expected:
        raise MessageError(f"protocol version {version} is not supported (this server speaks "
                           f"{expected})", field="version", code=Code.UNSUPPORTED_VERSION)


# --------------------------------------------------------------------------------------------
# The base of every message and body.


class Body(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every message and body: conversion to and from plain JSON objects."""

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]

    def to_json(self) -> str:
        return _ENCODER.encode(self).decode()

    @classmethod
    def from_dict(cls, data: Any) -> typing.Self:
        """Check a plain object (a parsed HTTP body) against this type."""
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise _message_error(exc) from None


_ENCODER = msgspec.json.Encoder()


def _message_error(exc: msgspec.ValidationError, ref: str | None = None) -> MessageError:
    """msgspec's error, with the field it names (``$.devices[0].server`` -> ``devices[0].server``)
    as ``field``, our own code and field when a ``__post_init__`` check raised, and patterns put
    in words."""
    text = str(exc)
    path = None
    key = re.fullmatch(r"(.*) - at `key` in `\$\.?(.*)`", text, re.S)
    if key:  # a dict key that is not allowed, e.g. an unknown timeline event
        path = key.group(2) or None
        name = re.search(r"'(.*)'", key.group(1))
        if name:
            where = ".".join(p for p in (path, name.group(1)) if p)
            return MessageError(f"{path or 'object'}: unknown key {name.group(1)!r}",
                                field=where, ref=ref)
        text = key.group(1)
    head, sep, at = text.rpartition(" - at `$")
    if sep:
        text, path = head, at.rstrip("`").lstrip(".") or None
    cause = exc.__cause__
    if isinstance(cause, MessageError):
        field = ".".join(p for p in (path, cause.field) if p) or None
        return MessageError(cause.message, field=field, code=cause.code, ref=ref)
    missing = re.match(r"Object missing required field `(.+)`", text)
    if missing:
        field = ".".join(p for p in (path, missing.group(1)) if p)
        return MessageError(f"missing field {missing.group(1)!r}", field=field, ref=ref)
    unknown = re.match(r"Object contains unknown field `(.+)`", text)
    if unknown:
        field = ".".join(p for p in (path, unknown.group(1)) if p)
        return MessageError(f"unknown field {unknown.group(1)!r}", field=field, ref=ref)
    for pattern, words in _PATTERN_TEXT.items():
        text = text.replace(f"`str` matching regex {pattern!r}", words)
    text = text[0].lower() + text[1:] if text else "invalid"
    return MessageError(f"{path}: {text}" if path else text, field=path, ref=ref)


# --------------------------------------------------------------------------------------------
# Parts shared by several messages.


class DeviceInfo(Body, frozen=True):
    """A device as its server and the directory describe it."""

    id: Name
    server: Name
    state: DeviceState = "idle"
    #: video codecs the device takes, in its order of preference
    codecs: Codecs = msgspec.field(default_factory=lambda: list(VIDEO_CODECS))
    #: SERVER/DEVICE (filled in; checked when given)
    address: str = ""
    kind: DeviceKind = "device"

    def __post_init__(self) -> None:
        _unique(self.codecs, "codecs")
        address = f"{self.server}/{self.id}"
        if not self.address:
            msgspec.structs.force_setattr(self, "address", address)
        elif self.address != address:
            raise MessageError(f"address {self.address!r} is not {address!r}", field="address")


class ServerEntry(Body, frozen=True):
    """A server of the tree, as the directory describes it."""

    name: Name
    role: ServerRole
    url: str
    parent: Name | None = None  #: its parent server; None for the root

    def __post_init__(self) -> None:
        check_url(self.url)


class DevicePart(Body, frozen=True):
    """A device's own part of one direction's video latency, per frame, on its clock: the
    sender's (frame captured -> its last packet sent) or the receiver's (first packet in ->
    frame decoded)."""

    frames: Count = 0
    mean_ms: Annotated[float, msgspec.Meta(ge=0, lt=1e9)] | None = None
    p50_ms: Annotated[float, msgspec.Meta(ge=0, lt=1e9)] | None = None
    #: the sender only: does its encoder follow the rate the path reports (REMB)? A
    #: pre-encoded or packet source cannot
    adapts: bool | None = None
    target_kbps: Annotated[float, msgspec.Meta(ge=0, lt=1e9)] | None = None  #: its encoder's
    reported_kbps: Annotated[float, msgspec.Meta(ge=0, lt=1e9)] | None = None  #: the last REMB
    restarts: Count = 0  #: targets taken: each restarts aiortc's encoder, with a keyframe


class MediaWindow(Body, frozen=True):
    """What one device received in the last stats interval (about a second): media over time."""

    seconds: Annotated[float, msgspec.Meta(ge=0, lt=1e9)] = 0.0
    frames: Count = 0
    frames_lost: Count = 0
    gaps: Count = 0
    latency_ms_p50: Annotated[float, msgspec.Meta(lt=1e9)] | None = None
    latency_ms_p95: Annotated[float, msgspec.Meta(lt=1e9)] | None = None


class MediaStats(Body, frozen=True):
    """What one device measured of the media it received in one call (one direction)."""

    frames: Count = 0  #: video frames decoded (stamped or not)
    frames_lost: Count = 0  #: stamped frames never seen (gaps in the frame counter)
    unreadable: Count = 0  #: of the decoded frames, those without a readable stamp
    fps: Annotated[float, msgspec.Meta(ge=0, lt=1e6)] = 0.0  #: decoded frames a second
    latency_ms_p50: Annotated[float, msgspec.Meta(lt=1e9)] | None = None  #: stamp -> decoded
    latency_ms_p95: Annotated[float, msgspec.Meta(lt=1e9)] | None = None
    latency_ms_max: Annotated[float, msgspec.Meta(lt=1e9)] | None = None
    gaps: Count = 0  #: freezes: inter-frame gap >= max(3 x mean interval, mean + 150 ms)
    #: of the freezes, those the sending device made: its own send times of the two frames
    #: were at least half the freeze apart (the source stalled, not the path)
    gaps_source: Count = 0
    audio_frames: Count = 0  #: audio frames received
    audio_level_dbfs: Annotated[float, msgspec.Meta(gt=-1e6, lt=1e6)] | None = None
    duration_s: Annotated[float, msgspec.Meta(ge=0, lt=1e9)] = 0.0  #: first frame -> report
    latency_ms_mean: Annotated[float, msgspec.Meta(lt=1e9)] | None = None
    receiver: DevicePart | None = None  #: this device's own part (decoded media only)
    window: MediaWindow | None = None  #: the last stats interval alone
    #: picture quality against the source (synthetic pictures only, sampled: endpoint/quality.py):
    #: the mean and least PSNR (dB, of luma; 100 for a perfect copy) and SSIM, and the samples
    psnr_db: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None
    psnr_db_min: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None
    ssim: Annotated[float, msgspec.Meta(ge=-1, le=1)] | None = None
    ssim_min: Annotated[float, msgspec.Meta(ge=-1, le=1)] | None = None
    quality_samples: Count = 0
    #: audio (endpoint/meter.py AudioMeter): frames lost (RTP timestamp gaps: aiortc conceals
    #: none), RFC 3550 jitter on delivery, and the synthetic tone's timing marks, one a
    #: second (endpoint/audiomark.py): read back, lost, latency mark sent -> decoded here
    audio_frames_lost: Count = 0
    audio_jitter_ms: Annotated[float, msgspec.Meta(ge=0, lt=1e9)] | None = None
    audio_marks: Count = 0
    audio_marks_lost: Count = 0
    audio_latency_ms_p50: Annotated[float, msgspec.Meta(lt=1e9)] | None = None
    audio_latency_ms_p95: Annotated[float, msgspec.Meta(lt=1e9)] | None = None
    #: lip sync: audio latency - video latency of the same moment (median over the marks):
    #: positive, the sound comes after the picture; negative, before it
    av_sync_ms: Annotated[float, msgspec.Meta(gt=-1e9, lt=1e9)] | None = None
    av_sync_samples: Count = 0
    #: the call score: MOS from the E-model on audio latency, jitter and loss (endpoint/emodel.py)
    mos: Annotated[float, msgspec.Meta(ge=1, le=4.5)] | None = None


# --------------------------------------------------------------------------------------------
# WebSocket messages. Each has a type tag; decode() picks the class by it.


HangupBy = Literal["probe", "caller", "callee"]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=86_400)]


class Script(Body, frozen=True):
    """What scripted devices do in a call: a load's scenario step by step (``probe load
    --scenario``, wire/scenario.py). It travels with the call (``POST /v1/calls``, then
    ``call_setup``) to both devices' ``wake``. A device that rings for a person
    (``--answer ring``) ignores it; so may any device nobody here wrote."""

    #: the callee rings this long before it answers (or declines)
    ring_s: Seconds = 0.0
    #: the callee declines once it has rung (the call ends ``declined``)
    decline: bool = False
    #: who hangs up: the probe (``DELETE``), or the caller's or the callee's device itself
    hangup_by: HangupBy = "probe"
    #: that device hangs up this long after its first frame (the call's hold time)
    hold_s: Seconds = 0.0


class Message(Body, frozen=True, tag_field="type"):
    TYPE: ClassVar[str] = ""


# Per-hop figures (relay/hops.py measures them; docs/probe.md says what is measured where).

Ms = Annotated[float, msgspec.Meta(ge=0, lt=1e9)]
MediaKind = Literal["audio", "video"]


class StreamHop(Body, frozen=True):
    """One kind of media in one direction at one server: what arrived from the previous hop,
    and how long the server held it (on the server's own clock)."""

    packets: Count = 0  #: RTP packets that arrived (originals, not retransmissions)
    bytes: Count = 0
    bitrate_kbps: Ms = 0.0  #: over the time packets arrived
    lost: Count = 0  #: sequence gaps before repair (expected - arrived)
    repaired: Count = 0  #: retransmissions (RTX) that arrived
    jitter_ms: Ms | None = None  #: RFC 3550 interarrival jitter
    #: kernel arrival -> departure on the other leg, sampled packets; None on no sample
    transit_ms_mean: Ms | None = None
    transit_ms_p50: Ms | None = None
    transit_ms_p95: Ms | None = None
    transit_ms_p99: Ms | None = None
    transit_ms_max: Ms | None = None
    transit_samples: Count = 0
    keyframes_in: Count = 0  #: PLI/FIR from downstream
    keyframes_out: Count = 0  #: PLI sent upstream
    nacks_in: Count = 0  #: packets downstream asked for again
    nacks_out: Count = 0  #: NACKs sent upstream for missing packets
    #: the bitrate of what arrived since the previous report (about a second)
    recent_kbps: Ms | None = None
    #: congestion control (video): this hop's estimate of the leg the stream arrives on (its
    #: path from the sending device, in fact: forwarded packets keep the device's
    #: abs-send-time), the last report from the hop downstream, and the least of the two,
    #: reported upstream; ``limited_by`` says which one it was
    estimate_kbps: Ms | None = None
    downstream_kbps: Ms | None = None
    reported_kbps: Ms | None = None
    limited_by: Literal["own", "downstream"] | None = None
    #: times this hop's estimate found the queue on the stream's path growing (overuse, each
    #: a fall of the estimate): the hops past the narrowest link see it, those before do not
    overuses: Count = 0
    #: video: why the sender of the stream arriving here cannot follow the path's rate, read
    #: from its own description of the stream (no abs-send-time, no goog-remb, transport-cc
    #: only); None when it can, or when this server cannot tell
    cannot_adapt: Annotated[str, msgspec.Meta(max_length=300)] | None = None


class LegHop(Body, frozen=True):
    """One of a server's two legs of a call: its round trip and its setup."""

    toward: Role  #: the side of the call the leg faces
    peer: Annotated[str, msgspec.Meta(max_length=200)]  #: a server name or a device address
    rtt_ms: Ms | None = None  #: from RTCP sender/receiver reports, smoothed (aiortc's)
    rtt_min_ms: Ms | None = None  #: the least of those round trips: the link's own
    ice_ms: Ms | None = None  #: leg made -> ICE connected (answer_ms aside)
    dtls_ms: Ms | None = None  #: leg made -> DTLS done: the leg can carry media (answer_ms aside)
    #: this leg's offer out -> its answer in: the far end's time (a device that rings holds
    #: the offer until a person answers), so not counted in ice_ms and dtls_ms
    answer_ms: Ms | None = None
    #: what the far end reported receiving of this leg's video (RTCP receiver reports)
    far_lost: Count | None = None
    far_jitter_ms: Ms | None = None


class HopFigures(Body, frozen=True):
    """A server's own part of one call, as it measured it."""

    server: Name
    at: Time  #: when measured, on the server's clock
    streams: Annotated[dict[Direction, dict[MediaKind, StreamHop]], msgspec.Meta(
        max_length=2)] = {}
    legs: Annotated[list[LegHop], msgspec.Meta(max_length=2)] = []


class LinkDirection(Body, frozen=True):
    """What crossed one link in one direction (video), as its receiving end saw it."""

    packets: Count = 0
    lost: Count = 0
    jitter_ms: Ms | None = None


class LinkFigures(Body, frozen=True, rename={"from_": "from"}):
    """One link between two neighbours of a call's path (a device and its server, or two
    servers): round trip, setup, and per direction what arrived. ``one_way_ms`` is an
    estimate: half the round trip."""

    from_: Annotated[str, msgspec.Meta(max_length=200)]
    to: Annotated[str, msgspec.Meta(max_length=200)]
    rtt_ms: Ms | None = None
    one_way_ms: Ms | None = None
    setup_ms: Ms | None = None
    directions: dict[Direction, LinkDirection] = {}


class Error(Message, frozen=True, tag="error"):
    """Answer to a message that was refused; ``field`` names the part that was wrong."""

    code: Code
    message: Text
    field: Text | None = None
    call: CallId | None = None
    ref: Text | None = None  #: the type of the refused message, when known

    @classmethod
    def from_exception(cls, exc: MessageError, ref: str | None = None,
                       call: str | None = None) -> Error:
        ref = ref or exc.ref
        return cls(code=exc.code, message=exc.message[:1024],
                   field=exc.field[:1024] if exc.field else None, call=call,
                   ref=ref[:64] if ref else None)


class Heartbeat(Message, frozen=True, tag="heartbeat"):
    """Either side, any time; the other side answers with the same ``seq``."""

    seq: Annotated[int, msgspec.Meta(ge=0, lt=2**53)] = 0


# Device -> lower server.


class Register(Message, frozen=True, tag="register"):
    """First message of a device: claims an id, unique on this server."""

    device: Name
    version: int = PROTOCOL_VERSION
    #: video codecs the device can send and receive, in its order of preference
    codecs: Codecs = msgspec.field(default_factory=lambda: list(VIDEO_CODECS))
    token: Token | None = None  #: HMAC credential for "device:ID" when auth is on (wire/auth.py)

    def __post_init__(self) -> None:
        _unique(self.codecs, "codecs")
        _version(self.version, PROTOCOL_VERSION)


class Registered(Message, frozen=True, tag="registered"):
    server: Name
    device: Name
    address: Address
    heartbeat_s: float


class _Moment(Message, frozen=True):
    """Something that happened at a device during a call, at ``at`` on the device's clock."""

    call: CallId
    at: Time


class Woken(_Moment, frozen=True, tag="woken"):
    """The device acknowledges a wake-up. A callee that rings (``ringing``) answers later with
    ``pickup``, or declines with ``hangup`` (reason ``declined``); one that does not ring has
    answered with this (``t_answered`` is ``t_callee_woken``)."""

    ringing: bool = False


class Pickup(_Moment, frozen=True, tag="pickup"):
    """A ringing callee was answered (by a person, or its script): ``t_answered``. Its SDP
    answer follows."""


class Dial(Message, frozen=True, tag="dial"):
    """The device starts a call to ``callee``, as ``POST /v1/calls`` would with this device as
    the caller. Answered with ``dialed`` (then the wake-up, as for any call) or an ``error``
    with the refusal's code (ref ``dial``)."""

    callee: Address
    media_mode: MediaMode = "full"
    #: the device's own number for this request, given back in ``dialed``
    seq: Annotated[int, msgspec.Meta(ge=0, lt=2**53)] = 0
    #: what scripted devices do in this call (a scenario: ``endpoint --call --scenario``)
    script: Script | None = None
    #: the ``place_call`` this dial carries out (its ``ref``), when the server asked for it
    ref: Annotated[int, msgspec.Meta(ge=0, lt=2**53)] | None = None


class FirstFrame(_Moment, frozen=True, tag="first_frame"):
    """The device decoded the first video frame of the other party."""


class Stats(Message, frozen=True, tag="stats"):
    """The device's figures for the media it received in this call so far, and its own part
    of the media it sent."""

    call: CallId
    media: MediaStats
    sender: DevicePart | None = None


# Lower server -> device.


class PlaceCall(Message, frozen=True, tag="place_call"):
    """The server asks a scripted device to dial ``callee`` itself (``POST /v1/calls`` with
    ``dial_from: device``: a probe scenario's dial from the device). A device that follows
    scripts answers with ``dial`` carrying ``ref``, within 5 s; any other answers ``error``
    (or nothing) and the command is refused ``no_dial``."""

    callee: Address
    ref: Annotated[int, msgspec.Meta(ge=0, lt=2**53)]
    media_mode: MediaMode = "full"
    script: Script | None = None


class Dialed(Message, frozen=True, tag="dialed"):
    """A ``dial`` was taken: the call's id (its wake-up follows)."""

    call: CallId
    callee: Address  #: as the dial named it
    seq: Annotated[int, msgspec.Meta(ge=0, lt=2**53)] = 0


class Wake(Message, frozen=True, tag="wake"):
    """Wake a device for a call; it answers with Woken, then gets an Offer."""

    call: CallId
    role: Role
    peer: Address  #: the address of the other party
    media_mode: MediaMode = "full"  #: "none": acknowledge only, no offer follows
    #: what a scripted device does in this call (a load's scenario); None: what it always does
    script: Script | None = None


# Both ways, on device and trunk links.


class _Description(Message, frozen=True):
    """An SDP description for one leg of a call (every ICE candidate included: no trickle)."""

    call: CallId
    leg: CallId
    sdp: Sdp


class Offer(_Description, frozen=True, tag="offer"):
    """The offer of a leg: the side nearer the caller makes it, or the server to a device."""


class Answer(_Description, frozen=True, tag="answer"):
    """The SDP answer to an Offer."""


class Hangup(Message, frozen=True, tag="hangup"):
    """End a call; travels along the call's path away from whoever ended it."""

    call: CallId
    reason: Code  #: wire/reasons.py
    #: a call turned away before it was routed: the servers it reached, the last one refusing
    path: Annotated[list[Name], msgspec.Meta(max_length=MAX_PATH)] | None = None
    #: what exactly went wrong, for a person (which server's leg failed and how)
    detail: Annotated[str, msgspec.Meta(max_length=MAX_DETAIL)] | None = None


# Child <-> parent (trunk).


class Announce(Message, frozen=True, tag="announce"):
    """A server's first message on the trunk to its parent: who it is. Its subtree follows as
    directory increments once welcomed."""

    server: Name
    url: str
    role: ServerRole = "lower"
    version: int = TRUNK_VERSION
    token: Token | None = None  #: HMAC credential for "server:NAME" when auth is on

    def __post_init__(self) -> None:
        _version(self.version, TRUNK_VERSION)
        check_url(self.url)


class Welcome(Message, frozen=True, tag="welcome"):
    """The parent accepted an Announce."""

    server: Name


class Directory(Message, frozen=True, tag="directory"):
    """Bounded increments of the directory (relay/directory.py).

    Up the tree (child -> parent): servers of the child's subtree and their devices. Down (parent
    -> child): the servers of the rest of the tree, never devices. Each list holds at most
    MAX_DIRECTORY_ENTRIES; a removed server takes its devices with it.
    """

    servers: Annotated[list[ServerEntry],
                       msgspec.Meta(max_length=MAX_DIRECTORY_ENTRIES)] = []
    servers_removed: Annotated[list[Name], msgspec.Meta(max_length=MAX_DIRECTORY_ENTRIES)] = []
    devices: Annotated[list[DeviceInfo], msgspec.Meta(max_length=MAX_DIRECTORY_ENTRIES)] = []
    #: addresses SERVER/DEVICE
    devices_removed: Annotated[list[Address],
                               msgspec.Meta(max_length=MAX_DIRECTORY_ENTRIES)] = []

    @property
    def empty(self) -> bool:
        return not (self.servers or self.servers_removed or self.devices
                    or self.devices_removed)

    @property
    def size(self) -> int:
        return (len(self.servers) + len(self.servers_removed) + len(self.devices)
                + len(self.devices_removed))


Path = Annotated[list[Name], msgspec.Meta(min_length=1, max_length=MAX_PATH)]
#: The directions a call carries media in: both, unless a party only sends (a WHIP publisher)
#: or only receives (a WHEP viewer)
Directions = Annotated[list[Direction], msgspec.Meta(min_length=1, max_length=2)]


class CallSetup(Message, frozen=True, tag="call_setup"):
    """A call entering the next server on its path: route it on toward the callee."""

    call: CallId
    caller: Address  #: SERVER/DEVICE
    callee: Address  #: SERVER/DEVICE, or a bare DEVICE resolved on the way
    path: Path  #: the servers crossed so far, from the caller's
    #: the caller's video codecs in its order of preference; the callee's server picks one
    codecs: Codecs = msgspec.field(default_factory=lambda: list(VIDEO_CODECS))
    media_mode: MediaMode = "full"
    started_by: StartedBy = "api"
    #: the directions the caller's side can carry (the callee's server narrows them)
    directions: Directions = msgspec.field(default_factory=lambda: list(DIRECTIONS))
    #: the call's script, for the callee's wake-up (``POST /v1/calls`` ``script``)
    script: Script | None = None

    def __post_init__(self) -> None:
        _unique(self.codecs, "codecs")
        _unique(self.directions, "directions")


class CallAccept(Message, frozen=True, tag="call_accept"):
    """The callee's server took the call; travels back to the caller's server. Every server it
    passes starts its legs with ``codec``."""

    call: CallId
    callee: Address  #: SERVER/DEVICE, resolved
    codec: VideoCodec  #: the video codec every trunk of the call carries
    path: Path  #: every server of the call, from the caller's to the callee's
    #: the directions the call carries media in: what makes it active is the first frame of
    #: each (docs/protocol.md)
    directions: Directions = msgspec.field(default_factory=lambda: list(DIRECTIONS))

    def __post_init__(self) -> None:
        _unique(self.directions, "directions")


class CallUpdate(Message, frozen=True, tag="call_update"):
    """Timeline events and media figures of a call, passed along its path to every server."""

    call: CallId
    events: dict[TimelineEvent, Time] = {}
    media: dict[Direction, MediaStats] = {}
    #: "SERVER:KIND:DIRECTION"
    transcoded: Annotated[list[Annotated[str, msgspec.Meta(max_length=200)]],
                          msgspec.Meta(max_length=8)] = []
    #: servers' own figures of the call, by server (each server sends only its own)
    hops: Annotated[dict[Name, HopFigures], msgspec.Meta(max_length=MAX_PATH)] = {}
    #: the sending device's own part of each direction
    senders: dict[Direction, DevicePart] = {}


def _registry(*classes: type[Message]) -> dict[str, type[Message]]:
    """Every message type by its tag. A tag used twice is a bug, found when the module loads."""
    types: dict[str, type[Message]] = {}
    for cls in classes:
        tag = cls.__struct_config__.tag
        if not isinstance(tag, str) or not tag:
            raise TypeError(f"{cls.__name__} has no type tag")
        if tag in types:
            raise TypeError(f"message type {tag!r} is defined twice: {types[tag].__name__} "
                            f"and {cls.__name__}")
        cls.TYPE = tag
        types[tag] = cls
    return types


_TYPES = _registry(Error, Heartbeat, Register, Registered, Woken, Pickup, Dial, Dialed, PlaceCall,
                   FirstFrame, Stats, Wake, Offer, Answer, Hangup, Announce, Welcome, Directory,
                   CallSetup, CallAccept, CallUpdate)
_DECODER = msgspec.json.Decoder(typing.Union[tuple(_TYPES.values())])  # type: ignore[misc]  # noqa: UP007
_TAG = re.compile(rb'"type"\s*:\s*"([A-Za-z0-9_]{1,64})"')


def decode(raw: str | bytes, allowed: Collection[type[Message]] | None = None) -> Message:
    """Parse one WebSocket frame. Raises MessageError naming what is wrong."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message is larger than {MAX_MESSAGE_BYTES} bytes", code=Code.TOO_LARGE)
    data = raw.encode() if isinstance(raw, str) else raw
    try:
        message = _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        found = _TAG.search(data[:4096])
        ref = found.group(1).decode() if found else None
        error = _message_error(exc, ref)
        if error.field == "type" and "invalid value" in error.message:
            error.code = Code.UNKNOWN_TYPE
            error.message = f"unknown message type {ref!r}" if ref else "unknown message type"
        elif error.field == "type" and error.message.startswith("missing"):
            error.message = "message has no 'type' string"
        elif not error.field and "expected `object`" in error.message:
            error.message = "message must be a JSON object"
        raise error from None
    except msgspec.DecodeError as exc:
        raise MessageError(f"message is not valid JSON: {exc}") from None
    except RecursionError:
        raise MessageError("message is nested too deeply") from None
    if allowed is not None and type(message) not in allowed:
        raise MessageError(f"message type {message.TYPE!r} is not accepted on this link",
                           field="type", code=Code.UNEXPECTED_TYPE, ref=message.TYPE)
    return message


def message_types() -> dict[str, type[Message]]:
    """Every WebSocket message type, by its ``type`` tag (for docs and tests)."""
    return dict(_TYPES)


#: What each link accepts, per direction.
DEVICE_TO_SERVER: tuple[type[Message], ...] = (
    Register, Heartbeat, Woken, Pickup, Dial, Answer, FirstFrame, Stats, Hangup, Error)
SERVER_TO_DEVICE: tuple[type[Message], ...] = (
    Registered, Heartbeat, Wake, Dialed, PlaceCall, Offer, Hangup, Error)
CHILD_TO_PARENT: tuple[type[Message], ...] = (
    Announce, Directory, Heartbeat, CallSetup, CallAccept, Offer, Answer, CallUpdate, Hangup,
    Error)
PARENT_TO_CHILD: tuple[type[Message], ...] = (
    Welcome, Directory, Heartbeat, CallSetup, CallAccept, Offer, Answer, CallUpdate, Hangup,
    Error)


# --------------------------------------------------------------------------------------------
# HTTP bodies (probe <-> server).


class CreateCall(Body, frozen=True):
    """``POST /v1/calls``: the caller must be a device of the server that gets the command."""

    caller: Address
    callee: Address
    media_mode: MediaMode = "full"
    #: what scripted devices do in this call (ring, decline, who hangs up, when)
    script: Script | None = None
    #: "device": the caller's server asks the caller to dial the call itself (``place_call``)
    #: and answers with the call it dialed (``started_by: device``), or ``no_dial``
    dial_from: Literal["api", "device"] = "api"


class CallInfo(Body, frozen=True):
    """``GET /v1/calls/{id}``: a call's state, timeline and media figures at one server."""

    call: CallId
    #: where the call stands here (wire/states.py CallState: waiting for the wake-ups, ringing,
    #: connecting, active, ending while its legs close, ended)
    state: Literal["waking", "ringing", "connecting", "active", "ending", "ended"]
    caller: Address
    callee: Address
    server: Name
    #: the servers the call crosses, from the caller's to the callee's (known once routed)
    path: list[Name] = []
    #: "api" (``POST /v1/calls``) or "device" (the caller dialed); known at the caller's server
    started_by: StartedBy = "api"
    timeline: dict[str, float] = {}
    media: dict[str, MediaStats] = {}
    reason: str | None = None
    #: what exactly ended the call, for a person (which server's leg failed and how), if known
    detail: str | None = None
    codec: str | None = None  #: the video codec the call's trunks carry
    #: the directions the call carries media in (one only with a WHIP or WHEP party)
    directions: list[Direction] = msgspec.field(default_factory=lambda: list(DIRECTIONS))
    #: where media is decoded and re-encoded on its way ("SERVER:KIND:DIRECTION"), if anywhere
    transcoded: list[str] = []
    server_time_ms: float | None = None  #: time the server spent on this request
    #: each server's own figures, in path order (those heard of so far)
    hops: list[HopFigures] = []
    #: each link of the path, device to device, from the hops' figures
    links: list[LinkFigures] = []
    #: the sending device's own part of each direction (the receiver's is in ``media``)
    senders: dict[Direction, DevicePart] = {}


class CallList(Body, frozen=True):
    """``GET /v1/calls``: the calls in progress at one server."""

    server: Name
    calls: list[CallInfo] = []


class ChildInfo(Body, frozen=True):
    name: Name
    role: ServerRole
    url: str
    devices: int  #: devices in the child's subtree


class ServerInfo(Body, frozen=True):
    """``GET /v1/server``."""

    name: Name
    role: ServerRole
    url: str
    parent: str | None = None  #: the parent's URL, as configured
    parent_name: Name | None = None  #: the parent's name, once welcomed
    parent_connected: bool = False
    children: list[ChildInfo] = []
    version: int = PROTOCOL_VERSION


class ServerList(Body, frozen=True):
    """``GET /v1/servers``: every server of the tree this server knows, itself included."""

    server: Name
    servers: list[ServerEntry] = []


class DeviceList(Body, frozen=True):
    """``GET /v1/devices``: a lower server's own devices, an upper server's whole subtree."""

    server: Name
    devices: list[DeviceInfo] = []


# --------------------------------------------------------------------------------------------
# HTTP bodies (probe <-> probe: a capacity search shared by a fleet of probes, probe/fleet.py).

Rate = Annotated[float, msgspec.Meta(gt=0, le=1e6)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=1e6)]
Shards = Annotated[int, msgspec.Meta(ge=1, le=10_000)]


class FleetStep(Body, frozen=True):
    """One step of the search: the load every shard runs, on one schedule from ``start_at``.
    The leader's say overrides the followers' own arguments for these."""

    server: Name  #: the server searched
    rate: Rate
    duration_s: Annotated[float, msgspec.Meta(gt=0, le=1e6)]
    hold_s: Seconds
    start_at: Time  #: the schedule's start, UNIX time (the shards' clocks must agree)
    via: bool = False  #: as a transit (every call crosses it), else as the callers' server
    poisson: bool = False
    seed: int | None = None
    media: MediaMode = "full"


class FleetOrder(Body, frozen=True):
    """``GET /fleet/v1/orders/{step}``: what every shard does at ``step``: run ``run``; or, with
    ``run`` null, stop: the search is over and ``verdict`` is the fleet's result."""

    step: Count
    count: Shards  #: shards in the fleet
    run: FleetStep | None = None
    #: when over: the search's result as the leader's summary has it (``capacity``,
    #: ``capacity_steps``, ``valid``, ``objective_met``, ``objective_missed``)
    verdict: dict[str, Any] = {}


class FleetResult(Body, frozen=True):
    """``POST /fleet/v1/results/{step}``: a follower's part of a step, its load run's summary
    (probe/load.py ``LoadReport.summary``: counts and histograms, which merge exactly)."""

    step: Count
    shard: Count
    count: Shards
    run: dict[str, Any]


class ErrorBody(Body, frozen=True):
    """Every HTTP error: ``{"error": {"code", "message", "field"}}``."""

    error: Error
