"""Which hop of a call holds it back: the server or link with the largest share of the call's
latency, loss and setup time, from the figures each server measured of its own part
(relay/hops.py; ``hops`` and ``links`` of a call's record).

Latency parts, per direction, video: each device's own (the sender's capture to last packet
sent, the receiver's first packet in to decoded), each server's transit (kernel arrival to
departure; on the server's own clock) and each link's one-way delay (half its round trip: an
estimate); means, so that the parts add up. Loss parts: each link's packets lost before
repair, as its receiving end counted them. Setup parts: each link's setup (ICE and DTLS, the
later of its two ends). Pure.
"""

from __future__ import annotations

from typing import Any

from wire.messages import DIRECTIONS


def parts(hops: list[dict[str, Any]], links: list[dict[str, Any]],
          media: dict[str, Any] | None = None, senders: dict[str, Any] | None = None
          ) -> dict[str, dict[str, float]]:
    """Per measure (latency_ms, lost, setup_ms), each hop's part, by hop name (a server's
    name, ``A -> B`` for a link, a device's address for its own parts: as the sender of one
    direction and the receiver of the other)."""
    latency: dict[str, float] = {}
    if links:
        caller, callee = links[0]["from"], links[-1]["to"]
        for direction, (sender, receiver) in (("caller_to_callee", (caller, callee)),
                                              ("callee_to_caller", (callee, caller))):
            sent = _mean((senders or {}).get(direction))
            got = _mean(((media or {}).get(direction) or {}).get("receiver"))
            if sent is not None:
                latency[sender] = latency.get(sender, 0.0) + sent
            if got is not None:
                latency[receiver] = latency.get(receiver, 0.0) + got
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


def _mean(part: dict[str, Any] | None) -> float | None:
    return part.get("mean_ms") if part else None


def budget(hops: list[dict[str, Any]], links: list[dict[str, Any]], media: dict[str, Any],
           senders: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per direction, the video latency split into its parts (means, ms): the sending
    device's, the links' (one-way estimates), the servers' transit, the receiving device's;
    their sum, and the glass-to-glass latency the receiving device measured from the stamps.
    ``unexplained_ms`` is what the parts do not account for."""
    out: dict[str, dict[str, float | None]] = {}
    for direction in DIRECTIONS:
        received = media.get(direction) or {}
        sender = _mean(senders.get(direction))
        receiver = _mean(received.get("receiver"))
        servers = [((h.get("streams", {}).get(direction) or {}).get("video") or {}).get(
            "transit_ms_mean") for h in hops]
        ways = [link.get("one_way_ms") for link in links]
        g2g = received.get("latency_ms_mean")
        known = [v for v in (sender, receiver, *servers, *ways) if v is not None]
        total = round(sum(known), 3) if known else None
        out[direction] = {
            "sender_ms": sender, "links_ms": _sum(ways), "servers_ms": _sum(servers),
            "receiver_ms": receiver, "sum_ms": total, "glass_to_glass_ms": g2g,
            "unexplained_ms": round(g2g - total, 3) if g2g is not None and total is not None
            else None}
    return out


def _sum(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known), 3) if known else None


def bottleneck(hops: list[dict[str, Any]], links: list[dict[str, Any]],
               media: dict[str, Any] | None = None, senders: dict[str, Any] | None = None
               ) -> dict[str, dict[str, Any] | None]:
    """Per measure, the hop with the largest part: ``{"hop", "value", "share"}`` (share of
    the sum of all hops' parts), or None where nothing was measured (or nothing was lost)."""
    out: dict[str, dict[str, Any] | None] = {}
    for measure, values in parts(hops, links, media, senders).items():
        total = sum(values.values())
        if not values or total <= 0:
            out[measure] = None
            continue
        hop, value = max(values.items(), key=lambda kv: kv[1])
        out[measure] = {"hop": hop, "value": value, "share": round(value / total, 3)}
    return out


def describe(hops: list[dict[str, Any]], links: list[dict[str, Any]],
             media: dict[str, Any] | None = None, senders: dict[str, Any] | None = None
             ) -> list[str]:
    """The path as lines: each hop with its latency part and share, the bottlenecks last."""
    found = parts(hops, links, media, senders)
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
    for measure, worst in bottleneck(hops, links, media, senders).items():
        if worst is not None:
            lines.append(f"    bottleneck by {measure}: {worst['hop']} ({worst['share']:.0%})")
    return lines


def rate_limit(hops: list[dict[str, Any]], links: list[dict[str, Any]], direction: str,
               senders: dict[str, Any] | None = None, near: float = 0.1
               ) -> dict[str, Any] | None:
    """Which link limits the rate of a direction's video (congestion control,
    rtc/congestion.py). The sender hears its first server's report: the least of every
    hop's estimate from there down. Each estimate covers the path from the sending device up
    to its hop (forwarded packets keep the device's send times), so past the narrowest link
    they all read about its rate, and only they find its queue growing (``overuses``). The
    link named (``by``):

    - ``queue``: the link into the first hop, in the media's direction, that found the queue
      growing;
    - ``receiver``: none did, and the receiving device's report (the last server's downstream
      report) is the limit: its link (past the last server, the device's estimate is all
      there is);
    - ``ramp``: none did and a hop's own estimate is the limit: no link holds the rate back
      yet, the estimates are still rising towards what the path carries (``link`` None);
    - ``estimate``: hops that do not count overuses (older servers): the link into the first
      hop whose estimate is within ``near`` (10 %) of the limit, else the receiving device's.

    ``{"link", "by", "kbps", "estimates", "overuses", "sender_adapts"}``, or None where no
    server reported (congestion control off)."""
    if not hops or len(links) != len(hops) + 1:
        return None
    forward = direction == "caller_to_callee"
    order = list(range(len(hops))) if forward else list(reversed(range(len(hops))))

    def video(i: int) -> dict[str, Any]:
        return ((hops[i].get("streams") or {}).get(direction) or {}).get("video") or {}

    def into(i: int) -> dict[str, Any]:  # the link the video came in on to hop i
        return links[i] if forward else links[i + 1]

    limit = video(order[0]).get("reported_kbps")
    if limit is None:
        return None
    estimates = {hops[i]["server"]: video(i).get("estimate_kbps") for i in order}
    overuses = {hops[i]["server"]: video(i).get("overuses") for i in order}
    device = video(order[-1]).get("downstream_kbps")
    receiving = links[-1] if forward else links[0]
    link: dict[str, Any] | None = receiving
    if all(count is None for count in overuses.values()):
        by = "estimate"
        for i in order:
            own = video(i).get("estimate_kbps")
            if own is not None and own <= limit * (1 + near):
                link = into(i)
                break
    else:
        queued = next((i for i in order if video(i).get("overuses")), None)
        if queued is not None:
            by, link = "queue", into(queued)
        elif device is not None and device <= limit * (1 + near):
            by = "receiver"
        else:
            by, link = "ramp", None
    sender = (senders or {}).get(direction) or {}
    receiver = receiving["to" if forward else "from"]
    return {"link": f"{link['from']} -> {link['to']}" if link is not None else None, "by": by,
            "kbps": limit, "estimates": {**estimates, receiver: device},
            "overuses": overuses, "sender_adapts": sender.get("adapts")}
