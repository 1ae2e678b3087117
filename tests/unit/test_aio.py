"""weft.aio: stopping background tasks."""

from __future__ import annotations

import asyncio

from weft.aio import TaskSet, cancel_and_wait


async def swallows_one_cancellation(started: asyncio.Event, swallowed: asyncio.Event) -> None:
    """What a task does when an asyncio.wait_for inside it swallows a cancellation (Python 3.11,
    gh-86296): it goes on, to wait for something that never comes."""
    started.set()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        swallowed.set()
    await asyncio.Event().wait()


async def test_a_task_that_swallowed_a_cancellation_is_still_stopped() -> None:
    started, swallowed = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(swallows_one_cancellation(started, swallowed))
    await started.wait()
    await asyncio.wait_for(cancel_and_wait(task, retry_s=0.01), 5)  # bounded: before the fix this waited forever
    assert swallowed.is_set() and task.cancelled()


async def test_a_task_set_stops_tasks_that_swallowed_a_cancellation() -> None:
    tasks, started, swallowed = TaskSet(), asyncio.Event(), asyncio.Event()
    task = tasks.spawn(swallows_one_cancellation(started, swallowed))
    await started.wait()
    await asyncio.wait_for(tasks.cancel(), 5)  # bounded: before the fix this waited forever
    assert swallowed.is_set() and task.cancelled()


async def test_a_failed_task_is_waited_for_and_its_error_retrieved() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(fails())
    await asyncio.wait({task})
    await cancel_and_wait(task)
    assert isinstance(task.exception(), ValueError)
