"""WHIP and WHEP on lower servers (relay/gateway.py), with stacks nobody here wrote: FFmpeg's
WHIP muxer publishing in its own process, called by a device under another lower server; a
WHEP player (aiortc's peer connection, none of this project's code) watching a device under
another lower server across the tree; and the HTTP contract of RFC 9725 around them."""

from __future__ import annotations

import asyncio
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from probe.calls import run_call
from rtc.adapter import restrict_host_candidates
from wire.auth import Auth
from wire.client import discover
from wire.messages import CallInfo

from .conftest import Tree, make_tree

pytestmark = pytest.mark.e2e

PUBLISHER = Path(__file__).with_name("whip_publisher.py")


def p256_certificate(folder: Path) -> tuple[Path, Path]:
    """A DTLS certificate for FFmpeg on a curve aiortc's OpenSSL takes (see whip_publisher)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whip-publisher")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7)).sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def devices(tree: Tree, server: str) -> dict[str, dict[str, Any]]:
    async with tree.session.get(f"{tree.lowers[server].url}/v1/devices") as r:
        return {d["id"]: d for d in (await r.json())["devices"]}


async def call_info(tree: Tree, server: str, call: str, wait: str = "") -> CallInfo:
    query = f"?wait={wait}&timeout=15" if wait else ""
    async with tree.session.get(f"{tree.lowers[server].url}/v1/calls/{call}{query}") as r:
        return CallInfo.from_dict(await r.json())


async def test_ffmpeg_publishes_over_whip_and_a_device_calls_it(tmp_path: Path) -> None:
    cert, key = p256_certificate(tmp_path)
    async with make_tree() as tree:
        cam = await tree.add_device("lower-a", "cam-1")
        url = f"{tree.lowers['lower-b'].url}/v1/whip/obs"
        publisher = await asyncio.create_subprocess_exec(
            sys.executable, str(PUBLISHER), url, "12", "--cert", str(cert), "--key", str(key),
            "--audio", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            await tree.until(lambda: tree.known("lower-b/obs"), 15, "the publisher registered")
            listed = (await devices(tree, "lower-b"))["obs"]
            assert listed["kind"] == "whip" and listed["codecs"] == ["video/H264"], listed
            await asyncio.sleep(1.0)  # media flowing before the call: it joins a live stream
            sent = time.monotonic()
            async with tree.session.post(f"{tree.lowers['lower-a'].url}/v1/calls", json={
                    "caller": "lower-a/cam-1", "callee": "lower-b/obs"}) as r:
                assert r.status == 201, await r.text()
                call = (await r.json())["call"]
            info = await call_info(tree, "lower-a", call, "active")
            setup_s = time.monotonic() - sent
            assert info.state == "active", info
            assert info.directions == ["callee_to_caller"] and info.codec == "video/H264"
            await asyncio.sleep(3)
            info = await call_info(tree, "lower-a", call)
            got = info.media["callee_to_caller"]
            # FFmpeg's frames, decoded by the calling device: about 15 a second
            assert got.frames >= 30 and got.fps >= 10, got
            assert got.audio_frames > 0, got
            hops = {h.server: h for h in info.hops}
            video = hops["lower-b"].streams["callee_to_caller"]["video"]
            assert video.packets > 0
            # counted from when the call took the live stream, not from the publish
            source = tree.lowers["lower-b"].media.sources["obs"]["video"].meter
            assert video.packets <= source.packets - 5, (video.packets, source.packets)
            assert "caller_to_callee" not in info.media  # the publisher receives nothing
            print(f"\nFFmpeg WHIP -> lower-b -> upper -> lower-a -> cam-1: setup "
                  f"{setup_s * 1000:.0f} ms, {got.frames} frames at {got.fps} fps, "
                  f"{got.audio_frames} audio frames, unreadable {got.unreadable}")
            async with tree.session.delete(f"{tree.lowers['lower-a'].url}/v1/calls/{call}"):
                pass
            await tree.until(lambda: tree.lowers["lower-b"].directory.own["obs"].state
                             == "idle", 5, "obs idle")
            # the probe judges a one-way call on its one direction; no stamp is no loss
            servers = await discover(tree.session, tree.urls)
            result = await run_call(tree.session, servers, "lower-a/cam-1", "lower-b/obs",
                                    hold_s=2.0)
            assert result.ok, result.to_dict()
            assert result.directions == ("callee_to_caller",)
            media = result.media["callee_to_caller"]
            assert media["frames"] > 15 and media["frames_lost"] == 0
            assert media["unreadable"] == media["frames"]
            # FFmpeg's offer has no abs-send-time (nor REMB): nothing can steer its rate
            assert result.not_adapting == ["callee_to_caller"]
            assert "abs-send-time" in result.not_adapting_why["callee_to_caller"]
            print(f"probe: ok, setup {result.intervals['setup_ms']:.0f} ms, "
                  f"{media['frames']} frames, {media['gaps']} freezes, not adapting "
                  f"{result.not_adapting_why}")
            out, err = await asyncio.wait_for(publisher.communicate(), 30)
            assert publisher.returncode == 0, err.decode()[-2000:]
            assert json.loads(out.decode().strip().splitlines()[-1])["frames"] > 100
            # FFmpeg DELETEs its session on close: the device leaves, the call ends
            await tree.until(lambda: not tree.known("lower-b/obs"), 10, "the publisher gone")
            assert cam.id == "cam-1"
        finally:
            if publisher.returncode is None:
                publisher.kill()
                await publisher.wait()


class Player:
    """A WHEP player: aiortc's peer connection (none of this project's code) receiving audio
    and video, counting the video frames it decodes."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.frames = 0
        self.first = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.pc.on("track", self._track)

    def _track(self, track: Any) -> None:
        async def read() -> None:
            while True:
                await track.recv()
                if track.kind == "video":
                    self.frames += 1
                    self.first.set()
        self._tasks.append(asyncio.create_task(read()))

    async def watch(self, session: aiohttp.ClientSession, url: str) -> str:
        """POST the offer to ``url``, apply the answer; the session's Location."""
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.addTransceiver("video", direction="recvonly")
        restrict_host_candidates(self.pc, ("127.0.0.1",))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with session.post(url, data=self.pc.localDescription.sdp,
                                headers={"Content-Type": "application/sdp"}) as r:
            assert r.status == 201, await r.text()
            assert r.headers["Content-Type"].startswith("application/sdp")
            location = r.headers["Location"]
            answer = await r.text()
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        return location

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()


async def test_a_whep_player_watches_a_device_under_another_lower_server() -> None:
    async with make_tree() as tree:
        await tree.add_device("lower-b", "cam-2")
        player = Player()
        try:
            sent = time.monotonic()
            location = await player.watch(
                tree.session, f"{tree.lowers['lower-a'].url}/v1/whep/lower-b/cam-2")
            await asyncio.wait_for(player.first.wait(), 10)
            first_frame_s = time.monotonic() - sent
            await asyncio.sleep(2)
            assert player.frames >= 15, player.frames  # cam-2 sends 15 fps
            viewers = [d for d in (await devices(tree, "lower-a")).values()
                       if d["kind"] == "whep"]
            assert len(viewers) == 1 and viewers[0]["state"] == "busy"
            async with tree.session.get(f"{tree.lowers['lower-a'].url}/metrics") as r:
                assert 'relay_devices{kind="whep",role="lower",server="lower-a"} 1.0' in \
                    await r.text()
            async with tree.session.get(f"{tree.lowers['lower-a'].url}/v1/calls") as r:
                calls = (await r.json())["calls"]
            assert len(calls) == 1 and calls[0]["callee"] == "lower-b/cam-2"
            call = calls[0]["call"]
            info = await call_info(tree, "lower-a", call)
            assert info.state == "active" and info.directions == ["callee_to_caller"]
            assert info.path == ["lower-a", "upper", "lower-b"]
            print(f"\nWHEP player at lower-a watching lower-b/cam-2: first frame "
                  f"{first_frame_s * 1000:.0f} ms after the POST, {player.frames} frames")
            async with tree.session.patch(f"{tree.lowers['lower-a'].url}{location}",
                                          data="a=candidate:x", headers={
                                              "Content-Type": "application/trickle-ice-sdpfrag"}
                                          ) as r:
                assert r.status == 405
            async with tree.session.delete(f"{tree.lowers['lower-a'].url}{location}") as r:
                assert r.status == 200
            info = await call_info(tree, "lower-b", call, "ended")
            assert info.state == "ended" and info.reason == "hangup", info
            await tree.until(lambda: tree.lowers["lower-b"].directory.own["cam-2"].state
                             == "idle", 5, "cam-2 idle again")
            assert not [d for d in (await devices(tree, "lower-a")).values()
                        if d["kind"] == "whep"]
            async with tree.session.delete(f"{tree.lowers['lower-a'].url}{location}") as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_session"
        finally:
            await player.close()


async def test_whip_http_contract_and_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    auth = Auth(secret=b"whip-secret")
    monkeypatch.setenv("VPHONE_AUTH_SECRET", auth.secret.decode())  # the devices sign with it
    async with make_tree(auth=auth) as tree, aiohttp.ClientSession() as bare:
        url = f"{tree.lowers['lower-b'].url}/v1/whip/pub-1"
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            pc.addTransceiver("video", direction="sendonly")
            restrict_host_candidates(pc, ("127.0.0.1",))
            await pc.setLocalDescription(await pc.createOffer())
            offer = pc.localDescription.sdp
            sdp = {"Content-Type": "application/sdp"}
            async with bare.post(url, data=offer, headers={"Content-Type": "text/plain"}) as r:
                assert r.status == 415
            async with bare.post(url, data=offer, headers=sdp) as r:
                assert r.status == 401, await r.text()
            wrong = {**sdp, "Authorization": f"Bearer {auth.token('device:other')}"}
            async with bare.post(url, data=offer, headers=wrong) as r:
                assert r.status in (401, 403), await r.text()
            received = offer.replace("a=sendonly", "a=recvonly")
            mine = {**sdp, "Authorization": f"Bearer {auth.token('device:pub-1')}"}
            async with bare.post(url, data=received, headers=mine) as r:
                assert r.status == 400 and "publisher must send" in await r.text()
            async with bare.post(url, data=offer, headers=mine) as r:
                assert r.status == 201, await r.text()
                location = r.headers["Location"]
                answer = await r.text()
            assert "a=recvonly" in answer and "a=candidate:" in answer
            await tree.until(lambda: tree.known("lower-b/pub-1"), 10, "pub-1 known")
            async with bare.post(url, data=offer, headers=mine) as r:
                assert r.status == 400 and "already registered" in await r.text()
            # garbage that looks like SDP is refused with why, and leaves nothing behind
            for junk in ("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendonly\r\n"
                         "a=rtpmap:96 VP8/90000\r\n", "v=0\r\n" + "x" * 70_000):
                async with bare.post(f"{tree.lowers['lower-b'].url}/v1/whip/junk",
                                     data=junk, headers={**sdp, "Authorization":
                                     f"Bearer {auth.token('device:junk')}"}) as r:
                    assert r.status in (400, 413), await r.text()
                    assert (await r.json())["error"]["code"] in ("bad_sdp", "too_large")
            assert "junk" not in tree.lowers["lower-b"].directory.own
            session = f"{tree.lowers['lower-b'].url}{location}"
            async with bare.delete(session) as r:
                assert r.status in (401, 403)  # only its own credential ends it
            async with bare.delete(session, headers=mine) as r:
                assert r.status == 200
            await tree.until(lambda: not tree.known("lower-b/pub-1"), 10, "pub-1 gone")
            # WHEP takes the probe's token (it places a call): without it, 401
            whep = f"{tree.lowers['lower-a'].url}/v1/whep/lower-b/cam-2"
            async with bare.post(whep, data=offer, headers=sdp) as r:
                assert r.status == 401, await r.text()
            await tree.add_device("lower-b", "cam-2")
            player = Player()
            try:
                await player.watch(tree.session, whep)  # the probe's session: its token
                await asyncio.wait_for(player.first.wait(), 10)
            finally:
                await player.close()
        finally:
            await pc.close()


async def test_a_whep_player_watching_a_device_in_a_call_gets_its_stream_fanned_out() -> None:
    async with make_tree() as tree:
        await tree.add_device("lower-a", "cam-1")
        await tree.add_device("lower-b", "cam-2")
        async with tree.session.post(f"{tree.lowers['lower-a'].url}/v1/calls", json={
                "caller": "lower-a/cam-1", "callee": "lower-b/cam-2"}) as r:
            talk = (await r.json())["call"]
        assert (await call_info(tree, "lower-a", talk, "active")).state == "active"
        player = Player()
        try:
            await player.watch(tree.session,
                               f"{tree.lowers['lower-a'].url}/v1/whep/lower-b/cam-2")
            await asyncio.wait_for(player.first.wait(), 10)
            seen = (await call_info(tree, "lower-a", talk)).media.get("callee_to_caller")
            before = seen.frames if seen is not None else 0
            await asyncio.sleep(2)
            assert player.frames >= 15, player.frames
            talking = await call_info(tree, "lower-a", talk)
            assert talking.state == "active"  # the call watched goes on, both ways
            assert talking.media["callee_to_caller"].frames > before
            # the watch took cam-2's stream at lower-b, from the call it is in: no wake-up
            async with tree.session.get(f"{tree.lowers['lower-b'].url}/v1/calls") as r:
                at_b = {c["call"]: c for c in (await r.json())["calls"]}
            watch = next(c for c in at_b if c != talk)
            assert tree.devices["lower-b/cam-2"].id == "cam-2"
            async with tree.session.delete(f"{tree.lowers['lower-a'].url}/v1/calls/{talk}"):
                pass
            info = await call_info(tree, "lower-b", watch, "ended")
            assert info.reason == "source_ended", info
            await tree.until(lambda: not any(d.kind == "whep" for d in
                                             tree.lowers["lower-a"].directory.own.values()),
                             5, "the player's session ended with its call")
            await tree.until(lambda: tree.lowers["lower-b"].directory.own["cam-2"].state
                             == "idle", 5, "cam-2 idle")
        finally:
            await player.close()
