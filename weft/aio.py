"""Small asyncio helpers shared across modules: owned background tasks, bounded waits, and the
loop weft's programs run on (uvloop when available: about twice the request rate of the default
asyncio loop for aiohttp and nats-py in make bench; WEFT_UVLOOP=0 keeps plain asyncio)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


CANCEL_RETRY_S = 0.5  # how often `cancel_and_wait` repeats a cancellation the task did not act on


async def cancel_and_wait(task: asyncio.Task[Any] | None, *, retry_s: float = CANCEL_RETRY_S) -> None:
    """Cancel a background task and wait until it has finished, whatever it raised.

    The cancellation is repeated while the task runs on: on Python 3.11 an `asyncio.wait_for`
    inside it (nats-py's requests use one) can swallow a cancellation that arrives just as its
    inner await completes (gh-86296), and a task that then goes on to wait for the next message
    would keep a shutdown waiting forever (seen in CI: a lease watcher, `cancelling` for 110 s)."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=retry_s)
    if not task.cancelled():
        task.exception()  # retrieve it, so asyncio does not log "never retrieved"


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for `event` at most `timeout` seconds; True if it was set. Uses asyncio.timeout, not
    wait_for: on Python 3.11 wait_for can swallow a cancellation that arrives just as the event is
    set (gh-86296), and a loop built on it then never stops."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
        return True
    except TimeoutError:
        return False


class TaskSet:
    """Background tasks an object owns. asyncio keeps only a weak reference to a task, so each is
    held here until it finishes; `wait` and `cancel` end them together on shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait(self) -> None:
        """Until every task spawned so far has finished, whatever it raised."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel(self) -> None:
        await asyncio.gather(*(cancel_and_wait(task) for task in list(self._tasks)))


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
