"""Servers in their own processes (the local stack): SIGTERM drains a server (its calls end with
a reason at every hop, it exits in time), and heartbeats find a frozen device or server within
5 s."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest

from lab.stack import LocalStack, StackSettings

pytestmark = pytest.mark.e2e

STACK = StackSettings(devices=1, video="packets", size="320x240", fps=15)


def child(stack: LocalStack, name: str):
    return next(c for c in stack.children if c.name == name)


async def test_sigterm_ends_calls_with_a_reason_and_exits_in_time():
    async with LocalStack(STACK) as stack, aiohttp.ClientSession() as session:
        lower_a, lower_b = child(stack, "lower-a"), child(stack, "lower-b")
        async with session.post(f"{lower_a.url}/v1/calls", json={
                "caller": "lower-a/cam-1", "callee": "lower-b/cam-2"}) as r:
            assert r.status == 201
            call = (await r.json())["call"]
        async with session.get(f"{lower_a.url}/v1/calls/{call}?wait=active&timeout=20") as r:
            assert (await r.json())["state"] == "active"
        began = time.monotonic()
        lower_a.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(lower_a.process.wait(), 10)
        took = time.monotonic() - began
        print(f"\nSIGTERM to exit: {took:.2f} s")
        assert code == 0 and took < 10, (code, took)
        async with session.get(f"{lower_b.url}/v1/calls/{call}") as r:
            info = await r.json()
        assert info["state"] == "ended" and info["reason"] == "server_shutting_down", info


async def _gone_within(session: aiohttp.ClientSession, url: str, predicate, timeout: float
                       ) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        async with session.get(url) as r:
            if predicate(await r.json()):
                return time.monotonic() - began
        await asyncio.sleep(0.1)
    raise AssertionError(f"not noticed within {timeout} s")


async def test_heartbeats_find_a_frozen_device_and_a_frozen_server_within_5_s():
    async with LocalStack(STACK) as stack, aiohttp.ClientSession() as session:
        devices, upper = child(stack, "devices"), child(stack, "upper")
        lower_b = child(stack, "lower-b")
        devices.process.send_signal(signal.SIGSTOP)  # alive, but silent: no FIN, no pong
        try:
            took = await _gone_within(
                session, f"{lower_b.url}/v1/devices",
                lambda body: not any(d["id"] == "cam-2" for d in body["devices"]), 8)
        finally:
            devices.process.send_signal(signal.SIGCONT)
        print(f"\nfrozen device noticed after {took:.2f} s")
        assert took < 5, took
        upper.process.send_signal(signal.SIGSTOP)
        try:
            took = await _gone_within(session, f"{lower_b.url}/v1/server",
                                      lambda body: not body["parent_connected"], 8)
        finally:
            upper.process.send_signal(signal.SIGCONT)
        print(f"frozen upper server noticed after {took:.2f} s")
        assert took < 5, took
