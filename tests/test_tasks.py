"""Owned tasks (wire/tasks.py): every task belongs to a group that closes it, a failure is
logged with its owner and spares its siblings, RTCP goes out through a per-leg queue; and no
module outside wire/tasks.py starts a task any other way."""

from __future__ import annotations

import ast
import asyncio
import logging
from pathlib import Path

import pytest

from wire.tasks import Serial, Tasks

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("relay", "endpoint", "probe", "wire", "rtc", "lab", "webdevice")


def test_no_task_is_started_outside_a_task_group():
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "wire" / "tasks.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call):
                    name = node.func.attr if isinstance(node.func, ast.Attribute) else \
                        getattr(node.func, "id", None)
                    if name in ("create_task", "ensure_future"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not found, "start tasks with wire.tasks.Tasks.spawn:\n" + "\n".join(found)


async def test_a_failure_is_logged_once_and_spares_its_siblings(caplog):
    tasks = Tasks("owner-x")
    sibling_done = asyncio.Event()

    async def fails() -> None:
        raise RuntimeError("boom")

    async def sibling() -> None:
        await asyncio.sleep(0.02)
        sibling_done.set()

    with caplog.at_level(logging.ERROR, "wire.tasks"):
        tasks.spawn(fails(), "failing")
        tasks.spawn(sibling(), "sibling")
        await asyncio.wait_for(sibling_done.wait(), 1)
    failed = [r for r in caplog.records if r.getMessage() == "task.failed"]
    assert len(failed) == 1 and failed[0].owner == "owner-x" and failed[0].task == "failing"
    assert len(tasks) == 0


async def test_closing_cancels_what_is_left_and_what_comes_later():
    tasks = Tasks("t")
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    task = tasks.spawn(forever())
    await started.wait()
    await tasks.close()
    assert task.cancelled() and len(tasks) == 0
    late = tasks.spawn(forever())
    with pytest.raises(asyncio.CancelledError):
        await late


async def test_a_serial_queue_sends_in_order_with_one_task_and_drops_the_stale():
    tasks = Tasks("leg")
    sent: list[int] = []

    async def send(n: int) -> None:
        await asyncio.sleep(0)
        sent.append(n)

    queue = Serial(tasks, "rtcp", limit=3)
    for n in range(5):
        queue.post(send(n))
    assert len(tasks) == 1  # one worker, however many wait
    await tasks.wait(1)
    assert sent == [2, 3, 4] and queue.dropped == 2
    await tasks.close()
    queue.post(send(9))  # after its owner closed: never run (and never left unawaited)
    await asyncio.sleep(0.01)
    assert sent == [2, 3, 4]
