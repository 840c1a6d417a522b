"""The directory at scale, over real WebSockets: a real root and real mid servers (processes), and
1,000 lower servers with 100 devices each, simulated in this process (each one trunk speaking
the real protocol: announce, welcome, its devices as one directory increment, and every message
its parent sends it counted). Two real lower servers with packet devices sit in the tree too, and
a call between them is routed across it.

    .venv/bin/python benchmarks/directory.py [--lowers 1000] [--devices 100] [--mids 10] [--json]

Prints: how long the tree took to fill the root's directory; what each kind of server holds and
its memory; what one device changing state and one server joining cost in messages (counted at
every simulated lower server); the largest message seen; and the path of a real call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.stack import LocalStack, StackSettings
from lab.topology import TreeNode
from wire.messages import (
    MAX_MESSAGE_BYTES,
    Announce,
    DeviceInfo,
    Directory,
    Welcome,
    decode,
)


class _Counted(msgspec.Struct):
    servers: list[msgspec.Raw] = []
    servers_removed: list[msgspec.Raw] = []


COUNTED = msgspec.json.Decoder(_Counted)


@dataclass
class FakeLower:
    """One simulated lower server: a real trunk to its parent, its devices, what it was sent."""

    name: str
    devices: int
    messages: int = 0
    bytes: int = 0
    largest: int = 0
    entries: int = 0  #: directory entries received (servers added or removed)
    ws: aiohttp.ClientWebSocketResponse | None = None
    reader: asyncio.Task[None] | None = None
    welcomed: asyncio.Event = field(default_factory=asyncio.Event)

    async def connect(self, session: aiohttp.ClientSession, parent: str) -> None:
        self.ws = await session.ws_connect(parent.replace("http", "ws") + "/v1/trunk",
                                           max_msg_size=MAX_MESSAGE_BYTES, heartbeat=10)
        await self.ws.send_str(Announce(server=self.name, url=f"http://{self.name}:8080",
                                        role="lower").to_json())
        self.reader = asyncio.create_task(self._read())
        await asyncio.wait_for(self.welcomed.wait(), 30)
        devices = [DeviceInfo(id=f"cam-{i}", server=self.name) for i in range(self.devices)]
        for start in range(0, len(devices), 500):
            await self.ws.send_str(Directory(devices=devices[start:start + 500]).to_json())

    async def set_state(self, device: int, state: str) -> None:
        assert self.ws is not None
        await self.ws.send_str(Directory(devices=[DeviceInfo(
            id=f"cam-{device}", server=self.name, state=state)]).to_json())  # type: ignore[arg-type]

    async def _read(self) -> None:
        """Count what arrives. The first message (the welcome) is decoded whole; the rest only
        as far as counting needs (a thousand simulated servers share this one process, and
        must answer their parents' pings in time as real ones would)."""
        assert self.ws is not None
        async for frame in self.ws:
            if frame.type != aiohttp.WSMsgType.TEXT:
                continue
            self.messages += 1
            self.bytes += len(frame.data)
            self.largest = max(self.largest, len(frame.data))
            if not self.welcomed.is_set():
                if isinstance(decode(frame.data), Welcome):
                    self.welcomed.set()
                continue
            counted = COUNTED.decode(frame.data)
            self.entries += len(counted.servers) + len(counted.servers_removed)

    def counts(self) -> tuple[int, int]:
        return self.messages, self.entries

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader


def log(text: str) -> None:
    print(f"directory: {text}", file=sys.stderr, flush=True)


async def get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=60)) as r:
        return await r.json()


async def memory_mb(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("process_resident_memory_bytes "):
                return round(float(line.split()[1]) / 2**20, 1)
    return -1.0


async def settle(fakes: list[FakeLower], quiet_s: float = 1.0) -> None:
    """Wait until no simulated server has been sent anything for ``quiet_s``."""
    last = sum(f.messages for f in fakes)
    while True:
        await asyncio.sleep(quiet_s)
        now = sum(f.messages for f in fakes)
        if now == last:
            return
        last = now


async def run(args: argparse.Namespace) -> dict[str, Any]:
    mids = [TreeNode(f"mid-{m}", (TreeNode(f"real-{m}", devices=1),) if m < 2 else
                     (TreeNode(f"stub-{m}", devices=0),)) for m in range(args.mids)]
    topology = TreeNode("root", tuple(mids))
    settings = StackSettings(devices=1, video="packets", topology=topology,
                             start_timeout_s=60)
    out: dict[str, Any] = {"lowers": args.lowers, "devices_per_lower": args.devices,
                           "mids": args.mids}
    async with LocalStack(settings) as stack, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0)) as session:
        root = stack.url("root")
        fakes = [FakeLower(f"lower-{i:04d}", args.devices) for i in range(args.lowers)]
        began = time.monotonic()
        next_log = began + 10
        gate = asyncio.Semaphore(50)

        async def join(i: int, fake: FakeLower) -> None:
            async with gate:
                await fake.connect(session, stack.url(f"mid-{i % args.mids}"))

        try:
            await asyncio.gather(*(join(i, f) for i, f in enumerate(fakes)))
            log(f"{len(fakes)} lower servers joined after {time.monotonic() - began:.1f} s")
            expected = args.lowers * args.devices + 2  # and the two real devices
            while True:
                health = await get(session, root + "/healthz")
                if health["devices"] >= expected:
                    break
                if time.monotonic() >= next_log:
                    next_log += 10
                    log(f"{health['devices']} of {expected} devices at the root")
                if time.monotonic() - began > 600:
                    raise RuntimeError(f"only {health['devices']} of {expected} devices")
                await asyncio.sleep(0.5)
            out["fill_s"] = round(time.monotonic() - began, 2)
            log(f"filled in {out['fill_s']} s")
            await settle(fakes)
            servers = len((await get(session, root + "/v1/servers"))["servers"])
            out["root"] = {"devices": health["devices"], "servers": servers,
                           "memory_mb": await memory_mb(session, root)}
            mid = stack.url("mid-0")
            out["mid"] = {"devices": (await get(session, mid + "/healthz"))["devices"],
                          "memory_mb": await memory_mb(session, mid)}
            out["lower"] = {"servers_known": len((await get(
                session, stack.url("real-0") + "/v1/servers"))["servers"])}
            out["largest_message_bytes"] = max(f.largest for f in fakes)
            out["bytes_sent_down_per_lower_at_join"] = round(
                sum(f.bytes for f in fakes) / len(fakes))

            # one device goes busy: its ancestors hear of it; no other lower server does
            before = [f.counts() for f in fakes]
            await fakes[5].set_state(3, "busy")
            address = f"{fakes[5].name}/cam-3"
            started = time.monotonic()
            while True:
                devices = (await get(session, root + f"/v1/devices?server={fakes[5].name}")
                           )["devices"]
                if any(d["address"] == address and d["state"] == "busy" for d in devices):
                    break
                await asyncio.sleep(0.02)
            log("device change seen")
            out["device_change"] = {
                "seen_at_root_ms": round((time.monotonic() - started) * 1000, 1),
                "messages_to_other_lowers": sum(
                    f.messages - b[0] for f, b in zip(fakes, before, strict=True))}

            # one server joins: every other server hears of it, once
            await settle(fakes, 0.5)
            before = [f.counts() for f in fakes]
            late = FakeLower("lower-late", args.devices)
            await late.connect(session, stack.url(f"mid-{args.mids - 1}"))
            await settle(fakes)
            got = [f.entries - b[1] for f, b in zip(fakes, before, strict=True)]
            out["server_join"] = {"lowers_told": sum(1 for g in got if g),
                                  "entries_per_lower": sorted(set(got)),
                                  "its_snapshot_messages": late.messages - 1,
                                  "its_snapshot_bytes": late.bytes}
            fakes.append(late)

            # a real call across the big tree (signalling only: it is the routing we time)
            a, b = stack.url("real-0"), stack.url("real-1")
            async with session.post(a + "/v1/calls", json={
                    "caller": "real-0/cam-1", "callee": "real-1/cam-2",
                    "media_mode": "none"}) as r:
                call = (await r.json())["call"]
            info = await get(session, f"{a}/v1/calls/{call}?wait=active&timeout=10")
            timeline = info["timeline"]
            out["call"] = {"state": info["state"], "path": info["path"],
                           "setup_ms": round((timeline["t_callee_woken"] -
                                              timeline["t_received"]) * 1000, 1)}
            async with session.delete(f"{a}/v1/calls/{call}"):
                pass
            del b
        finally:
            await asyncio.gather(*(f.close() for f in fakes), return_exceptions=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lowers", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--mids", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = asyncio.run(run(args))
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"tree: root, {args.mids} mid servers, {args.lowers} lower servers x {args.devices} "
          "devices (simulated), 2 real lower servers")
    print(f"  filled the root's directory in {out['fill_s']} s")
    print(f"  root holds {out['root']['devices']} devices, {out['root']['servers']} servers, "
          f"{out['root']['memory_mb']} MB; a mid server {out['mid']['devices']} devices, "
          f"{out['mid']['memory_mb']} MB; a lower server knows "
          f"{out['lower']['servers_known']} servers")
    print(f"  largest message sent to a lower server: {out['largest_message_bytes']} bytes; "
          f"{out['bytes_sent_down_per_lower_at_join']} bytes sent down to each at join")
    change = out["device_change"]
    print(f"  a device going busy: at the root after {change['seen_at_root_ms']} ms; messages "
          f"to the other lower servers: {change['messages_to_other_lowers']}")
    join = out["server_join"]
    print(f"  a server joining: {join['lowers_told']} lower servers told, entries each "
          f"{join['entries_per_lower']}; it was sent the rest of the tree in "
          f"{join['its_snapshot_messages']} messages ({join['its_snapshot_bytes']} bytes)")
    print(f"  a call: {out['call']['state']} along {' -> '.join(out['call']['path'])}, both "
          f"woken {out['call']['setup_ms']} ms after the command")
    return 0


if __name__ == "__main__":
    sys.exit(main())
