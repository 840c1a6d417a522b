"""``GET /metrics``: a server's figures in the Prometheus text format (prometheus_client).

One registry per application (no module-level state): a collector reads the node's live state at
each scrape, the process collector adds CPU and memory, and a small task measures the event loop's
lag (how late a timer fires: how long any callback, a packet included, waits its turn).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from relay.call import CallState
from relay.node import Node
from wire.tasks import Tasks

REGISTRY = web.AppKey("registry", CollectorRegistry)
LAG_INTERVAL_S = 0.1


class NodeCollector(Collector):
    """Calls, legs and forwarding figures of one node, read when scraped."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterable[Metric]:
        node = self.node
        labels = ["server", "role"]
        me = [node.name, node.role]

        def by(family: type[GaugeMetricFamily | CounterMetricFamily], name: str, text: str,
               label: str, counts: dict[str, int]) -> Metric:
            metric = family(name, text, labels=[*labels, label])
            for key, count in sorted(counts.items()):
                metric.add_metric([*me, key], count)
            return metric

        def one(family: type[GaugeMetricFamily | CounterMetricFamily], name: str, text: str,
                value: float) -> Metric:
            metric = family(name, text, labels=labels)
            metric.add_metric(me, value)
            return metric

        core = node.core
        states = {state.value: 0 for state in CallState if state is not CallState.ENDED}
        for call in core.closing.values():
            states[call.state.value] += 1
        for session in core.sessions.values():
            states[session.call.state.value] = states.get(session.call.state.value, 0) + 1
        legs: dict[str, int] = {}
        for leg in node.media.legs():
            legs[leg.connection_state] = legs.get(leg.connection_state, 0) + 1
        yield by(GaugeMetricFamily, "relay_calls", "Calls in progress, by state", "state",
                 states)
        yield one(CounterMetricFamily, "relay_calls_started", "Calls started at this server",
                  core.counters.calls_started)
        kinds = {"device": 0, "whip": 0, "whep": 0}
        for device in node.directory.own.values():
            kinds[device.kind] += 1
        yield by(GaugeMetricFamily, "relay_devices", "This server's own devices, by kind (whip: "
                 "WHIP publishers, whep: WHEP players watching)", "kind", kinds)
        yield by(CounterMetricFamily, "relay_calls_originated", "Calls started here as the "
                 "caller's server, by who started them: api (POST /v1/calls) or device (the "
                 "caller dialed)", "started_by",
                 {"api": 0, "device": 0, **core.counters.started_by})
        yield by(CounterMetricFamily, "relay_calls_ended", "Calls ended here, by reason "
                 "(hangup is the normal end)", "reason", core.counters.ended_by_reason)
        yield by(GaugeMetricFamily, "relay_legs", "Media legs (peer connections) of calls in "
                 "progress, by connection state", "state", legs)
        yield one(GaugeMetricFamily, "relay_directory_servers", "Servers of the tree this "
                  "server knows, itself included", len(node.directory.servers()))
        yield one(GaugeMetricFamily, "relay_directory_devices", "Devices this server holds "
                  "(a lower server's own; an upper server's whole subtree)",
                  len(node.directory.own) if node.role == "lower"
                  else len(node.directory.devices))
        f = node.forwarding
        for name, value, text in (
                ("relay_forwarded_packets", f.packets, "RTP packets forwarded"),
                ("relay_forwarded_bytes", f.bytes, "Bytes of forwarded packets as sent"),
                ("relay_fast_path_packets", f.fast_path_packets,
                 "Of the forwarded packets, those taken straight off the socket"),
                ("relay_keyframe_requests_received", f.keyframe_requests_down,
                 "PLI/FIR received from downstream"),
                ("relay_keyframe_requests_sent", f.keyframe_requests_up, "PLI sent upstream"),
                ("relay_nacks_sent", f.nacks_sent, "NACKs sent upstream"),
                ("relay_retransmissions", f.retransmissions,
                 "Packets asked for again by downstream NACKs"),
                ("relay_rembs_received", f.rembs_received,
                 "REMB (congestion control) received from downstream and acted on"),
                ("relay_rembs_sent", f.rembs_sent,
                 "REMB sent upstream: the least of this hop's estimate and downstream's"),
                ("relay_transcoded_directions", f.transcoded_total,
                 "Call directions that fell back to transcoding")):
            yield one(CounterMetricFamily, name, text, value)
        yield one(GaugeMetricFamily, "relay_transcoding", "Call directions transcoding now",
                  f.transcoding)
        yield by(CounterMetricFamily, "relay_refusals", "Requests, messages and links turned "
                 "away, by code (wire/reasons.py)", "code", core.counters.refusals)
        yield one(GaugeMetricFamily, "relay_ended_calls", "Ended calls kept (GET /v1/calls/ID "
                  "still answers)", len(core.ended))
        yield one(GaugeMetricFamily, "relay_ended_calls_keep_seconds", "How long an ended call "
                  "is kept (--keep-ended): memory grows this long under steady load",
                  core.ended.keep_s)
        yield one(GaugeMetricFamily, "relay_asyncio_tasks", "asyncio tasks alive in the server "
                  "(a leak shows as growth)", len(asyncio.all_tasks()))


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup_metrics(app: web.Application, node: Node) -> None:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(NodeCollector(node))
    ProcessCollector(registry=registry)
    lag = Histogram("relay_event_loop_lag_seconds", "How late the event loop runs a timer",
                    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
                    registry=registry)
    app[REGISTRY] = registry
    app.router.add_get("/metrics", metrics)

    async def watch_lag(app: web.Application) -> AsyncIterator[None]:
        async def run() -> None:
            loop = asyncio.get_running_loop()
            while True:
                due = loop.time() + LAG_INTERVAL_S
                await asyncio.sleep(LAG_INTERVAL_S)
                lag.observe(max(0.0, loop.time() - due))

        tasks = Tasks("metrics")
        tasks.spawn(run(), "loop-lag")
        yield
        await tasks.close()

    app.cleanup_ctx.append(watch_lag)
