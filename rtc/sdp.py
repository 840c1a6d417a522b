"""What an SDP description says about each media section, read without aiortc: enough to tell,
before applying an answer, whether a leg can carry what its call needs, and whether the sender
on it can follow the path's rate.

A peer written elsewhere (a browser, GStreamer's webrtcbin, FFmpeg) can answer in ways aiortc
accepts silently and that leave the call without media: ``recvonly``, ``inactive``, a rejected
m-line (port 0), no codec in common. :func:`answer_problems` names each, so the leg is refused at
once with a reason the device can read, not left to its setup timeout.
"""

from __future__ import annotations

from dataclasses import dataclass

ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
TRANSPORT_CC = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
#: payloads that carry no media of their own
_AUXILIARY = {"rtx", "red", "ulpfec", "flexfec-03", "telephone-event", "cn"}


@dataclass(frozen=True)
class MediaSection:
    """One m-line of a description."""

    kind: str  #: "audio", "video", "application", ...
    port: int  #: 0: the section is rejected
    direction: str  #: as its writer sees it: sendrecv, sendonly, recvonly, inactive
    codecs: tuple[str, ...]  #: media codecs by mime type ("video/VP8"), in order
    extensions: tuple[str, ...]  #: header extension URIs (a=extmap)
    feedback: frozenset[str]  #: RTCP feedback of any payload (a=rtcp-fb), e.g. "goog-remb"
    mid: str | None = None

    @property
    def sends(self) -> bool:
        return self.port != 0 and self.direction in ("sendrecv", "sendonly")

    @property
    def receives(self) -> bool:
        return self.port != 0 and self.direction in ("sendrecv", "recvonly")


def sections(sdp: str) -> list[MediaSection]:
    """The media sections of a description, in order."""
    session_direction = "sendrecv"
    found: list[dict[str, object]] = []
    for raw in sdp.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            parts = line[2:].split()
            port = int(parts[1].split("/")[0]) if len(parts) > 1 and \
                parts[1].split("/")[0].isdigit() else 0
            found.append({"kind": parts[0] if parts else "", "port": port, "direction": None,
                          "rtpmap": {}, "order": parts[3:], "extensions": [],
                          "feedback": set(), "mid": None})
            continue
        if not line.startswith("a="):
            continue
        attribute = line[2:]
        if attribute in DIRECTIONS:
            if found:
                found[-1]["direction"] = attribute
            else:
                session_direction = attribute
        elif not found:
            continue
        elif attribute.startswith("rtpmap:"):
            pt, _, encoding = attribute[7:].partition(" ")
            found[-1]["rtpmap"][pt] = encoding.split("/")[0]  # type: ignore[index]
        elif attribute.startswith("extmap:"):
            fields = attribute[7:].split()
            if len(fields) > 1:
                found[-1]["extensions"].append(fields[1])  # type: ignore[attr-defined]
        elif attribute.startswith("rtcp-fb:"):
            _, _, what = attribute[8:].partition(" ")
            found[-1]["feedback"].add(what.strip())  # type: ignore[attr-defined]
        elif attribute.startswith("mid:"):
            found[-1]["mid"] = attribute[4:]
    out = []
    for section in found:
        kind = str(section["kind"])
        rtpmap: dict[str, str] = section["rtpmap"]  # type: ignore[assignment]
        codecs = [f"{kind}/{rtpmap[pt]}" for pt in section["order"]  # type: ignore[attr-defined]
                  if pt in rtpmap and rtpmap[pt].lower() not in _AUXILIARY]
        out.append(MediaSection(
            kind=kind, port=int(section["port"]),  # type: ignore[call-overload]
            direction=str(section["direction"] or session_direction),
            codecs=tuple(dict.fromkeys(codecs)),
            extensions=tuple(section["extensions"]),  # type: ignore[call-overload]
            feedback=frozenset(section["feedback"]),  # type: ignore[arg-type]
            mid=section["mid"]))  # type: ignore[arg-type]
    return out


def section(sdp: str, kind: str) -> MediaSection | None:
    """The first media section of ``kind`` in a description, if any."""
    return next((s for s in sections(sdp) if s.kind == kind), None)


def answer_problems(offer: str, answer: str, needs: dict[str, str]) -> list[str]:
    """Why an answer to ``offer`` cannot carry the call: per kind, ``needs[kind]`` is what the
    *answerer* must do ("sendrecv", "sendonly" or "recvonly"). Empty when it can."""
    offered = {s.kind: s for s in sections(offer)}
    answered = {s.kind: s for s in sections(answer)}
    problems = []
    for kind, need in needs.items():
        mine = offered.get(kind)
        theirs = answered.get(kind)
        if theirs is None:
            problems.append(f"{kind}: the answer has no {kind} m-line")
            continue
        if theirs.port == 0:
            problems.append(f"{kind}: the answer rejected the m-line (port 0)")
            continue
        if need in ("sendrecv", "sendonly") and not theirs.sends:
            problems.append(f"{kind}: the answer is {theirs.direction}, but the call needs the "
                            f"device to send {kind} ({need})")
        elif need in ("sendrecv", "recvonly") and not theirs.receives:
            problems.append(f"{kind}: the answer is {theirs.direction}, but the call needs the "
                            f"device to receive {kind} ({need})")
        if mine is not None and not {c.lower() for c in theirs.codecs} & \
                {c.lower() for c in mine.codecs}:
            problems.append(f"{kind}: no codec in common (offered {', '.join(mine.codecs)}; "
                            f"answered {', '.join(theirs.codecs) or 'none'})")
    return problems


def rate_feedback(section: MediaSection | None) -> str | None:
    """Why a sender on this (video) section cannot follow the path's rate, as this project's
    servers steer it (REMB from an abs-send-time estimate, rtc/congestion.py); None when it can.
    ``section`` is the sender's own description of the stream (its offer or its answer)."""
    if section is None or not section.sends:
        return None
    if ABS_SEND_TIME not in section.extensions:
        if TRANSPORT_CC in section.extensions or "transport-cc" in section.feedback:
            return ("the sender offers transport-cc and not abs-send-time: transport-wide "
                    "congestion control is not taken here, so nothing estimates its path")
        return "the sender's description has no abs-send-time: nothing estimates its path"
    if "goog-remb" not in section.feedback:
        return "the sender does not take REMB (no rtcp-fb goog-remb): it is told no rate"
    return None
