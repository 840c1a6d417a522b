"""``python -m relay lower|upper|stack|token|reasons``: run one server, or a whole local stack of
any shape; print a credential; print the reasons table."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from lab.stack import LocalStack, StackError, StackSettings
from lab.topology import DEFAULT, TopologyError, load
from relay.admission import Limits
from relay.call import Timeouts
from relay.server import ListenError, serve
from relay.settings import ServerSettings, env_defaults
from rtc.adapter import MediaSettings
from wire.auth import Auth
from wire.config import SettingsError, split_list
from wire.logs import setup_logging
from wire.loops import event_loop_factory
from wire.reasons import markdown


def build_parser() -> argparse.ArgumentParser:
    env = env_defaults()
    p = argparse.ArgumentParser(prog="python -m relay", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for role in ("lower", "upper"):
        s = sub.add_parser(role, help=f"run a {role} server (settings also from RELAY_* env)")
        s.add_argument("--name", default=env.get("name", f"{role}"), help="server name")
        s.add_argument("--host", default=env.get("host", "127.0.0.1"))
        s.add_argument("--port", type=int, default=int(env.get("port", "0")),
                       help="0: any free port (the ready line says which)")
        s.add_argument("--public-url", default=env.get("public_url"),
                       help="URL others reach this server at, if not http://HOST:PORT")
        s.add_argument("--media-address", action="append", default=None,
                       help="address to gather ICE host candidates on (repeatable); default: "
                            "every non-loopback address (env RELAY_MEDIA_ADDRESSES)")
        s.add_argument("--ice-server", action="append", default=None, help="stun:/turn: URL")
        s.add_argument("--media-mode", choices=["forward", "transcode"],
                       default=env.get("media_mode", "forward"),
                       help="forward encoded media (default), or decode and re-encode every "
                            "stream (a baseline for comparison)")
        s.add_argument("--congestion-control", choices=["on", "off"],
                       default=env.get("congestion_control", "on"),
                       help="on (default): estimate each leg's bitrate and report the least "
                            "of the path's upstream (REMB) so the sender follows the narrowest "
                            "link; off: the baseline, no reports (docs/relay.md)")
        s.add_argument("--no-hop-figures", action="store_true",
                       help="do not measure each call's hop (transit, arrivals, legs): only to "
                            "price the measuring (benchmarks/forwarding.py)")
        s.add_argument("--setup-timeout", type=float, default=float(env.get("setup_timeout",
                                                                            "20")),
                       help="seconds from the call command to media both ways (the time a "
                            "callee rings is not counted) before setup_timeout")
        s.add_argument("--ring-timeout", type=float,
                       default=float(env.get("ring_timeout", "30")),
                       help="seconds a ringing callee may ring before the call ends no_answer")
        s.add_argument("--keep-ended", type=float,
                       default=float(env.get("keep_ended", "120")), metavar="S",
                       help="seconds an ended call is kept for GET /v1/calls/ID and the "
                            "devices' last reports (memory grows this long under steady load, "
                            "then stays flat; /metrics says it, so a soak's warm-up follows)")
        s.add_argument("--log-level", default=env.get("log_level", "info"))
        s.add_argument("--max-devices", type=int, default=int(env.get("max_devices", "1000")),
                       help="devices a lower server accepts; more are refused (server_full)")
        s.add_argument("--max-calls", type=int, default=int(env.get("max_calls", "500")),
                       help="calls in progress; more are answered 503 server_busy with "
                            "Retry-After")
        s.add_argument("--max-message-rate", type=float,
                       default=float(env.get("max_message_rate", "50")),
                       help="WebSocket messages a second per device link; the excess is "
                            "dropped with a rate_limited error")
        s.add_argument("--max-trunk-rate", type=float,
                       default=float(env.get("max_trunk_rate", "2000")),
                       help="messages a second a child server's trunk may send (upper); the "
                            "excess is dropped with a rate_limited error")
        s.add_argument("--loop", choices=["auto", "asyncio", "uvloop"],
                       default=env.get("loop", "auto"),
                       help="event loop: uvloop (faster per packet) when installed, by default")
        s.add_argument("--parent", default=env.get("parent"),
                       help="the parent (upper) server's URL (ws:// or http://); an upper "
                            "server without one is the root of its tree")
    t = sub.add_parser("token", help="print the credential for an identity (device:ID, "
                                     "server:NAME, probe), signed with VPHONE_AUTH_SECRET")
    t.add_argument("identity")
    sub.add_parser("reasons", help="print every end reason and refusal code (markdown)")
    s = sub.add_parser("stack", help="run a tree of servers and devices until stopped "
                                     "(default: upper, lower-a, lower-b)")
    s.add_argument("--topology", type=Path, default=None, metavar="FILE",
                   help='JSON: {"name": "root", "children": [{"name": "lower-a", '
                        '"devices": 2}, ...]}; a node with children is an upper server')
    s.add_argument("--devices", type=int, default=1,
                   help="devices under each lower server (a leaf's own \"devices\" wins)")
    s.add_argument("--video", default="synthetic",
                   choices=["synthetic", "preencoded", "packets"])
    s.add_argument("--size", default="640x480")
    s.add_argument("--fps", type=float, default=30.0)
    s.add_argument("--media-address", action="append", default=None,
                   help="default 127.0.0.1: media stays on loopback")
    s.add_argument("--log-dir", type=Path, default=None)
    s.add_argument("--log-level", default="info")
    s.add_argument("--restart", type=float, nargs="?", const=1.0, default=None, metavar="S",
                   help="start a server that dies again after S seconds (default 1), on its "
                        "port, from its command line: it rejoins the tree (every death is "
                        "logged, stack.died, with or without this)")
    s.add_argument("--isolate", action="append", default=[], metavar="LOWER",
                   help="run this lower server and its devices in a network namespace of its "
                        "own (root): the link to its parent crosses a veth, where a fault plan "
                        "can cut or slow it (repeatable)")
    s.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for every server (repeatable; e.g. "
                        "--server-arg=--keep-ended --server-arg=30)")
    return p


def settings_from(args: argparse.Namespace) -> ServerSettings:
    env = env_defaults()
    addresses = args.media_address or split_list(env.get("media_addresses"))
    return ServerSettings(
        role=args.command, name=args.name, host=args.host, port=args.port,
        parent=getattr(args, "parent", None) or None, public_url=args.public_url,
        media=MediaSettings(addresses=tuple(addresses), ice_servers=tuple(args.ice_server or ())),
        timeouts=Timeouts(setup=args.setup_timeout, ring=args.ring_timeout),
        media_mode=args.media_mode, keep_ended_s=args.keep_ended,
        hop_figures=not args.no_hop_figures,
        congestion_control=args.congestion_control == "on",
        limits=Limits(max_devices=args.max_devices, max_calls=args.max_calls,
                      max_message_rate=args.max_message_rate,
                      max_trunk_rate=args.max_trunk_rate), auth=Auth.from_env())


async def run_stack(args: argparse.Namespace) -> int:
    try:
        topology = load(args.topology) if args.topology else DEFAULT
        settings = StackSettings(devices=args.devices, size=args.size, fps=args.fps,
                                 media_addresses=tuple(args.media_address or ("127.0.0.1",)),
                                 log_dir=args.log_dir, topology=topology, video=args.video,
                                 restart_after_s=args.restart, isolate=tuple(args.isolate),
                                 server_args=tuple(args.server_arg))
    except (TopologyError, ValueError) as exc:
        print(f"relay stack: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with LocalStack(settings) as stack:
            print(json.dumps(stack.info()), flush=True)
            await stop.wait()
    except StackError as exc:
        print(f"relay stack: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "token":
        auth = Auth.from_env()
        if not auth.on:
            print("relay: token: set VPHONE_AUTH_SECRET (or VPHONE_AUTH_SECRET_FILE)",
                  file=sys.stderr)
            return 2
        print(auth.token(args.identity))
        return 0
    if args.command == "reasons":
        print(markdown())
        return 0
    if args.command == "stack":
        setup_logging("stack", args.log_level)
        return asyncio.run(run_stack(args))
    try:
        settings = settings_from(args)
    except SettingsError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.name, args.log_level)
    try:
        loop_factory = event_loop_factory(args.loop)
    except ImportError:
        print("relay: --loop uvloop: uvloop is not installed", file=sys.stderr)
        return 2
    try:
        with contextlib.suppress(KeyboardInterrupt), \
                asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(settings))
    except ListenError as exc:
        print(f"relay {settings.role} {settings.name}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
