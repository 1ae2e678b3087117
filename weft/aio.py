"""Small asyncio helpers shared across modules."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has finished, whatever it raised."""
    if task is None or task.done():
        if task is not None and not task.cancelled():
            task.exception()  # retrieve it, so asyncio does not log "never retrieved"
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


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
