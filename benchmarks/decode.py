"""Decode cost per wire message: wire.messages.decode (msgspec) against pydantic v2 models of the
same messages and against plain json.loads (parsing alone, no checks), in one run.

    .venv/bin/python benchmarks/decode.py [--json]

This is the measurement the choice of msgspec rests on (docs/protocol.md). pydantic is only
needed for its column (pip install pydantic); without it the column is left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wire.messages import NAME_PATTERN, decode

CALL = "5f2c0e9d3a6b41c7"
SDP = "v=0\r\n" + "a=candidate:1 1 UDP 2130706431 127.0.0.1 40000 typ host\r\n" * 60
MEDIA = {"frames": 90, "frames_lost": 0, "unreadable": 0, "fps": 30.0, "latency_ms_p50": 43.0,
         "latency_ms_p95": 45.7, "latency_ms_max": 50.1, "gaps": 0, "audio_frames": 150,
         "audio_level_dbfs": -20.0, "duration_s": 3.0}
FRAMES: dict[str, dict[str, Any]] = {
    "heartbeat": {"type": "heartbeat", "seq": 7},
    "register": {"type": "register", "device": "cam-1", "codecs": ["video/VP8", "video/H264"]},
    "offer": {"type": "offer", "call": CALL, "leg": CALL, "sdp": SDP},
    "stats": {"type": "stats", "call": CALL, "media": MEDIA},
    "call_update": {"type": "call_update", "call": CALL,
                    "events": {"t_first_frame_callee": 1700000000.123}},
    "call_setup": {"type": "call_setup", "call": CALL, "caller": "lower-a/cam-1",
                   "callee": "lower-b/cam-2", "codecs": ["video/VP8", "video/H264"],
                   "path": ["lower-a", "upper"]},
    "directory_100": {"type": "directory", "devices": [
        {"id": f"cam-{i}", "server": "lower-a", "state": "idle",
         "codecs": ["video/VP8", "video/H264"]} for i in range(100)]},
}


def pydantic_models() -> dict[str, Any] | None:
    """The same messages as pydantic v2 models, as strict as wire.messages (names, bounds,
    no unknown fields)."""
    try:
        from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
    except ImportError:
        return None
    name = Annotated[str, Field(pattern=NAME_PATTERN.replace("(?!\\n)", ""))]  # Rust: $ is the end
    call_id = Annotated[str, Field(pattern=r"^[A-Za-z0-9-]{1,64}$")]
    codec = Literal["video/VP8", "video/H264"]

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    class Heartbeat(Strict):
        type: Literal["heartbeat"]
        seq: int = Field(0, ge=0)

    class Register(Strict):
        type: Literal["register"]
        device: name
        version: int = 1
        codecs: list[codec] = Field(min_length=1, max_length=2)
        token: str | None = None

    class Offer(Strict):
        type: Literal["offer"]
        call: call_id
        leg: call_id
        sdp: str = Field(pattern=r"^v=0", max_length=65536)

    class Media(Strict):
        frames: int = Field(0, ge=0)
        frames_lost: int = Field(0, ge=0)
        unreadable: int = Field(0, ge=0)
        fps: float = Field(0.0, ge=0)
        latency_ms_p50: float | None = None
        latency_ms_p95: float | None = None
        latency_ms_max: float | None = None
        gaps: int = Field(0, ge=0)
        audio_frames: int = Field(0, ge=0)
        audio_level_dbfs: float | None = None
        duration_s: float = Field(0.0, ge=0)

    class Stats(Strict):
        type: Literal["stats"]
        call: call_id
        media: Media

    class CallUpdate(Strict):
        type: Literal["call_update"]
        call: call_id
        events: dict[Literal["t_first_frame_callee", "t_first_frame_caller", "t_routed"],
                     float] = {}

    class CallSetup(Strict):
        type: Literal["call_setup"]
        call: call_id
        caller: str
        callee: str
        codecs: list[codec]
        path: list[name]

    class Device(Strict):
        id: name
        server: name
        state: Literal["idle", "busy"] = "idle"
        codecs: list[codec]

    class Directory(Strict):
        type: Literal["directory"]
        devices: list[Device] = Field(default_factory=list, max_length=500)

    union = Annotated[Heartbeat | Register | Offer | Stats | CallUpdate | CallSetup | Directory,
                      Field(discriminator="type")]
    adapter = TypeAdapter(union)
    return {"decode": adapter.validate_json, "encode": adapter.dump_json}


def per_call_us(fn: Any, raw: Any, n: int) -> float:
    fn(raw)
    best = float("inf")
    for _ in range(3):  # best of three: the least disturbed
        started = time.perf_counter()
        for _ in range(n):
            fn(raw)
        best = min(best, (time.perf_counter() - started) / n * 1e6)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    pyd = pydantic_models()
    out: dict[str, dict[str, float]] = {}
    for name, frame in FRAMES.items():
        raw = json.dumps(frame)
        n = 300 if name.startswith("directory") else 10_000
        message = decode(raw)
        row = {"bytes": len(raw), "msgspec_us": per_call_us(decode, raw, n),
               "json_loads_us": per_call_us(json.loads, raw, n),
               "msgspec_encode_us": per_call_us(lambda m: m.to_json(), message, n)}
        if pyd is not None:
            row["pydantic_us"] = per_call_us(pyd["decode"], raw, n)
            row["pydantic_over_msgspec"] = row["pydantic_us"] / row["msgspec_us"]
            model = pyd["decode"](raw)
            row["pydantic_encode_us"] = per_call_us(pyd["encode"], model, n)
        out[name] = {k: round(v, 2) for k, v in row.items()}
    if args.json:
        print(json.dumps(out))
        return 0
    print("decode (validated) and encode, us per message; json.loads: parsing with no checks")
    print(f"{'message':<16}{'bytes':>7}{'msgspec':>9}{'pydantic':>10}{'json.loads':>12}"
          f"{'enc msgspec':>13}{'enc pydantic':>14}")
    for name, row in out.items():
        def cell(key: str, width: int, row: dict[str, float] = row) -> str:
            return f"{row[key]:{width}.2f}" if key in row else f"{'-':>{width}}"
        print(f"{name:<16}{row['bytes']:>7}{cell('msgspec_us', 9)}{cell('pydantic_us', 10)}"
              f"{cell('json_loads_us', 12)}{cell('msgspec_encode_us', 13)}"
              f"{cell('pydantic_encode_us', 14)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
