"""Failover when the scheduling leader dies without releasing its lease: two real `weft serve`
processes on a real nats-server; the leader is killed with SIGKILL.

The lease TTL here is 120 s, longer than the test's bound on the takeover: the survivor can only
take over because its liveness probes (weft.store.lease, PROBE_S/PROBE_STRIKES) find the dead
holder's NATS connection gone and release its entry, not because the entry expired.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator

import aiohttp
import nats
import pytest

from tests.integration.test_restart import log_record, scheduling
from tests.processes import WeftProcess
from tests.servers import own_nats_server
from weft.store.embedded import EmbeddedNats
from weft.store.eventstore import EventStore

pytestmark = pytest.mark.slow

TTL_S = "120"
WORK = {"capability": "python", "boundary": "personal", "description": "failover"}


@pytest.fixture(scope="module")
async def own_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    async with own_nats_server(tmp_path_factory, "failover") as server:
        yield server


async def holders(store: EventStore, project: str) -> list[str]:
    """The replicas that announced a term, in order (a holder is the replica name + a suffix)."""
    return [e.data["holder"].rsplit("-", 1)[0] async for e in store.read_range(project) if e.type == "leader.elected"]


async def test_a_killed_leaders_lease_is_taken_over_long_before_its_ttl(own_nats: EmbeddedNats, project: str) -> None:
    env = {"LOG_LEVEL": "info", "LOG_FORMAT": "json", "WEFT_LEASE_TTL_S": TTL_S, "WEFT_DRAIN_S": "0"}
    first = WeftProcess(own_nats.url, project, env={**env, "WEFT_REPLICA_NAME": "fo-first"})
    second = WeftProcess(own_nats.url, project, env={**env, "WEFT_REPLICA_NAME": "fo-second"})
    nc = await nats.connect(own_nats.url)
    store = EventStore(nc.jetstream())
    try:
        await first.start()
        async with aiohttp.ClientSession() as http:
            assert (await first.post(http, "/api/work", WORK))[0] == 201  # creates the project
            await scheduling(first, project)
            await second.start()
            # The second replica follows: it sees the project and the first one's lease.
            await second.get(http, "/api/stats/projection", min_seq=await store.last_seq(project))
            assert await holders(store, project) == ["fo-first"]

            assert await first.kill() == -signal.SIGKILL
            await scheduling(second, project)  # bounded by line()'s 30 s, a quarter of the TTL
            assert await holders(store, project) == ["fo-first", "fo-second"]
            gone = [r for r in map(log_record, second.output) if "is gone from NATS" in str(r.get("msg"))]
            assert gone and gone[0].get("project") == project, second.output[-10:]

            # And it schedules: a new item is decided by the survivor's term.
            status, item = await second.post(http, "/api/work", WORK)
            assert status == 201, item
    finally:
        await second.stop()
        await first.kill()
        await nc.close()


def test_the_liveness_subject_is_one_valid_token_for_any_holder_name() -> None:
    from weft.store.lease import ALIVE_PREFIX, alive_subject

    for holder in ("vm-1-abc", "with.dots and spaces", "ünïcode*>"):
        token = alive_subject(holder).removeprefix(ALIVE_PREFIX)
        assert token.isalnum() and len(token) == 16
    assert alive_subject("a") != alive_subject("b")
