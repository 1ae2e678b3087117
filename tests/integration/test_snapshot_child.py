"""The forked snapshot encoder as real processes: what a child does when its parent is killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import sys
import textwrap

import pytest

from weft.store.snapshot_child import FORK_AVAILABLE

pytestmark = pytest.mark.skipif(not FORK_AVAILABLE, reason="snapshots are forked on Linux only")

PARENT = textwrap.dedent("""
    import signal, sys
    from projections import ProjectState
    from weft.store.snapshot_child import ForkedEncoder

    def stuck(state):
        signal.pause()  # the child waits here until a signal ends it

    child = ForkedEncoder(ProjectState(project="p"), stuck)
    print(child.pid, flush=True)
    signal.pause()
""")


async def test_a_child_dies_with_its_parent_killed_by_sigkill() -> None:
    """kill -9 of a replica must not leave its snapshot child running (holding a copy of the
    replica's memory and its listening sockets) until the encoding ends."""
    parent = await asyncio.create_subprocess_exec(sys.executable, "-c", PARENT, stdout=asyncio.subprocess.PIPE)
    assert parent.stdout is not None
    child = int(await asyncio.wait_for(parent.stdout.readline(), 30))
    pidfd = os.pidfd_open(child)
    try:
        assert select.select([pidfd], [], [], 0)[0] == [], "the child runs while its parent does"
        parent.send_signal(signal.SIGKILL)
        # A pidfd becomes readable when its process ends (for a process that is not our child too).
        ended = await asyncio.to_thread(select.select, [pidfd], [], [], 30)
        assert ended[0] == [pidfd], "the child outlived its parent"
        await asyncio.wait_for(parent.wait(), 30)  # (its stdout closes with the child's copy of it)
    finally:
        os.close(pidfd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)  # only if the test failed
