"""Which hop of a call holds it back: the server or link with the largest share of the call's
latency, loss and setup time, from the figures each server measured of its own part
(relay/hops.py; ``hops`` and ``links`` of a call's record).

Latency parts, per direction, video: each server's transit (kernel arrival to departure, the
mean, so that parts add up; on the server's own clock) and each link's one-way delay (half its
round trip: an estimate). Loss parts: each link's packets lost before repair, as its receiving
end counted them. Setup parts: each link's setup (ICE and DTLS, the later of its two ends).
Pure.
"""

from __future__ import annotations

from typing import Any

from relay.messages import DIRECTIONS


def parts(hops: list[dict[str, Any]], links: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per measure (latency_ms, lost, setup_ms), each hop's part, by hop name (a server's
    name, or ``A -> B`` for a link)."""
    latency: dict[str, float] = {}
    lost: dict[str, float] = {}
    setup: dict[str, float] = {}
    for hop in hops:
        total = 0.0
        for direction in DIRECTIONS:
            video = hop.get("streams", {}).get(direction, {}).get("video") or {}
            if video.get("transit_ms_mean") is not None:
                total += video["transit_ms_mean"]
        latency[hop["server"]] = round(total, 3)
    for link in links:
        name = f"{link['from']} -> {link['to']}"
        if link.get("one_way_ms") is not None:
            latency[name] = round(link["one_way_ms"] * len(DIRECTIONS), 3)
        lost[name] = float(sum(d.get("lost", 0) for d in link.get("directions", {}).values()))
        if link.get("setup_ms") is not None:
            setup[name] = link["setup_ms"]
    return {"latency_ms": latency, "lost": lost, "setup_ms": setup}


def bottleneck(hops: list[dict[str, Any]], links: list[dict[str, Any]]
               ) -> dict[str, dict[str, Any] | None]:
    """Per measure, the hop with the largest part: ``{"hop", "value", "share"}`` (share of
    the sum of all hops' parts), or None where nothing was measured (or nothing was lost)."""
    out: dict[str, dict[str, Any] | None] = {}
    for measure, values in parts(hops, links).items():
        total = sum(values.values())
        if not values or total <= 0:
            out[measure] = None
            continue
        hop, value = max(values.items(), key=lambda kv: kv[1])
        out[measure] = {"hop": hop, "value": value, "share": round(value / total, 3)}
    return out


def describe(hops: list[dict[str, Any]], links: list[dict[str, Any]]) -> list[str]:
    """The path as lines: each hop with its latency part and share, the bottlenecks last."""
    found = parts(hops, links)
    latency = found["latency_ms"]
    total = sum(latency.values()) or 1.0
    order: list[str] = []
    for link in links:
        if not order:
            order.append(link["from"])
        order += [f"{link['from']} -> {link['to']}", link["to"]]
    lines = []
    for name in order:
        if name in latency:
            lost = found["lost"].get(name)
            extra = f", {lost:.0f} lost" if lost else ""
            lines.append(f"    {name:<34} {latency[name]:8.2f} ms ({latency[name] / total:4.0%})"
                         f"{extra}")
    for measure, worst in bottleneck(hops, links).items():
        if worst is not None:
            lines.append(f"    bottleneck by {measure}: {worst['hop']} ({worst['share']:.0%})")
    return lines
