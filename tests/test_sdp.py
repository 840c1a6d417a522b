"""rtc/sdp.py: reading media sections, refusing answers that cannot carry a call, and telling
why a sender cannot follow the path's rate."""

from __future__ import annotations

from rtc.sdp import ABS_SEND_TIME, TRANSPORT_CC, answer_problems, rate_feedback, sections

OFFER = """v=0\r
o=- 1 1 IN IP4 127.0.0.1\r
s=-\r
t=0 0\r
a=group:BUNDLE 0 1\r
m=audio 5000 UDP/TLS/RTP/SAVPF 96 0\r
a=mid:0\r
a=sendrecv\r
a=rtpmap:96 opus/48000/2\r
a=rtpmap:0 PCMU/8000\r
m=video 5000 UDP/TLS/RTP/SAVPF 97 98 99\r
a=mid:1\r
a=sendrecv\r
a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time\r
a=rtpmap:97 VP8/90000\r
a=rtcp-fb:97 goog-remb\r
a=rtcp-fb:97 nack pli\r
a=rtpmap:98 rtx/90000\r
a=rtpmap:99 H264/90000\r
"""

BOTH = {"audio": "sendrecv", "video": "sendrecv"}


def test_sections_read_kind_port_direction_codecs_extensions_feedback() -> None:
    audio, video = sections(OFFER)
    assert (audio.kind, audio.port, audio.direction, audio.mid) == ("audio", 5000, "sendrecv", "0")
    assert audio.codecs == ("audio/opus", "audio/PCMU")
    assert video.codecs == ("video/VP8", "video/H264")  # rtx is not a codec of its own
    assert video.extensions == (ABS_SEND_TIME,)
    assert video.feedback == {"goog-remb", "nack pli"}
    assert video.sends and video.receives


def test_a_session_level_direction_applies_where_a_section_has_none() -> None:
    sdp = OFFER.replace("t=0 0\r\n", "t=0 0\r\na=recvonly\r\n").replace("a=sendrecv\r\n", "")
    assert [s.direction for s in sections(sdp)] == ["recvonly", "recvonly"]


def test_a_good_answer_has_no_problem() -> None:
    assert answer_problems(OFFER, OFFER, BOTH) == []
    assert answer_problems(OFFER, OFFER.replace("VP8", "vp8"), BOTH) == []  # case of names


def test_each_unusable_answer_is_named() -> None:
    video_at = OFFER.index("m=video")
    head, video = OFFER[:video_at], OFFER[video_at:]
    cases = {
        "recvonly": head + video.replace("a=sendrecv", "a=recvonly"),
        "inactive": head + video.replace("a=sendrecv", "a=inactive"),
        "port 0": head + video.replace("m=video 5000", "m=video 0"),
        "no codec in common": head + video.replace("VP8", "VP9").replace("H264", "AV1"),
        "no video m-line": head,
    }
    for words, answer in cases.items():
        problems = answer_problems(OFFER, answer, BOTH)
        assert len(problems) == 1 and problems[0].startswith("video:"), (words, problems)
        assert words in problems[0], (words, problems)
    # what the call needs decides: a publisher only has to send
    recvonly_audio = OFFER.replace("a=sendrecv", "a=sendonly", 1)
    assert answer_problems(OFFER, recvonly_audio, {"audio": "sendonly"}) == []
    assert "receive audio" in answer_problems(OFFER, recvonly_audio, BOTH)[0]


def test_rate_feedback_says_why_a_sender_cannot_be_steered() -> None:
    video = sections(OFFER)[1]
    assert rate_feedback(video) is None
    no_abs = sections(OFFER.replace(f"a=extmap:2 {ABS_SEND_TIME}\r\n", ""))[1]
    assert "no abs-send-time" in (rate_feedback(no_abs) or "")
    twcc = sections(OFFER.replace(ABS_SEND_TIME, TRANSPORT_CC))[1]
    assert "transport-cc" in (rate_feedback(twcc) or "")
    no_remb = sections(OFFER.replace("a=rtcp-fb:97 goog-remb\r\n", ""))[1]
    assert "REMB" in (rate_feedback(no_remb) or "")
    receive_only = sections(OFFER.replace("a=sendrecv", "a=recvonly"))[1]
    assert rate_feedback(receive_only) is None  # sends nothing to steer

