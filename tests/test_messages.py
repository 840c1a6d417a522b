"""Wire messages: every bad input is refused with the field named; good input round-trips."""

from __future__ import annotations

import json

import msgspec
import pytest

from wire.messages import (
    CHILD_TO_PARENT,
    DEVICE_TO_SERVER,
    Announce,
    CallAccept,
    CallSetup,
    CallUpdate,
    CreateCall,
    DeviceInfo,
    Directory,
    Hangup,
    MediaStats,
    Message,
    MessageError,
    Offer,
    Register,
    ServerEntry,
    Stats,
    Wake,
    _registry,
    decode,
    message_types,
    split_address,
)

SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\n"


@pytest.mark.parametrize("message", [
    Register(device="cam-1"),
    Wake(call="abc", role="caller", peer="lower-b/cam-2"),
    Offer(call="abc", leg="abc", sdp=SDP),
    Hangup(call="abc", reason="hangup"),
    Stats(call="abc", media=MediaStats(frames=3, latency_ms_p50=12.5)),
    Announce(server="lower-a", url="http://x:8080", role="upper"),
    Directory(devices=[DeviceInfo(id="cam-1", server="lower-a", state="busy")],
              devices_removed=["lower-a/cam-2"], servers_removed=["lower-z"],
              servers=[ServerEntry(name="mid-1", role="upper", url="http://m:1", parent="root")]),
    CallSetup(call="abc", caller="lower-a/cam-1", callee="cam-2", path=["lower-a", "mid-1"]),
    CallAccept(call="abc", callee="lower-b/cam-2", codec="video/H264",
               path=["lower-a", "root", "lower-b"]),
    CallUpdate(call="abc", events={"t_routed": 1.5},
               media={"caller_to_callee": MediaStats(frames=1)}),
])
def test_round_trip(message):
    assert decode(message.to_json()) == message


@pytest.mark.parametrize("raw, field, code", [
    ("not json", None, "bad_message"),
    ("[1, 2]", None, "bad_message"),
    ('{"device": "x"}', "type", "bad_message"),
    ('{"type": "nope"}', "type", "unknown_type"),
    ('{"type": "register"}', "device", "bad_message"),
    ('{"type": "register", "device": 5}', "device", "bad_message"),
    ('{"type": "register", "device": "bad id!"}', "device", "bad_message"),
    ('{"type": "register", "device": "cam", "extra": 1}', "extra", "bad_message"),
    ('{"type": "register", "device": "cam", "version": 99}', "version", "unsupported_version"),
    ('{"type": "wake", "call": "c1", "role": "boss", "peer": "a/b"}', "role", "bad_message"),
    ('{"type": "wake", "call": "c1", "role": "caller", "peer": "a/b/c"}', "peer", "bad_message"),
    ('{"type": "offer", "call": "c1", "leg": "c1", "sdp": "hello"}', "sdp", "bad_message"),
    ('{"type": "woken", "call": "c1", "at": -1}', "at", "bad_message"),
    ('{"type": "woken", "call": "c1", "at": true}', "at", "bad_message"),
    ('{"type": "call_update", "call": "c1", "events": {"t_bogus": 1}}', "events.t_bogus",
     "bad_message"),
    ('{"type": "stats", "call": "c1", "media": {"frames": -1}}', "media.frames", "bad_message"),
    ('{"type": "stats", "call": "c1", "media": {"frames": "x"}}', "media.frames", "bad_message"),
    ('{"type": "directory", "devices": [{"id": "d", "server": "b", "address": "x/d"}]}',
     "devices[0].address", "bad_message"),
    # a trailing newline is not part of a name (Python's "$" would let it through)
    ('{"type": "register", "device": "cam-1\\n"}', "device", "bad_message"),
    ('{"type": "hangup", "call": "c1\\n", "reason": "hangup"}', "call", "bad_message"),
    ('{"type": "register", "device": "cam", "codecs": ["video/VP8", "video/VP8"]}',
     "codecs[1]", "bad_message"),
    ('{"type": "register", "device": "cam", "codecs": []}', "codecs", "bad_message"),
    ('{"type": "hangup", "call": "c1", "reason": "because"}', "reason", "bad_message"),
    ('{"type": "announce", "server": "a", "url": "javascript:alert(1)"}', "url", "bad_message"),
    ('{"type": "announce", "server": "a", "url": ""}', "url", "bad_message"),
    ('{"type": "announce", "server": "a", "url": "http://x/\\u0000"}', "url", "bad_message"),
    ('{"type": "announce", "server": "a", "url": "http://x", "version": 1}', "version",
     "unsupported_version"),
    ('{"type": "call_setup", "call": "c", "caller": "a/b", "callee": "c", "path": []}', "path",
     "bad_message"),
])
def test_refused_with_field(raw, field, code):
    with pytest.raises(MessageError) as caught:
        decode(raw)
    assert caught.value.field == field
    assert caught.value.code == code
    assert caught.value.message


def test_link_direction_is_enforced():
    with pytest.raises(MessageError) as caught:
        decode(Wake(call="c", role="caller", peer="a/b").to_json(), DEVICE_TO_SERVER)
    assert caught.value.code == "unexpected_type"
    assert isinstance(decode(Register(device="x").to_json(), DEVICE_TO_SERVER), Register)
    with pytest.raises(MessageError):
        decode(Register(device="x").to_json(), CHILD_TO_PARENT)


def test_oversized_frame_refused():
    with pytest.raises(MessageError) as caught:
        decode('{"type": "register", "device": "' + "x" * 300_000 + '"}')
    assert caught.value.code == "too_large"


def subclasses(cls: type) -> set[type]:
    return {c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))}


def test_every_message_class_is_registered_under_its_own_tag():
    types = message_types()
    defined = {c for c in subclasses(Message)  # the module's own; _Bases are not messages
               if c.__module__ == "wire.messages" and not c.__name__.startswith("_")}
    assert set(types.values()) == defined  # none left out of the decoder
    for tag, cls in types.items():
        assert cls.TYPE == tag
        assert cls.__struct_config__.tag == tag


def test_a_tag_used_twice_is_refused_when_the_module_loads():
    class Again(Message, frozen=True, tag="register"):
        pass

    with pytest.raises(TypeError, match="defined twice"):
        _registry(Register, Again)


def test_deep_nesting_is_refused_with_a_reason_not_a_crash():
    for depth in (1_000, 2_000, 100_000):
        raw = '{"type": "stats", "call": "c1", "media": ' + "[" * depth + "]" * depth + "}"
        with pytest.raises(MessageError) as caught:
            decode(raw)
        assert caught.value.message and caught.value.ref == "stats"


def test_an_http_body_is_checked_as_strictly_as_a_frame():
    with pytest.raises(MessageError) as caught:
        CreateCall.from_dict({"caller": "lower-a/cam-1", "callee": "x", "bogus": 1})
    assert caught.value.field == "bogus"
    with pytest.raises(MessageError) as caught:
        CreateCall.from_dict({"caller": "a/b/c", "callee": "x"})
    assert caught.value.field == "caller" and "SERVER/DEVICE" in caught.value.message
    assert isinstance(msgspec.json.encode(CreateCall(caller="a/b", callee="c")), bytes)


def test_create_call_body_and_addresses():
    assert CreateCall.from_dict({"caller": "lower-a/cam-1", "callee": "cam-2"}).callee == "cam-2"
    with pytest.raises(MessageError) as caught:
        CreateCall.from_dict({"caller": "lower-a/cam-1"})
    assert caught.value.field == "callee"
    assert split_address("lower-a/cam-1") == ("lower-a", "cam-1")
    assert split_address("cam-1") == (None, "cam-1")


def test_device_info_carries_address():
    data = json.loads(DeviceInfo(id="cam-1", server="lower-a").to_json())
    assert data["address"] == "lower-a/cam-1"
    assert DeviceInfo.from_dict(data).address == "lower-a/cam-1"
