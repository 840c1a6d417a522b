"""Soak: ``probe soak`` on a local tree for a long time at a steady rate, no faults; each server's
verdict (leaks by Theil-Sen after warm-up, unstable windows, restarts, invariants at idle) and
the probe's own memory (start, peak, end, and its trend after warm-up: the probe keeps no
per-call list, so it stays flat however long it runs).

    .venv/bin/python benchmarks/soak.py [--minutes 60] [--rate 1.5] [--hold 3] [--tree] [--json]

``--tree``: seven servers (root, mid-1, mid-2, four lower servers) instead of three. Exit status
0 when every server is stable and every invariant holds. The run's outputs (summary.json,
report.html with every server's trends, calls.jsonl) stay in --out (default a temp dir).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

TREE = {"name": "root", "children": [
    {"name": "mid-1", "children": [{"name": "lower-a1"}, {"name": "lower-a2"}]},
    {"name": "mid-2", "children": [{"name": "lower-b1"}, {"name": "lower-b2"}]}]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = args.out or Path(tempfile.mkdtemp(prefix="vphone-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "probe", "soak", "--local", "--devices", str(args.devices),
            "--size", "320x240", "--duration", f"{args.minutes * 60:g}s", "--rate",
            str(args.rate), "--hold", str(args.hold), "--window", str(args.window),
            "--max-lag-ms", "500", "--out", str(out / "soak"), "--json"]
    if args.tree:
        topology = out / "tree.json"
        topology.write_text(json.dumps(TREE))
        argv += ["--topology", str(topology)]
    done = subprocess.run(argv, capture_output=True, text=True,
                          timeout=args.minutes * 60 + 900)
    (out / "soak.err").write_text(done.stderr)
    try:
        summary = json.loads((out / "soak" / "summary.json").read_text())
    except (OSError, ValueError):
        raise SystemExit(f"probe soak wrote no summary (exit {done.returncode}); see "
                         f"{out / 'soak.err'}") from None
    stability = summary["stability"]
    servers = {}
    for name, found in stability["servers"].items():
        rss = (found.get("leaks") or {}).get("rss_mb") or {}
        metrics = (summary.get("server_metrics") or {}).get(name, {})
        servers[name] = {"verdict": found["verdict"], "reasons": found["reasons"],
                         "memory_mb": metrics.get("memory_mb"),
                         "memory_mb_per_hour": rss.get("per_hour"),
                         "memory_range": rss.get("range"), "memory_why": rss.get("why"),
                         "tasks": metrics.get("tasks"), "unstable_windows": len(
                             found["unstable_windows"])}
    total = summary["figures"]["total"]
    return {"minutes": args.minutes, "rate": args.rate, "exit": done.returncode,
            "calls": total["calls"], "ok": total["ok"], "failures": total["failures"],
            "windows": stability["windows"], "warmup_s": stability["warmup_s"],
            "stable": stability["stable"], "servers": servers,
            "invariants_ok": (stability.get("invariants") or {}).get("ok"),
            "probe_memory_mb": stability["probe"].get("memory_mb"),
            "probe_loop_lag_ms_p99": summary["runs"][0]["probe"].get("loop_lag_ms_p99"),
            "out": str(out / "soak")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=1.5, help="calls started per second")
    parser.add_argument("--hold", type=float, default=3.0)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--devices", type=int, default=6, help="per lower server")
    parser.add_argument("--tree", action="store_true", help="seven servers, not three")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = run(args)
    if args.json:
        print(json.dumps(out))
        return 0 if out["stable"] else 1
    print(f"{'STABLE' if out['stable'] else 'NOT STABLE'}: {out['calls']} calls in "
          f"{args.minutes:g} min at {args.rate:g}/s, {out['ok']} ok, failures "
          f"{out['failures'] or 'none'}; {out['windows']} windows, warm-up {out['warmup_s']:g} s;"
          f" invariants {'hold' if out['invariants_ok'] else 'BROKEN'}")
    for name, s in out["servers"].items():
        memory = s["memory_mb"] or {}
        print(f"  {name:<10} {s['verdict']:<9} memory {memory.get('start')} -> "
              f"{memory.get('end')} MB, after warm-up {s['memory_mb_per_hour']} MB/h "
              f"({s['memory_range']}): {s['memory_why']}; unstable windows "
              f"{s['unstable_windows']}" + (f"; {'; '.join(s['reasons'])}" if s["reasons"]
                                            else ""))
    probe = out["probe_memory_mb"] or {}
    trend = probe.get("trend") or {}
    print(f"  probe      memory {probe.get('start')} -> {probe.get('end')} MB, peak "
          f"{probe.get('peak')} MB, after warm-up {trend.get('per_hour')} MB/h "
          f"({trend.get('why')}); loop lag p99 {out['probe_loop_lag_ms_p99']} ms")
    print(f"  outputs: {out['out']}")
    return 0 if out["stable"] else 1


if __name__ == "__main__":
    sys.exit(main())
