"""A run's hops, aggregated by name: a server; a link ``A - B`` (either way round: a call's own
``A -> B`` runs from its caller); a server's devices ``SERVER/*``, and the links to them. Per call,
the hop's part of the video latency and of the setup (HdrHistograms, so summaries merge
exactly: ``probe merge``), the packets that crossed it and were lost on it, and how often it
was the call's bottleneck by each measure. A server also keeps its calls' transit p99 (the
larger of the two directions', video) and what arrived at it and was lost on the way: the
signals a capacity search reads to say which server gave way (probe/capacity.py). Fed from each
call's ``hops`` and ``links`` (probe/bottleneck.py says what the parts are)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from probe.bottleneck import bottleneck, parts
from probe.histograms import decode, encode, new_histogram, percentiles, record_ms


def run_name(hop: str) -> str:
    """The name a call's hop is aggregated under over a run (see the module's docstring)."""
    if " -> " in hop:
        a, b = (run_name(end) for end in hop.split(" -> ", 1))
        return " - ".join(sorted((a, b)))
    server, slash, _ = hop.partition("/")
    return f"{server}/*" if slash else hop


@dataclass
class HopTotals:
    calls: int = 0
    latency_ms: HdrHistogram = field(default_factory=new_histogram)
    setup_ms: HdrHistogram = field(default_factory=new_histogram)
    packets: int = 0  #: video packets that arrived over it (a link)
    lost: int = 0  #: of those, lost before repair
    bottleneck: dict[str, int] = field(default_factory=dict)  #: measure -> calls
    #: a server: each call's transit p99 there (video, the slower direction)
    transit_p99_ms: HdrHistogram = field(default_factory=new_histogram)
    packets_in: int = 0  #: a server or a device: video packets that arrived at it
    lost_in: int = 0  #: of those sent to it, lost on the way (before repair)

    def merge(self, other: HopTotals) -> None:
        self.calls += other.calls
        self.latency_ms.add(other.latency_ms)
        self.setup_ms.add(other.setup_ms)
        self.packets += other.packets
        self.lost += other.lost
        self.transit_p99_ms.add(other.transit_p99_ms)
        self.packets_in += other.packets_in
        self.lost_in += other.lost_in
        for measure, count in other.bottleneck.items():
            self.bottleneck[measure] = self.bottleneck.get(measure, 0) + count

    @property
    def loss_in(self) -> float | None:
        """Of the video packets sent to this hop, the share lost on the way."""
        sent = self.packets_in + self.lost_in
        return round(self.lost_in / sent, 5) if sent else None

    def summary(self) -> dict[str, Any]:
        sent = self.packets + self.lost
        out = {"calls": self.calls, "latency_ms": percentiles(self.latency_ms),
               "setup_ms": percentiles(self.setup_ms), "packets": self.packets,
               "lost": self.lost, "loss": round(self.lost / sent, 5) if sent else None,
               "bottleneck": dict(sorted(self.bottleneck.items()))}
        histograms = {"latency_ms": encode(self.latency_ms), "setup_ms": encode(self.setup_ms)}
        if self.transit_p99_ms.get_total_count():
            out["transit_p99_ms"] = percentiles(self.transit_p99_ms)
            histograms["transit_p99_ms"] = encode(self.transit_p99_ms)
        if self.packets_in or self.lost_in:
            out.update(packets_in=self.packets_in, lost_in=self.lost_in, loss_in=self.loss_in)
        return {**out, "histograms": histograms}

    @classmethod
    def from_summary(cls, data: dict[str, Any]) -> HopTotals:
        encoded = data.get("histograms", {})

        def histogram(name: str) -> HdrHistogram:
            return decode(encoded[name]) if name in encoded else new_histogram()

        return cls(calls=data["calls"], latency_ms=histogram("latency_ms"),
                   setup_ms=histogram("setup_ms"), packets=data.get("packets", 0),
                   lost=data.get("lost", 0), bottleneck=dict(data.get("bottleneck", {})),
                   transit_p99_ms=histogram("transit_p99_ms"),
                   packets_in=data.get("packets_in", 0), lost_in=data.get("lost_in", 0))


@dataclass
class HopsRecorder:
    hops: dict[str, HopTotals] = field(default_factory=dict)

    def add(self, hops: list[dict[str, Any]], links: list[dict[str, Any]],
            media: dict[str, Any] | None = None,
            senders: dict[str, Any] | None = None) -> None:
        """One call's hops (nothing, for a call that carried no media)."""
        if not links:
            return
        found = parts(hops, links, media, senders)
        names = dict.fromkeys([*found["latency_ms"], *found["setup_ms"], *found["lost"]])
        for name in names:
            totals = self.hops.setdefault(run_name(name), HopTotals())
            totals.calls += 1
            if name in found["latency_ms"]:
                record_ms(totals.latency_ms, found["latency_ms"][name])
            if name in found["setup_ms"]:
                record_ms(totals.setup_ms, found["setup_ms"][name])
        for link in links:
            totals = self.hops.setdefault(run_name(f"{link['from']} -> {link['to']}"),
                                          HopTotals())
            for direction, seen in link.get("directions", {}).items():
                totals.packets += seen.get("packets", 0)
                totals.lost += seen.get("lost", 0)
                end = self.hops.setdefault(run_name(
                    link["to"] if direction == "caller_to_callee" else link["from"]),
                    HopTotals())
                end.packets_in += seen.get("packets", 0)
                end.lost_in += seen.get("lost", 0)
        for hop in hops:
            slowest = [video["transit_ms_p99"] for kinds in hop.get("streams", {}).values()
                       if (video := kinds.get("video") or {}).get("transit_ms_p99") is not None]
            if slowest:
                record_ms(self.hops.setdefault(hop["server"], HopTotals()).transit_p99_ms,
                          max(slowest))
        for measure, worst in bottleneck(hops, links, media, senders).items():
            if worst is not None:
                totals = self.hops.setdefault(run_name(worst["hop"]), HopTotals())
                totals.bottleneck[measure] = totals.bottleneck.get(measure, 0) + 1

    def merge(self, other: HopsRecorder) -> None:
        for name, totals in other.hops.items():
            self.hops.setdefault(name, HopTotals()).merge(totals)

    def summary(self) -> dict[str, Any]:
        return {name: totals.summary() for name, totals in self.hops.items()}

    @classmethod
    def from_summary(cls, data: dict[str, Any]) -> HopsRecorder:
        return cls({name: HopTotals.from_summary(totals) for name, totals in data.items()})
