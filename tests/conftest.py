"""Shared fixtures: one real nats-server (the bundled binary) per test session on 127.0.0.1.

Tests isolate themselves by project id (one stream per project), so they share the server safely.
Every event any test appends through `EventStore.append` is checked against its catalogue shape
(`projections.events.payload_errors`); see `catalogue_checked_appends`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from projections.events import Event, payload_errors
from tests.servers import DockerNats, Reporter, session_nats_server
from weft.store import connection
from weft.store.embedded import EmbeddedNats
from weft.store.eventstore import EventStore

# --- every appended event matches its catalogue shape --------------------------------------------

# Events appended that do not match the catalogue, not yet reported: one line each.
_MISFITS: list[str] = []
# > 0 while a test appends malformed events on purpose (marker `malformed_events` or the
# `allow_malformed_events` context manager). A plain counter, not a context variable: the appends of
# a test also come from the session replica's long-lived tasks, which no context reaches.
_ALLOWED = 0


@pytest.fixture(scope="session", autouse=True)
def catalogue_checked_appends() -> Iterator[None]:
    """Wrap `EventStore.append` (the one path to the stream: group commits go through it) so that
    each event is checked before it is appended. A misfit is still appended (the code under test
    sees no difference) and fails the test that was running, at its teardown, naming the type, the
    errors and who wrote it."""
    original = EventStore.append

    async def append(self: EventStore, ev: Event, expected_seq: int | None) -> Any:
        errors = payload_errors(ev.type, ev.data)
        if errors and not _ALLOWED:
            _MISFITS.append(f"{ev.type} (entity {ev.entity_id}, actor {ev.actor}): {'; '.join(errors)}")
        return await original(self, ev, expected_seq)

    patch = pytest.MonkeyPatch()
    patch.setattr(EventStore, "append", append)
    yield
    patch.undo()
    if _MISFITS:
        pytest.fail("events appended after the last test that do not match the catalogue:\n" + "\n".join(_MISFITS))


@pytest.fixture(autouse=True)
def appended_events_match_the_catalogue(request: pytest.FixtureRequest) -> Iterator[None]:
    global _ALLOWED
    marked = request.node.get_closest_marker("malformed_events") is not None
    _ALLOWED += marked
    try:
        yield
    finally:
        _ALLOWED -= marked
    if _MISFITS:
        found = list(_MISFITS)
        _MISFITS.clear()
        pytest.fail("events appended that do not match their catalogue shape (projections.events); "
                    "mark a test that appends them on purpose with @pytest.mark.malformed_events:\n"
                    + "\n".join(found), pytrace=False)


@pytest.fixture
def allow_malformed_events() -> Callable[[], contextlib.AbstractContextManager[None]]:
    """`with allow_malformed_events(): ...` appends malformed events on purpose, unchecked."""

    @contextlib.contextmanager
    def allowed() -> Iterator[None]:
        global _ALLOWED
        _ALLOWED += 1
        try:
            yield
        finally:
            _ALLOWED -= 1

    return allowed


@pytest.fixture(scope="session", autouse=True)
async def no_stuck_tasks() -> AsyncIterator[None]:
    """Last teardown of the session loop: cancel what tests left running, bounded, and name any task
    that will not stop (the loop's own close would otherwise wait for it forever, silently)."""
    yield
    me = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for t in left:
        t.cancel()
    if left:
        _, stuck = await asyncio.wait(left, timeout=10)
        for t in stuck:
            print(f"\nTASK THAT IGNORES CANCELLATION: {t.get_name()} {t.get_coro()!r}", file=sys.stderr)
        assert not stuck, "tasks ignore cancellation; see stderr"


@pytest.fixture(scope="session")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats | DockerNats]:
    """The bundled nats-server; a container with WEFT_TEST_DOCKER=1 and Docker (tests.servers).
    Tests use its `url` only, which both have."""
    async with session_nats_server(tmp_path_factory, "test") as server:
        yield server


@pytest.fixture
async def nc(nats_server: EmbeddedNats | DockerNats) -> AsyncIterator[NATS]:
    # weft's own client class, as the service uses it: store and replica tests run through it.
    client = await connection.connect(nats_server.url, max_reconnect_attempts=3)
    yield client
    await client.close()


@pytest.fixture
async def store(nc: NATS) -> EventStore:
    return EventStore(nc.jetstream())


@pytest.fixture(autouse=True)
async def no_leftover_processes() -> AsyncIterator[None]:
    """Kill any weft/agent process a test started and did not stop (a failed assertion, say)."""
    yield
    from tests.processes import LIVE

    for proc in list(LIVE):
        if proc.proc is not None and proc.proc.returncode is None:
            proc.proc.kill()
            await proc.proc.wait()
        LIVE.discard(proc)


@pytest.fixture
async def reporter() -> AsyncIterator[Reporter]:
    """A TCP endpoint stand-in agents report to (tests.servers.AGENT)."""
    r = Reporter()
    await r.start()
    yield r
    await r.close()


@pytest.fixture
def project() -> str:
    """A fresh project id, hence a fresh stream, for each test."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path


# --- a weft replica in-process, served over real HTTP on 127.0.0.1 ---------------------------------

from dataclasses import replace  # noqa: E402

from tests.support import Api, make_client  # noqa: E402
from weft.service import WeftService  # noqa: E402
from weft.settings import Settings  # noqa: E402


@pytest.fixture(scope="session")
async def weft_service(nats_server: EmbeddedNats | DockerNats) -> AsyncIterator[WeftService]:
    """One replica for the session; tests isolate by project id."""
    settings = replace(
        Settings.from_env({}),
        replica_name="test",
        snapshot_every=0,
        min_seq_wait_ms=2000,
        heartbeat_ms=1000,
        accept_timeout_ms=3000,
        retry_base_ms=20,
        lease_ttl_s=2.0,
    )
    service = WeftService(settings)
    await service.start(nats_server.url, serve_http=False)
    yield service
    await service.stop()


@pytest.fixture
async def api(weft_service: WeftService, project: str) -> AsyncIterator[Api]:
    client = await make_client(weft_service)
    yield Api(client, project, weft_service)
    await client.close()


# --- a hung test says where it hangs ---------------------------------------------------------------

# Seconds before pytest-timeout's limit at which a still-running test's asyncio tasks are printed:
# pytest-timeout dumps threads only, and a hung await shows there as the loop idling in select().
TASK_DUMP_LEAD_S = 10.0


def _dump_asyncio_tasks(nodeid: str) -> None:
    """Print every pending task's coroutine stack to stderr. Runs on a timer thread while the test's
    loop is stuck awaiting: the suspended frames it reads do not move meanwhile."""
    for _ in range(3):  # the task set may change size while it is copied
        try:
            # every loop's tasks (all_tasks() wants the loop's own thread)
            tasks = [t for t in list(vars(asyncio.tasks)["_all_tasks"]) if not t.done()]
            break
        except RuntimeError:
            continue
    else:
        return
    out = sys.__stderr__ or sys.stderr
    print(f"\n+++ {nodeid}: {len(tasks)} pending asyncio tasks, {TASK_DUMP_LEAD_S:.0f} s before the timeout +++",
          file=out)
    for task in tasks:
        try:
            task.print_stack(limit=12, file=out)
        except Exception as err:  # a frame that moved under us: the rest are still worth printing
            print(f"{task!r}: {err}", file=out)
    out.flush()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else float(item.config.getini("timeout") or 0)
    timer = None
    if limit > TASK_DUMP_LEAD_S:
        timer = threading.Timer(limit - TASK_DUMP_LEAD_S, _dump_asyncio_tasks, args=(item.nodeid,))
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
