"""The probe's figures, as pure logic: per-call outcomes classified, and per server, per phase
and per time window, percentiles from mergeable HdrHistograms.

Everything here merges exactly: two probes' recorders (or their JSON) added together give the
same figures as one probe that saw every call (``probe merge``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from probe.histograms import (
    decode,
    encode,
    new_histogram,
    percentiles,
    record_ms,
    valid_b64,
)
from probe.hopstats import HopsRecorder
from wire.reasons import reason as reason_of

#: What a failed call is counted as. Every failed call gets exactly one class.
FAILURE_CLASSES = (
    "timeout",             # no answer in time: the command, a wake-up, or setup
    "rejected",            # the server refused the command (the code is kept as detail)
    "unknown_device",      # caller or callee not known where the call was routed
    "busy_device",         # caller or callee already in a call
    "server_unreachable",  # the probe could not reach the server, or a server its parent
    "device_unreachable",  # a device's link was gone before the call was up
    "ice_dtls_failed",     # a media leg could not connect
    "declined",            # the callee rang and declined
    "no_answer",           # the callee rang and nobody answered in time
    "no_media",            # up, but a direction never got a frame
    "stalled",             # media started, then stopped for most of the call
    "dropped",             # up, then ended by anything but the probe's hang-up
    "probe_error",         # the probe itself failed on the call: blame the probe, not a server
)

#: Phases timed per call, in ms from the (scheduled) send time, and media figures (per call
#: direction: media latency and audio latency are each direction's p50; the media latency's
#: tail is each direction's own p95 and max, so a server that stalls now and then shows in
#: media too, not only in the typical frame).
PHASES = ("response_ms", "server_time_ms", "caller_woken_ms", "callee_woken_ms", "answered_ms",
          "setup_ms", "answered_to_media_ms",
          "first_frame_callee_ms", "first_frame_caller_ms", "media_latency_ms",
          "media_latency_p95_ms", "media_latency_max_ms", "audio_latency_ms", "video_kbps")

#: What a person in the call would notice, per call direction: picture quality (a direction's
#: mean over its samples: endpoint/quality.py) and the call score (MOS: endpoint/emodel.py),
#: kept in histograms as the phases are (so they merge exactly; 1 % resolution): PSNR and MOS
#: as they are, SSIM as what it misses of 1 (1 - SSIM, in millionths: 1 % of 0.037 rather than
#: of 0.963). Each name's "worse" end: low for all, so their 5th percentile is the one that
#: matters.
QUALITY = ("psnr_db", "ssim", "mos")
#: Lip sync (each direction's av_sync_ms: audio latency - video latency) is signed: its two
#: sides are kept apart, sound after the picture and sound before it, each as a size in ms
AV_SYNC = ("av_sync_lag_ms", "av_sync_lead_ms")
#: histograms that are not phases (the summary gives them under "quality")
NOT_PHASES = QUALITY + AV_SYNC


def _quality_units(name: str, value: float) -> float:
    """A quality figure as record_ms takes it (thousandths of a unit)."""
    return (1.0 - value) * 1000 if name == "ssim" else value


def _quality_value(name: str, units: float) -> float:
    """The figure back from a histogram's value (record_ms's units)."""
    return 1.0 - units / 1_000_000 if name == "ssim" else units / 1000


@dataclass
class Outcome:
    """What one call came to, as the probe classifies it (see :func:`classify`)."""

    ok: bool
    failure: str | None = None  #: one of FAILURE_CLASSES when not ok
    detail: str | None = None  #: the server's code or the call's end reason
    #: the callee declined, as the call's scenario asked (wire/scenario.py): ok, and counted
    declined: bool = False


def failure_class(code: str) -> str:
    """The failure class of a refusal or end reason, from the reasons table (wire/reasons.py);
    a code the table does not know is a rejection."""
    found = reason_of(code)
    return found.failure if found is not None and found.failure else "rejected"


def classify(error_code: str | None, reason: str | None, was_active: bool,
             media: dict[str, dict[str, Any]], directions: tuple[str, ...],
             woken: bool = False, expected: str = "hangup") -> Outcome:
    """Classify a call from how the command went (``error_code``, set when the server refused
    or never answered it), how the call ended (``reason``), whether it was ever up, whether
    both devices acknowledged their wake-up, and the media each direction reported.
    ``expected``: how the call's scenario meant it to end (``declined``: a decline is ok)."""
    if error_code is not None:
        return Outcome(False, failure_class(error_code), error_code)
    if expected == "declined":
        if reason == "declined" and not was_active:
            return Outcome(True, detail=reason, declined=True)
        return Outcome(False, "dropped" if was_active else failure_class(reason or "timeout"),
                       f"{reason}, not the declined the scenario asked for")
    if not was_active:
        if reason is None:
            return Outcome(False, "timeout", reason)  # the probe gave up waiting
        if reason == "setup_timeout" and woken:
            return Outcome(False, "no_media", reason)  # both devices there, no picture came
        return Outcome(False, failure_class(reason), reason)
    if reason != "hangup":
        return Outcome(False, "dropped", reason)
    for direction in directions:
        figures = media.get(direction) or {}
        if not figures.get("frames"):
            return Outcome(False, "no_media", direction)
    for direction in directions:
        if stalled(media[direction]):
            return Outcome(False, "stalled", direction)
    return Outcome(True)


def stalled(figures: dict[str, Any]) -> bool:
    """Frames came at their rate while they came (``fps``), but over the whole report period
    fewer than half of what that rate gives: the picture stopped for most of the call."""
    fps, duration, frames = figures.get("fps") or 0.0, figures.get("duration_s") or 0.0, \
        figures.get("frames") or 0
    if fps <= 0 or duration < 1.0:
        return False
    return frames < 0.5 * fps * duration


@dataclass
class Figures:
    """Counts and histograms for one slice of a run (a server, a time window, or everything)."""

    calls: int = 0
    ok: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    details: dict[str, int] = field(default_factory=dict)  #: "class:detail" -> count
    histograms: dict[str, HdrHistogram] = field(default_factory=dict)
    frames: int = 0
    frames_lost: int = 0
    freezes: int = 0
    freezes_source: int = 0  #: of the freezes, those the sending device made (gaps_source)
    media_seconds: float = 0.0
    late_starts: int = 0
    #: calls the callee declined, as their scenario asked (ok, and counted apart)
    declined: int = 0

    def quality(self, name: str, p: float) -> float | None:
        """The ``p`` percentile of a picture-quality figure over the call directions that had
        one (each direction's mean: see QUALITY), or None."""
        histogram = self.histograms.get(name)
        if histogram is None or not histogram.get_total_count():
            return None
        # SSIM is kept as 1 - SSIM: its low end is that one's high end
        return _quality_value(name, histogram.get_value_at_percentile(
            100 - p if name == "ssim" else p))

    def av_sync(self, p: float) -> float | None:
        """The ``p`` percentile of lip sync (ms, signed: + the sound after the picture) over
        the call directions that had it, from its two one-sided histograms, or None."""
        lag, lead = (self.histograms.get(name) for name in AV_SYNC)
        n_lag = lag.get_total_count() if lag is not None else 0
        n_lead = lead.get_total_count() if lead is not None else 0
        if not n_lag + n_lead:
            return None
        rank = p / 100 * (n_lag + n_lead)
        if rank <= n_lead and lead is not None:  # the lead side, largest first
            return -lead.get_value_at_percentile(max(0.0, 100 * (1 - rank / n_lead))) / 1000
        assert lag is not None
        return lag.get_value_at_percentile(min(100.0, 100 * (rank - n_lead) / n_lag)) / 1000

    def av_sync_size(self, p: float) -> float | None:
        """The ``p`` percentile of lip sync's size (|av_sync_ms|, either side), or None."""
        both = new_histogram()
        for name in AV_SYNC:
            if name in self.histograms:
                both.add(self.histograms[name])
        if not both.get_total_count():
            return None
        return both.get_value_at_percentile(p) / 1000

    def histogram(self, name: str) -> HdrHistogram:
        found = self.histograms.get(name)
        if found is None:
            found = self.histograms[name] = new_histogram()
        return found

    def add_call(self, outcome: Outcome, intervals: dict[str, float],
                 media: dict[str, dict[str, Any]], late: bool) -> None:
        self.calls += 1
        self.late_starts += int(late)
        self.declined += int(outcome.declined)
        if outcome.ok:
            self.ok += 1
        else:
            assert outcome.failure is not None
            self.failures[outcome.failure] = self.failures.get(outcome.failure, 0) + 1
            key = f"{outcome.failure}:{outcome.detail}"
            self.details[key] = self.details.get(key, 0) + 1
        for name, value in intervals.items():
            if name in PHASES:
                record_ms(self.histogram(name), value)
        for figures in media.values():
            for key, phase in (("latency_ms_p50", "media_latency_ms"),
                               ("latency_ms_p95", "media_latency_p95_ms"),
                               ("latency_ms_max", "media_latency_max_ms")):
                if figures.get(key) is not None:
                    record_ms(self.histogram(phase), figures[key])
            if figures.get("audio_latency_ms_p50") is not None:
                record_ms(self.histogram("audio_latency_ms"), figures["audio_latency_ms_p50"])
            skew = figures.get("av_sync_ms")
            if skew is not None:
                record_ms(self.histogram(AV_SYNC[0] if skew >= 0 else AV_SYNC[1]), abs(skew))
            for name in QUALITY:
                if figures.get(name) is not None:
                    record_ms(self.histogram(name), _quality_units(name, figures[name]))
            self.frames += figures.get("frames") or 0
            self.frames_lost += figures.get("frames_lost") or 0
            self.freezes += figures.get("gaps") or 0
            self.freezes_source += figures.get("gaps_source") or 0
            self.media_seconds += figures.get("duration_s") or 0.0

    def merge(self, other: Figures) -> None:
        self.calls += other.calls
        self.ok += other.ok
        self.late_starts += other.late_starts
        self.declined += other.declined
        for mine, theirs in ((self.failures, other.failures), (self.details, other.details)):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count
        for name, histogram in other.histograms.items():
            self.histogram(name).add(histogram)
        self.frames += other.frames
        self.frames_lost += other.frames_lost
        self.freezes += other.freezes
        self.freezes_source += other.freezes_source
        self.media_seconds += other.media_seconds

    @property
    def success_rate(self) -> float | None:
        return round(self.ok / self.calls, 4) if self.calls else None

    @property
    def frame_loss(self) -> float | None:
        """Frames lost / frames sent, over every direction of every call."""
        total = self.frames + self.frames_lost
        return round(self.frames_lost / total, 5) if total else None

    @property
    def freeze_ratio(self) -> float | None:
        """Freezes per frame received (DESIGN.md's freeze rule, per frame)."""
        return round(self.freezes / self.frames, 5) if self.frames else None

    @property
    def freezes_per_minute(self) -> float | None:
        return round(self.freezes / self.media_seconds * 60, 3) if self.media_seconds else None

    def summary(self) -> dict[str, Any]:
        """The figures as JSON, with the encoded histograms (so summaries merge exactly)."""
        return {
            "calls": self.calls, "ok": self.ok, "success_rate": self.success_rate,
            "failures": dict(sorted(self.failures.items())),
            "failure_details": dict(sorted(self.details.items())),
            "late_starts": self.late_starts, "declined": self.declined,
            "phases": {name: percentiles(h) for name, h in sorted(self.histograms.items())
                       if name not in NOT_PHASES},
            "quality": {**{name: self._quality_summary(name) for name in QUALITY},
                        "av_sync_ms": self._av_sync_summary()},
            "media": {"frames": self.frames, "frames_lost": self.frames_lost,
                      "frame_loss": self.frame_loss, "freezes": self.freezes,
                      "freezes_source": self.freezes_source,
                      "freezes_per_minute": self.freezes_per_minute,
                      "freeze_ratio": self.freeze_ratio,
                      "seconds": round(self.media_seconds, 3)},
            "histograms": {name: encode(h) for name, h in sorted(self.histograms.items())},
        }

    def _quality_summary(self, name: str) -> dict[str, float | int] | None:
        histogram = self.histograms.get(name)
        if histogram is None or not histogram.get_total_count():
            return None
        worst = histogram.get_max_value() if name == "ssim" else histogram.get_min_value()
        digits = 4 if name == "ssim" else 2
        return {"p5": round(self.quality(name, 5) or 0.0, digits),
                "p50": round(self.quality(name, 50) or 0.0, digits),
                "min": round(_quality_value(name, worst), digits),
                "n": histogram.get_total_count()}

    def _av_sync_summary(self) -> dict[str, float | int] | None:
        """Lip sync over the call directions: signed percentiles (+: the sound after the
        picture), the 95th percentile of its size (what --max-av-sync-ms judges), the count."""
        p50 = self.av_sync(50)
        if p50 is None:
            return None
        n = sum(self.histograms[name].get_total_count() for name in AV_SYNC
                if name in self.histograms)
        return {"p5": round(self.av_sync(5) or 0.0, 1), "p50": round(p50, 1),
                "p95": round(self.av_sync(95) or 0.0, 1),
                "size_p95": round(self.av_sync_size(95) or 0.0, 1), "n": n}

    @classmethod
    def from_summary(cls, data: dict[str, Any]) -> Figures:
        """Rebuild from :meth:`summary` output (counts and histograms: everything that merges)."""
        media = data.get("media", {})
        encoded = data.get("histograms", {})
        bad = [name for name, text in encoded.items() if not valid_b64(text)]
        if bad:
            raise ValueError(f"histograms not HdrHistogram base64: {', '.join(bad)}")
        return cls(calls=data["calls"], ok=data["ok"], failures=dict(data.get("failures", {})),
                   details=dict(data.get("failure_details", {})),
                   histograms={name: decode(text) for name, text in encoded.items()},
                   frames=media.get("frames", 0), frames_lost=media.get("frames_lost", 0),
                   freezes=media.get("freezes", 0),
                   freezes_source=media.get("freezes_source", 0),
                   media_seconds=media.get("seconds", 0.0),
                   late_starts=data.get("late_starts", 0), declined=data.get("declined", 0))


def sent_kbps(hops: list[dict[str, Any]]) -> float | None:
    """The video bitrate a call's senders sent, as their own servers received it (the first
    hop of each direction), the mean of the two directions; None without hop figures."""
    if not hops:
        return None
    found = [((hops[i].get("streams") or {}).get(d) or {}).get("video", {}).get("bitrate_kbps")
             for d, i in (("caller_to_callee", 0), ("callee_to_caller", -1))]
    known = [v for v in found if v]
    return round(sum(known) / len(known), 1) if known else None


@dataclass
class Recorder:
    """A run's figures: everything, per server (the caller's), per server crossed (every server
    on the call's path, the caller's and callee's included), and per time window (by the call's
    scheduled start, ``window_s`` wide)."""

    window_s: float = 5.0
    total: Figures = field(default_factory=Figures)
    #: keep figures per time window (False: a long run keeps its own, probe/stability.py:
    #: these hold several histograms each, too many for hours of windows)
    windowed: bool = True
    servers: dict[str, Figures] = field(default_factory=dict)
    windows: dict[int, Figures] = field(default_factory=dict)
    crossing: dict[str, Figures] = field(default_factory=dict)
    #: every hop of the calls (a server, a link, a device), by name (probe/hopstats.py)
    hops: HopsRecorder = field(default_factory=HopsRecorder)
    #: the calls' paths (server names, caller's server first) and how many calls took each
    paths: dict[tuple[str, ...], int] = field(default_factory=dict)

    def add(self, server: str, offset_s: float, outcome: Outcome, intervals: dict[str, float],
            media: dict[str, dict[str, Any]], late: bool = False,
            path: tuple[str, ...] | list[str] = (), hops: list[dict[str, Any]] | None = None,
            links: list[dict[str, Any]] | None = None,
            senders: dict[str, Any] | None = None) -> None:
        slices = [self.total, self.servers.setdefault(server, Figures())]
        if self.windowed:
            slices.append(self.windows.setdefault(int(offset_s // self.window_s), Figures()))
        slices += [self.crossing.setdefault(name, Figures()) for name in dict.fromkeys(path)]
        kbps = sent_kbps(hops or [])
        if kbps is not None:  # a histogram like the phases' (kbit/s, not ms)
            intervals = {**intervals, "video_kbps": kbps}
        for figures in slices:
            figures.add_call(outcome, intervals, media, late)
        self.hops.add(hops or [], links or [], media, senders)
        if path:
            self.paths[tuple(path)] = self.paths.get(tuple(path), 0) + 1

    def merge(self, other: Recorder, shift: int = 0) -> None:
        """Add ``other``'s figures; its windows move ``shift`` windows later (a later run)."""
        if other.window_s != self.window_s:
            raise ValueError(f"cannot merge windows of {other.window_s} s into {self.window_s} s")
        self.total.merge(other.total)
        self.hops.merge(other.hops)
        for path, calls in other.paths.items():
            self.paths[path] = self.paths.get(path, 0) + calls
        for name, figures in other.servers.items():
            self.servers.setdefault(name, Figures()).merge(figures)
        for name, figures in other.crossing.items():
            self.crossing.setdefault(name, Figures()).merge(figures)
        for index, figures in other.windows.items():
            self.windows.setdefault(index + shift, Figures()).merge(figures)

    def summary(self) -> dict[str, Any]:
        return {"window_s": self.window_s, "total": self.total.summary(),
                "servers": {n: f.summary() for n, f in sorted(self.servers.items())},
                "crossing": {n: f.summary() for n, f in sorted(self.crossing.items())},
                "windows": {str(i): f.summary() for i, f in sorted(self.windows.items())},
                "hops": self.hops.summary(),
                "paths": [{"path": list(path), "calls": calls} for path, calls in
                          sorted(self.paths.items(), key=lambda kv: (-kv[1], kv[0]))]}

    @classmethod
    def from_summary(cls, data: dict[str, Any]) -> Recorder:
        return cls(window_s=data["window_s"], total=Figures.from_summary(data["total"]),
                   servers={n: Figures.from_summary(f) for n, f in data["servers"].items()},
                   crossing={n: Figures.from_summary(f)
                             for n, f in data.get("crossing", {}).items()},
                   windows={int(i): Figures.from_summary(f) for i, f in data["windows"].items()},
                   hops=HopsRecorder.from_summary(data.get("hops", {})),
                   paths={tuple(p["path"]): p["calls"] for p in data.get("paths", [])})

    def timeseries(self) -> list[dict[str, Any]]:
        """One row per window: calls, success, and phase percentiles (for the CSV and plots)."""
        rows = []
        for index in sorted(self.windows):
            f = self.windows[index]
            row: dict[str, Any] = {"t_s": index * self.window_s, "calls": f.calls, "ok": f.ok,
                                   "failed": f.calls - f.ok, "success_rate": f.success_rate,
                                   "late_starts": f.late_starts}
            for phase in ("response_ms", "setup_ms", "media_latency_ms", "media_latency_p95_ms",
                          "audio_latency_ms", "video_kbps"):
                p = percentiles(f.histograms[phase]) if phase in f.histograms else None
                row[f"{phase}_p50"] = p["p50"] if p else None
                row[f"{phase}_p95"] = p["p95"] if p else None
            for name in QUALITY:
                value = f.quality(name, 50)
                row[f"{name}_p50"] = round(value, 4) if value is not None else None
            skew = f.av_sync(50)
            row["av_sync_ms_p50"] = round(skew, 1) if skew is not None else None
            rows.append(row)
        return rows
