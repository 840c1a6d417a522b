"""Per-hop figures: how the figures of the hops of one call make its links.

What each server measures of each call it carries, from packets it already handles, is in
rtc/meter.py: per direction and kind (a producer of the media graph owns one StreamMeter): packets
and bytes that arrived from the previous hop; loss before repair and jitter (RFC 3550, from the
receiver statistics aiortc keeps for RTCP reports anyway); retransmissions that arrived; keyframe
requests and NACKs each way; and the transit through this server, from the packet's arrival in
the kernel (``SIOCGSTAMP`` on the leg's socket, read for one packet in TRANSIT_EVERY) to its
departure on the other leg. The kernel stamp matters: a server that is slow (stopped, starved of
CPU) holds packets in its socket buffer, and that wait is the server's, not the link's.

Per leg (relay/leg.py): the round trip from RTCP reports, and the setup split into ICE connected
and DTLS done. Pure: times are passed in.
"""

from __future__ import annotations

from collections.abc import Sequence

from wire.messages import (
    DIRECTIONS,
    HopFigures,
    LegHop,
    LinkDirection,
    LinkFigures,
    split_address,
)


def links_of(path: Sequence[str], caller: str, callee: str,
             hops: dict[str, HopFigures]) -> list[LinkFigures]:
    """The links of a call, device to device: caller - its server - ... - callee's server -
    callee, each with what the hops at its two ends measured. A link's round trip is its two
    ends' mean; the figures of a direction are the receiving end's (a server's arrivals, or
    for the last link to a device, what the device reported in RTCP).

    A leg's round trip is the least of its RTCP round trips: a report waits in a slow
    server's socket like any packet, so round trips taken across a stalled server carry its
    stalls, but not all of them. The one-way estimate is half of it less what a report waits
    at the two ends anyway (each end's transit mean; a device's is not known: 0)."""
    if not path:
        return []
    # The callee's link only when the call reached the callee's server: a call turned away or
    # cut off on its way ends at the last server it reached (a bare callee id is resolved to
    # SERVER/DEVICE only there).
    reached = split_address(callee)[0] == path[-1]
    nodes = [caller, *path, *([callee] if reached else [])]
    links: list[LinkFigures] = []
    for i in range(len(nodes) - 1):
        a, b = nodes[i], nodes[i + 1]
        near = _leg(hops.get(a), "callee")  # a's leg toward b
        far = _leg(hops.get(b), "caller")  # b's leg toward a
        ends = [leg for leg in (near, far) if leg is not None]
        rtts = [rtt for rtt in map(_rtt, ends) if rtt is not None]
        setups = [leg.dtls_ms for leg in ends if leg.dtls_ms is not None]
        rtt = round(sum(rtts) / len(rtts), 3) if rtts else None
        one_way = (round(max(0.0, rtt - _wait(hops.get(a)) - _wait(hops.get(b))) / 2, 3)
                   if rtt is not None else None)
        directions: dict[str, LinkDirection] = {}
        for direction in DIRECTIONS:
            forward = direction == "caller_to_callee"
            receiver, sender_leg = (b, near) if forward else (a, far)
            seen = _arrivals(hops.get(receiver), direction)
            if seen is not None:
                directions[direction] = seen
            elif sender_leg is not None and sender_leg.far_lost is not None:
                directions[direction] = LinkDirection(lost=sender_leg.far_lost,
                                                      jitter_ms=sender_leg.far_jitter_ms)
        links.append(LinkFigures(
            from_=a, to=b, rtt_ms=rtt, one_way_ms=one_way,
            setup_ms=max(setups) if setups else None,
            directions=directions))  # type: ignore[arg-type]
    return links


def _rtt(leg: LegHop) -> float | None:
    """A leg's round trip: the least seen (a stall at either end inflates some reports), else
    the smoothed one."""
    return leg.rtt_min_ms if leg.rtt_min_ms is not None else leg.rtt_ms


def _wait(hop: HopFigures | None) -> float:
    """How long a datagram waits at this server on average: its video transit mean."""
    if hop is None:
        return 0.0
    means = [kinds["video"].transit_ms_mean for kinds in hop.streams.values()
             if "video" in kinds and kinds["video"].transit_ms_mean is not None]
    return sum(means) / len(means) if means else 0.0  # type: ignore[arg-type]


def _leg(hop: HopFigures | None, toward: str) -> LegHop | None:
    if hop is None:
        return None
    return next((leg for leg in hop.legs if leg.toward == toward), None)


def _arrivals(hop: HopFigures | None, direction: str) -> LinkDirection | None:
    stream = hop.streams.get(direction, {}).get("video") if hop is not None else None  # type: ignore[call-overload]
    if stream is None:
        return None
    return LinkDirection(packets=stream.packets, lost=stream.lost, jitter_ms=stream.jitter_ms)
