"""Owned tasks: every asyncio task of the project belongs to a :class:`Tasks` group, tied to
the lifetime of what started it (a server, a link, a call's media, a device, a load run).

Unlike ``asyncio.TaskGroup`` a failing task does not cancel its siblings (one bad call must not
end a server's others): its exception is logged once, with the task's name. Closing the group
cancels what is left and waits for it, once. ``tests/test_tasks.py`` checks that no module
outside this one calls ``create_task`` or ``ensure_future``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

log = logging.getLogger("wire.tasks")

T = TypeVar("T")


class Tasks:
    """A group of tasks with one owner; ``close()`` cancels and awaits them all."""

    def __init__(self, owner: str = "") -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = False

    def spawn(self, coro: Coroutine[Any, Any, T] | Generator[Any, None, T] | Any,
              name: str | None = None,
              on_done: Callable[[asyncio.Task[Any]], None] | None = None) -> asyncio.Task[T]:
        """Run ``coro`` (a coroutine or an awaitable) as a task of this group."""
        loop = asyncio.get_running_loop()
        if not asyncio.iscoroutine(coro):
            coro = _await(coro)
        task = loop.create_task(coro, name=name)
        if self.closed:  # the owner is gone: nothing new runs for it
            task.cancel()
        self._tasks.add(task)
        task.add_done_callback(self._done)
        if on_done is not None:
            task.add_done_callback(on_done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("task.failed", extra={"task": task.get_name(), "owner": self.owner,
                                            "error": repr(exc)}, exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Any:
        return iter(list(self._tasks))

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def wait(self, timeout: float | None = None) -> None:
        """Wait (at most ``timeout``) for the group's tasks to finish on their own."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def close(self) -> None:
        """Cancel every task of the group and wait for them; later spawns are cancelled."""
        self.closed = True
        current = asyncio.current_task()
        while pending := [t for t in self._tasks if t is not current]:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if all(t.done() for t in pending):
                self._tasks.difference_update(pending)


async def _await(awaitable: Any) -> Any:
    return await awaitable


class Serial:
    """Coroutines run one after another by one task of a group, in the order posted: what a
    leg sends on its own schedule (RTCP feedback: NACKs, PLIs, REMBs) goes out through this
    queue instead of a task per packet. At most ``limit`` wait; past it the oldest is dropped
    (feedback that old is stale) and counted."""

    def __init__(self, tasks: Tasks, name: str, limit: int = 256) -> None:
        self.tasks = tasks
        self.name = name
        self.limit = limit
        self.dropped = 0
        self._queue: deque[Coroutine[Any, Any, Any]] = deque()
        self._worker: asyncio.Task[None] | None = None

    def post(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self.tasks.closed:
            coro.close()
            return
        if len(self._queue) >= self.limit:
            self._queue.popleft().close()
            self.dropped += 1
        self._queue.append(coro)
        if self._worker is None or self._worker.done():
            self._worker = self.tasks.spawn(self._drain(), self.name)

    def __len__(self) -> int:
        return len(self._queue)

    async def _drain(self) -> None:
        try:
            while self._queue:
                coro = self._queue.popleft()
                try:
                    await coro
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # one failed send does not stop the others
                    log.warning("serial.failed", extra={"queue": self.name,
                                                        "error": repr(exc)})
        finally:
            while self._queue:  # cancelled: what waits is never awaited
                self._queue.popleft().close()
