"""The probe's outputs: one JSON line per call, a summary JSON, a CSV time series and one
self-contained HTML report (inline SVG plots: it opens offline, with no script)."""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from probe.hopstats import run_name

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")

FILES = {"calls": "calls.jsonl", "summary": "summary.json", "timeseries": "timeseries.csv",
         "report": "report.html"}


class CallLog:
    """``calls.jsonl``, written as calls finish (a crashed run keeps what it had)."""

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = (out_dir / FILES["calls"]).open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / FILES["summary"]).write_text(json.dumps(summary, indent=1) + "\n")
    rows = timeseries_rows(summary)
    with (out_dir / FILES["timeseries"]).open("w", newline="", encoding="utf-8") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (out_dir / FILES["report"]).write_text(render_html(summary), encoding="utf-8")


def timeseries_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every load run's windows, one row each, with the run's rate (capacity runs have many)."""
    rows = []
    for index, run in enumerate(summary.get("runs", [])):
        for row in run.get("timeseries", []):
            rows.append({"run": index, "rate": run["rate"], **row})
    return rows


# ------------------------------------------------------------------------------ SVG plots


LEFT, RIGHT, TOP, BOTTOM = 60, 130, 28, 40  #: plot margins: axis labels, legend, title


def _no_data(title: str, width: int) -> str:
    return f'<svg class="plot" width="{width}" height="60"><text x="10" y="30">{_e(title)}: ' \
           f'no data</text></svg>'


def _frame(title: str, y_label: str, y1: float, width: int, height: int) -> list[str]:
    """The parts every plot shares: the svg element, title, x axis, y label and gridlines
    (values 0..y1)."""
    pw, ph = width - LEFT - RIGHT, height - TOP - BOTTOM
    parts = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" role="img" aria-label="{_e(title)}">',
             f'<text x="{LEFT}" y="18" font-weight="bold">{_e(title)}</text>',
             f'<line x1="{LEFT}" y1="{TOP + ph}" x2="{LEFT + pw}" y2="{TOP + ph}" stroke="#333"/>',
             f'<text x="12" y="{TOP + ph / 2}" font-size="11" transform="rotate(-90 12 '
             f'{TOP + ph / 2})" text-anchor="middle">{_e(y_label)}</text>']
    for i in range(5):
        y = y1 * i / 4
        yy = TOP + ph - y / y1 * ph
        parts.append(f'<text x="{LEFT - 6}" y="{yy + 4:.1f}" text-anchor="end" '
                     f'font-size="10">{y:.3g}</text><line x1="{LEFT}" y1="{yy:.1f}" '
                     f'x2="{LEFT + pw}" y2="{yy:.1f}" stroke="#ddd"/>')
    return parts


def _legend(names: Sequence[str], width: int) -> list[str]:
    x = width - RIGHT + 10
    return [f'<rect x="{x}" y="{TOP + 14 * n}" width="10" height="10" '
            f'fill="{COLORS[n % len(COLORS)]}"/><text x="{x + 14}" y="{TOP + 14 * n + 9}" '
            f'font-size="11">{_e(name)}</text>' for n, name in enumerate(names)]


def line_chart(title: str, xs: Sequence[float], series: dict[str, Sequence[float | None]],
               x_label: str, y_label: str, width: int = 640, height: int = 260,
               shade: Sequence[tuple[float, float, str, str]] = ()) -> str:
    """A line chart as inline SVG; None values break the line. ``shade``: spans of x drawn
    behind the lines, each (x0, x1, colour, what it is)."""
    values = [v for ys in series.values() for v in ys if v is not None]
    if not xs or not values:
        return _no_data(title, width)
    x0, x1 = min(xs), max(xs)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = max(values) * 1.1 or 1.0
    pw, ph = width - LEFT - RIGHT, height - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return TOP + ph - y / y1 * ph

    parts = _frame(title, y_label, y1, width, height)
    for a, b, color, what in shade:
        a, b = max(a, x0), min(b, x1)
        if b > a:
            parts.append(f'<rect class="shade" x="{px(a):.1f}" y="{TOP}" '
                         f'width="{max(1.0, px(b) - px(a)):.1f}" height="{ph}" fill="{color}" '
                         f'fill-opacity="0.25"><title>{_e(what)}</title></rect>')
    parts.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + ph}" stroke="#333"/>')
    for i in range(5):
        x = x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{px(x):.1f}" y="{TOP + ph + 14}" text-anchor="middle" '
                     f'font-size="10">{x:.3g}</text>')
    parts.append(f'<text x="{LEFT + pw / 2}" y="{height - 6}" text-anchor="middle" '
                 f'font-size="11">{_e(x_label)}</text>')
    for n, ys in enumerate(series.values()):
        color = COLORS[n % len(COLORS)]
        segment: list[str] = []
        for x, y in zip(xs, ys, strict=False):
            if y is None:
                if len(segment) > 1:
                    parts.append(_polyline(segment, color))
                segment = []
                continue
            segment.append(f"{px(x):.1f},{py(y):.1f}")
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>')
        if len(segment) > 1:
            parts.append(_polyline(segment, color))
    return "".join([*parts, *_legend(list(series), width), "</svg>"])


def bar_chart(title: str, categories: Sequence[str], series: dict[str, Sequence[float | None]],
              y_label: str, width: int = 640, height: int = 260) -> str:
    """Grouped bars as inline SVG: one group per category, one bar per series."""
    values = [v for ys in series.values() for v in ys if v is not None]
    if not categories or not values:
        return _no_data(title, width)
    y1 = max(values) * 1.1 or 1.0
    pw, ph = width - LEFT - RIGHT, height - TOP - BOTTOM
    group = pw / len(categories)
    bar = group * 0.8 / max(1, len(series))
    parts = _frame(title, y_label, y1, width, height)
    for c, category in enumerate(categories):
        gx = LEFT + c * group + group * 0.1
        parts.append(f'<text x="{LEFT + c * group + group / 2:.1f}" y="{TOP + ph + 14}" '
                     f'text-anchor="middle" font-size="11">{_e(category)}</text>')
        for n, ys in enumerate(series.values()):
            v = ys[c]
            if v is None:
                continue
            h = v / y1 * ph
            parts.append(f'<rect class="bar" x="{gx + n * bar:.1f}" y="{TOP + ph - h:.1f}" '
                         f'width="{bar * 0.95:.1f}" height="{h:.1f}" '
                         f'fill="{COLORS[n % len(COLORS)]}"><title>{_e(category)} '
                         f'{v:.3g}</title></rect>')
    return "".join([*parts, *_legend(list(series), width), "</svg>"])


def _polyline(points: list[str], color: str) -> str:
    return f'<polyline fill="none" stroke="{color}" stroke-width="1.6" ' \
           f'points="{" ".join(points)}"/>'


def _e(text: object) -> str:
    return html.escape(str(text))


# ------------------------------------------------------------------------------ HTML


def _phase(figures: dict[str, Any], phase: str, p: str) -> float | None:
    found = (figures.get("phases") or {}).get(phase)
    return found.get(p) if found else None


def write_soak(out_dir: Path, summary: dict[str, Any]) -> None:
    """A soak's outputs (calls.jsonl is written as calls end): summary.json, timeseries.csv
    (one row per window and server: the trends) and report.html; each written whole to a
    temporary name and renamed, so a reader never sees half a file."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def put(name: str, text: str) -> None:
        path = out_dir / FILES[name]
        temp = path.with_suffix(path.suffix + ".part")
        temp.write_text(text, encoding="utf-8")
        temp.replace(path)

    put("summary", json.dumps(summary, indent=1) + "\n")
    rows = [{"window": i, "server": name, **row}
            for name, found in (summary.get("trends") or {}).get("servers", {}).items()
            for i, row in enumerate(found)]
    rows.sort(key=lambda r: (r["window"], r["server"]))
    text = io.StringIO()
    if rows:
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    put("timeseries", text.getvalue())
    put("report", render_html(summary))


#: colours of the spans drawn behind a soak's trend plots
FAULT_COLOR, UNSTABLE_COLOR, INCIDENT_COLOR = "#888888", "#d62728", "#ff7f0e"

#: a soak's per-server trend plots: (title, unit, the rows' keys)
TREND_PLOTS = (
    ("memory (RSS)", "MB", ("rss_mb",)),
    ("loop lag, transit", "ms", ("loop_lag_p95_ms", "transit_p99_ms")),
    ("response, media tail", "ms", ("response_p95_ms", "media_p95_ms")),
    ("calls, failed, charged", "calls", ("calls", "failed", "blamed")),
    ("files, tasks, legs", "count", ("open_fds", "tasks", "legs_max")),
)


def _stability_html(summary: dict[str, Any]) -> list[str]:
    stability = summary["stability"]
    trends = (summary.get("trends") or {}).get("servers", {})
    window = stability["window_s"]
    body = ["<h2>Stability</h2>",
            f"<p>{stability['windows']} windows of {window:g} s, warm-up "
            f"{stability['warmup_s']:g} s. "
            + ("<b>Every server stable.</b>" if stability.get("stable")
               else "<b class=bad>Not stable.</b>")
            + (" (the run is still going: these are the windows so far)"
               if not stability.get("final") else "") + "</p>",
            "<table><tr><th>server</th><th>verdict</th><th>reasons</th><th>restarts</th>"
            "<th>recovery s</th><th>memory MB/h after warm-up</th>"
            "<th>failures charged to it</th></tr>"]
    for name, found in stability["servers"].items():
        rss = (found.get("leaks") or {}).get("rss_mb") or {}
        cls = "" if found["verdict"] == "stable" else " class=bad"
        memory = "-"
        if rss:
            memory = (f"<span title='{_e(rss.get('why'))}'>{rss['per_hour']:+.3g}: "
                      + ("<b class=bad>leak</b>" if rss.get("leaking") else "no leak")
                      + "</span>")
        body.append(f"<tr><td>{_e(name)}</td><td{cls}>{_e(found['verdict'])}</td>"
                    f"<td style='text-align:left'>{_e('; '.join(found['reasons']) or '-')}</td>"
                    f"<td>{found['restarts']}</td><td>{_fmt(found.get('recovery_s'))}</td>"
                    f"<td>{memory}</td><td>{found.get('blamed_failures', 0)}</td></tr>")
    body.append("</table>")
    incidents = stability.get("incidents") or []
    if incidents:
        body.append("<h3>Incidents</h3><table><tr><th>server</th><th>what</th><th>made</th>"
                    "<th>start s</th><th>end s</th><th>calls hit</th><th>how they ended</th>"
                    "<th>detect s</th><th>first call ok s</th><th>directories whole s</th>"
                    "<th>lost</th></tr>")
        for i in incidents:
            body.append(f"<tr><td>{_e(i['server'])}</td><td style='text-align:left'>"
                        f"{_e(i['kind'])}: {_e(i['detail'])}</td><td>{_e(i['made'])}</td>"
                        f"<td>{_fmt(i['start_s'])}</td><td>{_fmt(i['end_s'])}</td>"
                        f"<td>{i['calls_hit']}</td><td style='text-align:left'>"
                        f"{_e(i['outcomes'] or '-')}</td><td>{_fmt(i['detect_s'])}</td>"
                        f"<td>{_fmt(i['first_ok_call_s'])}</td>"
                        f"<td>{_fmt(i['directory_whole_s'])}</td>"
                        f"<td>{_e(i['lost'] or '-')}</td></tr>")
        body.append("</table>")
    invariants = stability.get("invariants")
    if invariants is not None:
        ends = invariants["calls_ended_everywhere"]
        body.append("<h3>Invariants at the end</h3><ul>"
                    f"<li>every call ended with a reason at every server of its path: "
                    f"{'yes' if ends['ok'] else '<b class=bad>no</b>'} ({ends['checked']} "
                    f"answers, {ends['broken']} broken, {ends['excused']} explained by an "
                    f"incident)</li>"
                    f"<li>idle: 0 calls, 0 legs, tasks and open files back: "
                    f"{'yes' if invariants['idle']['ok'] else '<b class=bad>no</b>'}</li>"
                    f"<li>every device registered again: "
                    f"{'yes' if invariants['devices_back']['ok'] else '<b class=bad>no</b>'}"
                    f"</li><li>every server's directory agrees: "
                    f"{'yes' if invariants['directories_agree']['ok'] else '<b class=bad>no</b>'}"
                    "</li></ul>")
        for name, broken in invariants["broken_at"].items():
            body.append(f"<p class=bad>{_e(name)}: {_e('; '.join(broken))}</p>")
    faults = [(f["start_s"], f["end_s"] if f["end_s"] is not None else f["start_s"] + window,
               f["server"], f"{f['kind']}: {f['what']}") for f in stability.get("faults", [])]
    body.append("<h3>Trends per server</h3><p>Grey: a fault the plan made there; orange: an "
                "incident found there (a restart, unreachable); red: an unstable window.</p>")
    for name, rows in trends.items():
        if not rows:
            continue
        found = stability["servers"].get(name, {})
        shade = [(a, b, FAULT_COLOR, what) for a, b, server, what in faults if server == name]
        shade += [(i["start_s"], i["end_s"] if i["end_s"] is not None else rows[-1]["t_s"],
                   INCIDENT_COLOR, f"{i['kind']}: {i['detail']}") for i in incidents
                  if i["server"] == name and not i["made"] and i["kind"] != "degraded"]
        shade += [(w["start_s"], w["end_s"], UNSTABLE_COLOR, f"unstable: {w['signals']}")
                  for w in found.get("unstable_windows", [])]
        xs = [row["t_s"] for row in rows]
        body.append(f"<h4>{_e(name)}: {_e(found.get('verdict', ''))}</h4><div class=trends>")
        for title, unit, keys in TREND_PLOTS:
            body.append(line_chart(f"{name}: {title}", xs, {
                key: [row.get(key) for row in rows] for key in keys},
                "s since the start", unit, width=520, height=190, shade=shade))
        body.append("</div>")
    probe = (summary.get("trends") or {}).get("probe") or []
    if probe:
        body.append(line_chart("The probe itself: memory and worst loop lag per window",
                               [r["t_s"] for r in probe],
                               {"RSS MB": [r.get("rss_mb") for r in probe],
                                "loop lag ms": [r.get("loop_lag_ms") for r in probe]},
                               "s since the start", "MB / ms", width=560, height=200))
    return body


def render_html(summary: dict[str, Any]) -> str:
    runs = summary.get("runs", [])
    total = summary.get("figures", {})
    servers = total.get("servers", {})
    validity = ("<b>valid</b>" if summary.get("valid", True)
                else "<b class=bad>INVALID</b>: the probe lagged")
    body = [f"<h1>Probe report: {_e(summary.get('command', 'load'))}</h1>",
            f"<p>{_e(summary.get('started_at', ''))} &middot; servers: "
            f"{_e(', '.join(summary.get('servers', [])))} &middot; {validity}"
            f" &middot; objective {'met' if summary.get('objective_met') else 'missed'}</p>"]
    if summary.get("objective"):
        body.append(f"<p>Objective: <code>{_e(summary['objective'])}</code></p>")
    if summary.get("stability"):
        body.extend(_stability_html(summary))
    if summary.get("capacity"):
        body.append("<h2>Capacity</h2><table><tr><th>server</th><th>sustainable calls/s</th>"
                    "<th>concurrent calls</th><th>first failing calls/s</th><th>why</th></tr>")
        for name, found in summary["capacity"].items():
            body.append(f"<tr><td>{_e(name)}</td><td>{_e(found.get('rate'))}</td>"
                        f"<td>{_e(found.get('concurrent'))}</td>"
                        f"<td>{_e(found.get('failed_rate'))}</td>"
                        f"<td>{_e('; '.join(found.get('failed_because', [])))}</td></tr>")
        body.append("</table>")
        for name, steps in summary.get("capacity_steps", {}).items():
            steps = sorted(steps, key=lambda s: s["rate"])
            rates = [s["rate"] for s in steps]
            series = {"success %": [(s["success_rate"] or 0) * 100 for s in steps],
                      "setup p95 ms / 10": [(s["setup_p95_ms"] or 0) / 10 for s in steps],
                      "response p95 ms": [s["response_p95_ms"] for s in steps]}
            cpu = [(s.get("server_cpu_pct") or {}).get(name) for s in steps]
            if any(value is not None for value in cpu):
                series[f"{name} CPU %"] = cpu
            body.append(line_chart(f"Capacity curve: {name}", rates, series, "calls/s",
                                   "value"))
        gave = [(name, found["gave_way"]) for name, found in summary["capacity"].items()
                if found.get("gave_way")]
        if gave:
            body.append(_gave_way_table(gave))
    body.append("<h2>Per server</h2>" + _server_table(servers))
    if total.get("paths") and total.get("hops"):
        body.append(_paths(total["paths"], total["hops"]))
    names = sorted(servers)
    body.append(bar_chart("Response time percentiles per server (ms)", names,
                          {p: [_phase(servers[n], "response_ms", p) for n in names]
                           for p in ("p50", "p95", "p99")}, "ms"))
    body.append(bar_chart("Setup time percentiles per server (ms)", names,
                          {p: [_phase(servers[n], "setup_ms", p) for n in names]
                           for p in ("p50", "p95", "p99")}, "ms"))
    rows = [r for run in runs for r in run.get("timeseries_abs", run.get("timeseries", []))]
    xs = [r["t_s"] for r in rows]
    body.append(line_chart("Latency over time", xs, {
        "response p50": [r["response_ms_p50"] for r in rows],
        "response p95": [r["response_ms_p95"] for r in rows],
        "setup p50": [r["setup_ms_p50"] for r in rows],
        "setup p95": [r["setup_ms_p95"] for r in rows],
        "media p50": [r["media_latency_ms_p50"] for r in rows]}, "s since start", "ms"))
    if any(r.get("video_kbps_p50") is not None for r in rows):
        body.append(line_chart("Video bitrate over time (what the senders sent, p50/p95 of the "
                               "calls started in each window)", xs, {
                                   "p50": [r.get("video_kbps_p50") for r in rows],
                                   "p95": [r.get("video_kbps_p95") for r in rows]},
                               "s since start", "kbit/s"))
    series = [c for run in runs for c in run.get("sampled_calls", []) if c.get("series")]
    if series:
        body.append(_bitrate_series(series))
    body.append(line_chart("Success rate and calls per window", xs, {
        "success %": [r["success_rate"] * 100 if r["success_rate"] is not None else None
                      for r in rows],
        "calls": [r["calls"] for r in rows]}, "s since start", "% / calls"))
    body.append("<h2>Runs</h2><table><tr><th>rate</th><th>scheduled</th><th>started</th>"
                "<th>skipped (cap)</th><th>skipped (no devices)</th><th>late</th>"
                "<th>schedule error p99 ms</th><th>probe lag p99 ms</th><th>probe CPU %</th>"
                "<th>valid</th></tr>")
    for run in runs:
        err = run.get("schedule_error_ms") or {}
        probe = run.get("probe") or {}
        body.append(f"<tr><td>{_e(run['rate'])}</td><td>{run['scheduled']}</td>"
                    f"<td>{run['started']}</td><td>{run['skipped_cap']}</td>"
                    f"<td>{run['skipped_no_devices']}</td><td>{run['late_starts']}</td>"
                    f"<td>{_e(err.get('p99'))}</td><td>{_e(probe.get('loop_lag_ms_p99'))}</td>"
                    f"<td>{_e(probe.get('cpu_pct'))}</td><td>{_e(run['valid'])}</td></tr>")
    body.append("</table>")
    if summary.get("server_metrics"):
        body.append("<h2>What the servers said (/metrics)</h2>"
                    + _server_metrics_table(summary["server_metrics"]))
    failures = total.get("total", {}).get("failure_details", {})
    if failures:
        body.append("<h2>Failures</h2><table><tr><th>class:detail</th><th>calls</th></tr>"
                    + "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>"
                              for k, v in failures.items()) + "</table>")
    style = ("body{font-family:sans-serif;margin:24px;max-width:1100px}"
             "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;font-size:13px;text-align:right}svg.plot{display:block;"
             "margin:12px 0}.bad{color:#c00}"
             ".path{display:flex;flex-wrap:wrap;align-items:center;gap:4px;margin:4px 0 16px}"
             ".path div{border:1px solid #888;border-radius:4px;padding:4px 8px;font-size:12px;"
             "background:#f4f7fb}.path div.link{border-style:dashed;background:#fff}"
             ".path div.bottleneck{border:2px solid #c00;background:#fdecec}"
             ".bn{color:#c00;font-weight:bold}"
             ".trends{display:flex;flex-wrap:wrap;gap:0 12px}.trends svg.plot{margin:4px 0}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Probe report</title>"
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def _bitrate_series(calls: list[dict[str, Any]], most: int = 4) -> str:
    """Calls sampled while up (``--sample``): per direction, what the sender sent each second
    and the rate the path allowed it (congestion control)."""
    out = []
    for call in calls[:most]:
        for direction, rows in call["series"].items():
            xs = [r["t_s"] for r in rows]
            out.append(line_chart(
                f"Call {call.get('call')} {direction}: video sent and allowed (kbit/s)", xs, {
                    "sent": [r.get("sent_kbps") for r in rows],
                    "allowed (REMB to the sender)": [r.get("reported_kbps") for r in rows],
                    "encoder target": [r.get("target_kbps") for r in rows]},
                "s since the call was up", "kbit/s"))
    return "\n".join(out)


#: a server on a path whose median call's transit p99 is past this is marked (ms: the capacity
#: search's give-way limit, probe/capacity.py GiveWay)
TRANSIT_TAIL_MS = 20.0


def _paths(paths: list[dict[str, Any]], hops: dict[str, Any], most: int = 8) -> str:
    """The calls' paths, each as a row of hops (caller's devices, link, server, ..., callee's
    devices) with the run's figures of each hop: its latency part p50 and share of the row, the
    loss on a link and on arrival at a server, setup p50 of a link, and how often it was a
    call's bottleneck. The row's largest latency part, any hop that was the bottleneck of most
    of its calls by loss or setup, and any server whose calls' transit tails are long (a
    server that stalls now and then hides in the p50s), are marked."""
    out = ["<h2>Where the calls were held back: the paths</h2>",
           "<p>Each hop's figures are over every call of the run that crossed it: video latency "
           "part p50 (server: transit; link: one-way estimate, both ways; devices: their own "
           "parts) and its share of the row; loss before repair; setup p50.</p>"]
    for entry in paths[:most]:
        path = entry["path"]
        nodes = [f"{path[0]}/*", *path, f"{path[-1]}/*"]
        row: list[tuple[str, bool]] = []  # (hop name, is a link)
        for i, node in enumerate(nodes):
            if i:
                row.append((run_name(f"{nodes[i - 1]} -> {node}"), True))
            row.append((node, False))
        latency = {name: ((hops.get(name) or {}).get("latency_ms") or {}).get("p50")
                   for name, _ in row}
        total = sum(v for v in latency.values() if v) or 0.0
        worst = max(latency, key=lambda n: latency[n] or 0.0) if total > 0 else None
        cells = []
        for name, link in row:
            hop = hops.get(name) or {}
            part = latency[name]
            lines = ["<b>&harr;</b>" if link else f"<b>{_e(name)}</b>"]
            if part is not None:
                share = f" ({part / total:.0%})" if total > 0 else ""
                lines.append(f"latency {_fmt(part)} ms{share}")
            loss = hop.get("loss") if link else hop.get("loss_in")
            if loss:
                lines.append(f"loss {loss:.2%}")
            setup = (hop.get("setup_ms") or {}).get("p50")
            if link and setup is not None:
                lines.append(f"setup {_fmt(setup)} ms")
            transit = (hop.get("transit_p99_ms") or {}).get("p50")
            if transit is not None:
                lines.append(f"transit p99 {_fmt(transit)} ms")
            calls = hop.get("calls") or 0
            marks = [m for m, n in (hop.get("bottleneck") or {}).items()
                     if calls and n * 2 > calls and m != "latency_ms"]
            if name == worst:
                marks.insert(0, "latency_ms")
            if transit is not None and transit > TRANSIT_TAIL_MS:
                # a server that stalls now and then: its typical packet is quick, its calls'
                # tails are not (the median call's transit p99 past capacity's give-way limit)
                marks.append("transit tail")
            if marks:
                lines.append("<span class=bn>bottleneck: " + ", ".join(
                    m.removesuffix("_ms") for m in marks) + "</span>")
            kind = "link" if link else "hop"
            cells.append(f"<div class='{kind}{' bottleneck' if marks else ''}' "
                         f"title='{_e(name)}'>"
                         + "<br>".join(lines) + "</div>")
        out.append(f"<p>{_e(' → '.join(path))}: {entry['calls']} calls</p>"
                   f"<div class=path>{''.join(cells)}</div>")
    if len(paths) > most:
        out.append(f"<p>... and {len(paths) - most} more paths (summary.json: figures.paths)"
                   "</p>")
    return "\n".join(out)


def _gave_way_table(gave: list[tuple[str, dict[str, Any]]]) -> str:
    rows = ["<h3>Which server gave way first</h3><table><tr><th>search</th><th>server</th>"
            "<th>by</th><th>value</th><th>limit</th><th>at calls/s</th>"
            "<th>at the first failing rate: transit p99 ms / loop lag p99 ms / CPU % / loss"
            "</th></tr>"]
    for search, found in gave:
        at = "<br>".join(
            f"{_e(server)}: {_fmt(v.get('transit_p99_ms'))} / {_fmt(v.get('loop_lag_p99_ms'))}"
            f" / {_fmt(v.get('cpu_pct'))} / {_fmt(v.get('loss_in'))}"
            for server, v in sorted(found.get("at_failing_rate", {}).items()))
        named = found.get("server") or "-"
        if found.get("server") and not found.get("past_limit"):
            named += " (nearest: none past a limit)"
        rows.append(f"<tr><td>{_e(search)}</td><td>{_e(named)}</td>"
                    f"<td>{_e(found.get('by', '-'))}</td><td>{_fmt(found.get('value'))}</td>"
                    f"<td>{_fmt(found.get('limit'))}</td><td>{_fmt(found.get('rate'))}</td>"
                    f"<td style='text-align:left'>{at}</td></tr>")
    return "".join(rows) + "</table>"


def _server_table(servers: dict[str, Any]) -> str:
    head = ("<table><tr><th>server</th><th>calls</th><th>ok</th><th>success</th>"
            "<th>response p50/p95/p99 ms</th><th>server time p50 ms</th>"
            "<th>setup p50/p95 ms</th><th>media latency p50/p95 ms</th><th>frame loss</th>"
            "<th>freezes/min</th><th>audio latency p50/p95 ms</th><th>lip sync p50 ms</th>"
            "<th>MOS p5 / p50</th><th>PSNR p5 / p50 dB</th><th>SSIM p5</th>"
            "<th>failures</th></tr>")
    rows = []
    for name, f in sorted(servers.items()):
        def trio(phase: str, ps: tuple[str, ...] = ("p50", "p95", "p99"), f: Any = f) -> str:
            return " / ".join(_fmt(_phase(f, phase, p)) for p in ps)
        rate = f.get("success_rate")
        media = f.get("media", {})
        rows.append(f"<tr><td>{_e(name)}</td><td>{f['calls']}</td><td>{f['ok']}</td>"
                    f"<td>{_fmt(rate * 100 if rate is not None else None)} %</td>"
                    f"<td>{trio('response_ms')}</td><td>{trio('server_time_ms', ('p50',))}</td>"
                    f"<td>{trio('setup_ms', ('p50', 'p95'))}</td>"
                    f"<td>{trio('media_latency_ms', ('p50', 'p95'))}</td>"
                    f"<td>{_fmt(media.get('frame_loss'))}</td>"
                    f"<td>{_fmt(media.get('freezes_per_minute'))}</td>"
                    f"<td>{trio('audio_latency_ms', ('p50', 'p95'))}</td>"
                    f"<td>{_quality(f, 'av_sync_ms', ('p50',))}</td>"
                    f"<td>{_quality(f, 'mos', ('p5', 'p50'))}</td>"
                    f"<td>{_quality(f, 'psnr_db', ('p5', 'p50'))}</td>"
                    f"<td>{_quality(f, 'ssim', ('p5',))}</td>"
                    f"<td>{_e(f.get('failures') or '')}</td></tr>")
    return head + "".join(rows) + "</table>"


def _quality(figures: dict[str, Any], name: str, ps: tuple[str, ...]) -> str:
    found = (figures.get("quality") or {}).get(name) or {}
    return " / ".join(_fmt(found.get(p)) for p in ps)


def _server_metrics_table(server_metrics: dict[str, Any]) -> str:
    head = ("<table><tr><th>server</th><th>CPU %</th><th>memory MB start / end / peak</th>"
            "<th>legs peak</th><th>tasks start / end</th><th>loop lag p99 ms &le;</th>"
            "<th>counters moved during the run</th></tr>")
    rows = []
    for name, s in sorted(server_metrics.items()):
        if "counters" not in s:
            rows.append(f"<tr><td>{_e(name)}</td><td colspan=6>unreadable: "
                        f"{_e(s.get('last_error'))}</td></tr>")
            continue
        memory, tasks = s["memory_mb"], s["tasks"]
        counters = "<br>".join(f"{_e(k)}: {v:g}" for k, v in s["counters"].items())
        restarted = " (restarted)" if s.get("restarted") else ""
        rows.append(f"<tr><td>{_e(name)}{restarted}</td><td>{_fmt(s['cpu_pct'])}</td>"
                    f"<td>{_fmt(memory['start'])} / {_fmt(memory['end'])} / "
                    f"{_fmt(memory['peak'])}</td><td>{_fmt(s['legs']['peak'])}</td>"
                    f"<td>{_fmt(tasks['start'])} / {_fmt(tasks['end'])}</td>"
                    f"<td>{_fmt(s['loop_lag_p99_ms_at_most'])}</td>"
                    f"<td style='text-align:left'>{counters or '-'}</td></tr>")
    return head + "".join(rows) + "</table>"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
