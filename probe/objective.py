"""What a server must achieve for a load to count as sustained: pure logic on Figures."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from probe.stats import Figures

#: The key of ``objective_missed`` for what misses the objective before any server is judged:
#: a run in which no call started has no server's figures, and must not pass for that.
RUN = "run"


@dataclass(frozen=True)
class Objective:
    """Each limit is optional (None: not checked). Percentiles are over the calls' figures:
    response and setup per call; media latency per call direction, its tail (each direction's
    own p95: a server that stalls one frame in ten shows, where each direction's median would
    not). Judged per server crossed: every server on a call's path answers for the call."""

    min_success_rate: float | None = 0.99
    max_response_p95_ms: float | None = 1000.0
    max_setup_p95_ms: float | None = 5000.0
    max_media_latency_p95_ms: float | None = None
    max_frame_loss: float | None = 0.02  #: frames lost / frames sent
    max_freeze_ratio: float | None = None  #: freezes / frames received
    #: dB: the 5th percentile, over the call directions, of each one's mean PSNR (synthetic
    #: pictures against their source: endpoint/quality.py)
    min_psnr: float | None = None
    #: the 5th percentile, over the call directions, of each one's MOS (endpoint/emodel.py)
    min_mos: float | None = None
    #: ms: the 95th percentile, over the call directions, of the size of each one's lip-sync
    #: skew (av_sync_ms, either side)
    max_av_sync_ms: float | None = None

    def missed(self, figures: Figures, media: bool = True) -> list[str]:
        """Why ``figures`` miss the objective (empty: met). Media limits only with media."""
        why: list[str] = []
        if figures.calls == 0:
            return ["no calls"]
        rate = figures.success_rate or 0.0
        if self.min_success_rate is not None and rate < self.min_success_rate:
            why.append(f"success rate {rate:.3f} < {self.min_success_rate}")
        for limit, phase, label in (
                (self.max_response_p95_ms, "response_ms", "response p95"),
                (self.max_setup_p95_ms, "setup_ms", "setup p95"),
                (self.max_media_latency_p95_ms if media else None, "media_latency_p95_ms",
                 "media latency p95")):
            if limit is None:
                continue
            histogram = figures.histograms.get(phase)
            if histogram is None or not histogram.get_total_count():
                why.append(f"{label}: no value")
                continue
            value = histogram.get_value_at_percentile(95) / 1000
            if value > limit:
                why.append(f"{label} {value:.1f} ms > {limit:g} ms")
        if media and self.max_frame_loss is not None:
            loss = figures.frame_loss
            if loss is not None and loss > self.max_frame_loss:
                why.append(f"frame loss {loss:.4f} > {self.max_frame_loss}")
        if media and self.max_freeze_ratio is not None:
            ratio = figures.freeze_ratio
            if ratio is not None and ratio > self.max_freeze_ratio:
                why.append(f"freeze ratio {ratio:.4f} > {self.max_freeze_ratio}")
        for least, name, label, unit, digits, unknown in (
                (self.min_psnr, "psnr_db", "PSNR", " dB", 1, "no synthetic picture received"),
                (self.min_mos, "mos", "MOS", "", 2, "no audio timing mark received")):
            if not media or least is None:
                continue
            value = figures.quality(name, 5)
            if value is None:
                why.append(f"{label} p5: no value ({unknown})")
            elif value < least:
                why.append(f"{label} p5 {value:.{digits}f}{unit} < {least:g}{unit}")
        if media and self.max_av_sync_ms is not None:
            size = figures.av_sync_size(95)
            if size is None:
                why.append("lip sync p95: no value (no audio mark matched with video)")
            elif size > self.max_av_sync_ms:
                why.append(f"lip sync p95 {size:.0f} ms > {self.max_av_sync_ms:g} ms "
                           f"(median {figures.av_sync(50):+.0f} ms, + sound after picture)")
        return why

    def describe(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in asdict(self).items() if v is not None)

    def missed_by_server(self, servers: Mapping[str, Figures], media: bool = True,
                         why_none: str = "no call started") -> dict[str, list[str]]:
        """Why each server's figures miss the objective; with no server's figures at all
        (no call started), the run itself misses it, under ``RUN``, saying ``why_none``."""
        missed = {name: self.missed(figures, media) for name, figures in servers.items()}
        return missed or {RUN: [why_none]}
