"""A call at a device, by the table (wire/states.py PHONE_TRANSITIONS): every transition is
walked on a real ``Device`` fed the server's messages (the media itself is the e2e tests'),
and what the table leaves out is refused: a server's message with an ``error`` back, a person's
action with NotInCall, and nothing changes."""

from __future__ import annotations

from typing import Any

import pytest

from endpoint.device import Device, DeviceSettings, NotInCall, Phone
from wire.messages import Error, Hangup, Message, Offer, Pickup, Wake, Woken
from wire.states import PHONE_TRANSITIONS, PhoneEvent, PhoneState

P, V = PhoneState, PhoneEvent


class Channel:
    """The device's server link, recorded."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    async def send(self, message: Message) -> bool:
        self.sent.append(message)
        return True


def device(answer: str = "auto") -> tuple[Device, Channel]:
    dev = Device("ws://127.0.0.1:9/", "cam", DeviceSettings(answer=answer, audio=False))  # type: ignore[arg-type]
    channel = Channel()
    dev.channel = channel  # type: ignore[assignment]
    return dev, channel


WAKE = Wake(call="c1", role="callee", peer="lower-a/cam-1")
OFFER = Offer(call="c1", leg="c1", sdp="v=0\r\n")


async def test_every_transition_is_listed_and_the_walk_below_covers_them():
    walked = {(P.NEW, V.WAKE), (P.NEW, V.WAKE_RINGING), (P.RINGING, V.PICKUP),
              (P.RINGING, V.OFFER), (P.RINGING, V.DECLINE), (P.RINGING, V.HANGUP),
              (P.RINGING, V.LOST), (P.ANSWERING, V.OFFER), (P.ANSWERING, V.HANGUP),
              (P.ANSWERING, V.LOST), (P.CONNECTING, V.FIRST_FRAME), (P.CONNECTING, V.HANGUP),
              (P.CONNECTING, V.LOST), (P.ACTIVE, V.HANGUP), (P.ACTIVE, V.LOST)}
    assert walked == {(s, e) for s, row in PHONE_TRANSITIONS.items() for e in row}
    for (state, event) in walked:
        phone = Phone(WAKE, state)
        assert phone.handle(event) is PHONE_TRANSITIONS[state][event]


async def test_a_wake_up_answers_at_once_or_rings():
    dev, channel = device()
    await dev._handle(channel, WAKE)  # type: ignore[arg-type]
    assert dev.phones["c1"].state is P.ANSWERING
    assert isinstance(channel.sent[0], Woken) and not channel.sent[0].ringing
    ringer, channel = device("ring")
    await ringer._handle(channel, WAKE)  # type: ignore[arg-type]
    assert ringer.phones["c1"].state is P.RINGING and channel.sent[0].ringing
    assert list(ringer.ringing) == ["c1"]


async def test_an_offer_while_ringing_is_held_until_a_pickup():
    dev, channel = device("ring")
    await dev._handle(channel, WAKE)  # type: ignore[arg-type]
    await dev._handle(channel, OFFER)  # type: ignore[arg-type]
    phone = dev.phones["c1"]
    assert phone.state is P.RINGING and phone.offer is OFFER and phone.media is None
    answered: list[Any] = []

    async def answer(channel: Any, offer: Offer) -> None:  # the media is the e2e tests'
        phone.handle(V.OFFER)
        answered.append(offer)

    dev._answer = answer  # type: ignore[method-assign]
    await dev.pickup("c1")
    assert isinstance(channel.sent[-1], Pickup) and answered == [OFFER]
    assert phone.state is P.CONNECTING and phone.offer is None
    dev._first_frame("c1")
    assert phone.state is P.ACTIVE
    await dev._handle(channel, Hangup(call="c1", reason="hangup"))  # type: ignore[arg-type]
    assert "c1" not in dev.phones and dev.ended["c1"].by == "remote"


@pytest.mark.parametrize("how", ["decline", "hangup", "server", "lost"])
async def test_a_ringing_call_ends_every_way_the_table_says(how: str):
    dev, channel = device("ring")
    await dev._handle(channel, WAKE)  # type: ignore[arg-type]
    if how == "decline":
        await dev.decline("c1")
    elif how == "hangup":
        await dev.hangup("c1")
    elif how == "server":
        await dev._handle(channel, Hangup(call="c1", reason="hangup"))  # type: ignore[arg-type]
    else:
        await dev._end_all("device_gone")
    reason = {"decline": "declined", "lost": "device_gone"}.get(how, "hangup")
    assert dev.phones == {} and dev.ended["c1"].reason == reason
    if how in ("decline", "hangup"):
        assert channel.sent[-1] == Hangup(call="c1", reason=reason)


async def test_what_the_table_leaves_out_is_refused_and_changes_nothing():
    dev, channel = device()
    await dev._handle(channel, OFFER)  # type: ignore[arg-type]  # no wake-up
    assert isinstance(channel.sent[-1], Error) and channel.sent[-1].code == "unknown_call"
    await dev._handle(channel, WAKE)  # type: ignore[arg-type]
    await dev._handle(channel, WAKE)  # type: ignore[arg-type]  # the same call again
    assert channel.sent[-1].code == "duplicate_call" and channel.sent[-1].ref == "wake"
    assert dev.phones["c1"].state is P.ANSWERING
    with pytest.raises(NotInCall):
        await dev.pickup("c1")  # it does not ring
    with pytest.raises(NotInCall):
        await dev.decline("c1")
    with pytest.raises(NotInCall):
        await dev.hangup("c9")
    assert dev.phones["c1"].state is P.ANSWERING
    dev.phones["c1"].state = P.CONNECTING
    await dev._handle(channel, OFFER)  # type: ignore[arg-type]  # a second offer
    error = channel.sent[-1]
    assert isinstance(error, Error) and error.code == "protocol_error" and error.ref == "offer"
    assert "offer is not taken by a call in state connecting" in error.message
    assert dev.phones["c1"].state is P.CONNECTING
