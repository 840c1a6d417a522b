"""Everything that reaches into aiortc and aioice internals lives here, and only here.

Checked against aiortc 1.16 / aioice 0.13 (pinned in pyproject.toml); tests/test_rtc.py fails
loudly if an internal this module relies on moves.

Why internals at all:
- aioice leaves 127.0.0.1 out of its host candidates, so a call "on loopback" would really pair on
  eth0. Servers and devices take a list of media addresses (like mediasoup's listenIps) and gather
  host candidates on exactly those.
- aiortc asks a public STUN server unless told otherwise: every peer connection gets an explicit
  configuration without one (or with the servers the operator configured).
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from dataclasses import dataclass

from aioice import Connection
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.rtcconfiguration import RTCBundlePolicy


@dataclass(frozen=True)
class MediaSettings:
    """Where media may flow, for one service."""

    #: IPv4/IPv6 addresses to gather host candidates on; empty means every non-loopback address
    #: (aioice's own choice).
    addresses: tuple[str, ...] = ()
    #: STUN/TURN URLs ("stun:host:port", "turn:host:port"); empty for none.
    ice_servers: tuple[str, ...] = ()


def new_peer_connection(media: MediaSettings) -> RTCPeerConnection:
    """A peer connection that bundles everything on one transport and asks no public server."""
    config = RTCConfiguration(
        iceServers=[RTCIceServer(urls=url) for url in media.ice_servers],
        bundlePolicy=RTCBundlePolicy.MAX_BUNDLE,
    )
    return RTCPeerConnection(configuration=config)


def restrict_host_candidates(pc: RTCPeerConnection, addresses: Sequence[str]) -> None:
    """Gather host candidates of ``pc`` on ``addresses`` only.

    Call after the transceivers exist (offerer: after addTransceiver; answerer: after
    setRemoteDescription) and before setLocalDescription, which gathers.
    """
    if not addresses:
        return
    for connection in _ice_connections(pc):
        connection.gather_candidates = types.MethodType(_gather_on(tuple(addresses)), connection)


def _ice_connections(pc: RTCPeerConnection) -> list[Connection]:
    found: list[Connection] = []
    for transceiver in pc.getTransceivers():
        connection = transceiver.receiver.transport.transport.iceGatherer._connection
        if connection not in found:
            found.append(connection)
    return found


def _gather_on(addresses: tuple[str, ...]):
    async def gather_candidates(self: Connection) -> None:
        # Mirrors aioice.Connection.gather_candidates with the address list given, not discovered.
        if self._local_candidates_start:
            return
        self._local_candidates_start = True
        for component in sorted(self._components):
            self._local_candidates += await self.get_component_candidates(
                component=component, addresses=list(addresses))
        self._local_candidates_end = True

    return gather_candidates


def check_internals() -> list[str]:
    """Names of the aiortc/aioice internals this project relies on that are missing."""
    missing: list[str] = []
    for owner, name in (
        (Connection, "get_component_candidates"),
        (Connection, "gather_candidates"),
    ):
        if not hasattr(owner, name):
            missing.append(f"{owner.__module__}.{owner.__qualname__}.{name}")
    probe = Connection(ice_controlling=True)
    for name in ("_local_candidates_start", "_local_candidates_end", "_local_candidates",
                 "_components"):
        if not hasattr(probe, name):
            missing.append(f"aioice.Connection().{name}")
    return missing
