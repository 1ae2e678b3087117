"""Shared fixtures: one real nats-server (the bundled binary) per test session on 127.0.0.1.

Tests isolate themselves by project id (one stream per project), so they share the server safely.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from tests.servers import Reporter, own_nats_server
from weft.store import connection
from weft.store.embedded import EmbeddedNats
from weft.store.eventstore import EventStore


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
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    async with own_nats_server(tmp_path_factory, "test") as server:
        yield server


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NATS]:
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
async def weft_service(nats_server: EmbeddedNats) -> AsyncIterator[WeftService]:
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
