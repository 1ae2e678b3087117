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
