"""Liveness and spin-up faults: a dead agent must be declared lost on time and never be fed more
work, `maxAttempts` must hold, and a failed spin-up must not hold its slot.

Each test runs a replica of its own with short timings on a nats-server of its own: a replica
attaches every project on its server, and must neither compete for the projects of other tests
nor take them over (with this test's scripted mechanism). Agents are a real `weft agent` process
killed with SIGKILL or protocol-level doubles; mechanisms are scripted stand-ins. Conditions are
awaited on the projection (every folded event wakes the wait), never by sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from projections.events import Event, parse_ts
from projections.state import LIVE_ASSIGNMENT
from tests.processes import AgentProcess
from tests.servers import own_nats_server
from tests.support import Api, FakeAgent, check_work_invariants, own_replica, until
from weft.core.errors import Unavailable
from weft.spinup.base import Launched, ProbeResult, SpinUpError, SpinUpRequest
from weft.store.embedded import EmbeddedNats

pytestmark = pytest.mark.slow

WORK = {"capability": "python", "boundary": "personal", "description": "write the parser"}
WAIT = 60.0  # a bound for conditions that come long before; never a synchronisation sleep


@pytest.fixture
async def liveness_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    async with own_nats_server(tmp_path_factory, "liveness") as server:
        yield server




async def history(api: Api) -> list[Event]:
    assert api.service is not None and api.service.readmodel is not None
    return [e async for e in api.service.readmodel.store.read_range(api.project)]


async def leading(api: Api) -> None:
    assert api.service is not None and api.service.scheduler is not None
    await api.service.scheduler.elector.wait_elected(api.project, timeout=WAIT)


# --- fault 9: a dead agent is declared lost late and keeps getting work --------------------------


@pytest.mark.parametrize(
    "accept_timeout_ms", [800, 1200], ids=["accept-timeout-below-loss-threshold", "accept-timeout-equal-to-it"]
)
async def test_a_killed_agent_is_lost_after_three_silent_heartbeats_and_never_offered_work_again(
    liveness_nats: EmbeddedNats, project: str, accept_timeout_ms: int
) -> None:
    heartbeat_ms = 400  # loss threshold: 3 x 400 ms of silence
    async with own_replica(
        liveness_nats.url, project, heartbeat_ms=heartbeat_ms, accept_timeout_ms=accept_timeout_ms, lease_ttl_s=2.0
    ) as api:
        assert api.service is not None and api.service.nc is not None
        doomed = AgentProcess(liveness_nats.url, project, "doomed", "sleep 600", max_tasks=4)
        await doomed.start()
        await until(api, lambda s: s.agents.get("doomed", {}).get("status") == "online")
        await leading(api)
        await doomed.kill()
        # Submitted right after the kill: the agent still looks online with four free slots.
        ids = [(await api.ok("POST", "/api/work", {**WORK, "maxAttempts": 3}, status=201))["id"] for _ in range(4)]

        await until(api, lambda s: s.agents["doomed"]["status"] == "offline")
        await until(api, lambda s: not any(s.work[i]["status"] in LIVE_ASSIGNMENT for i in ids))
        events = await history(api)
        to_doomed = [e for e in events if e.type == "work.assigned" and e.data["agentGuid"] == "doomed"]
        assert to_doomed, "the dead agent was offered nothing, so this run proves nothing"
        withdrawn = [e for e in events if e.type in ("work.requeued", "work.dead_lettered") and e.entity_id in ids]
        first_withdrawal = min(e.seq for e in withdrawn)
        assert all(e.seq < first_withdrawal for e in to_doomed), (
            "the dead agent was offered work again after one of its assignments was withdrawn: "
            + ", ".join(f"{e.entity_id[:8]}@{e.data['attempt']}" for e in to_doomed)
        )
        assert len(to_doomed) <= 4  # one round, its capacity, and no more
        (lost,) = [e for e in events if e.type == "agent.lost" and e.entity_id == "doomed"]
        assert lost.data["lastHeartbeat"] is not None
        # Declared after (not before) three silent intervals (timestamps are to the millisecond).
        silent = (parse_ts(lost.ts) - parse_ts(lost.data["lastHeartbeat"])).total_seconds()
        assert silent >= 3 * heartbeat_ms / 1000 - 0.01
        assert all(e.data["attempt"] <= 3 for e in events if e.type == "work.assigned")

        rescuer = FakeAgent(api.service.nc, project, "rescuer", max_tasks=4, auto=True)
        await rescuer.start()
        try:
            await until(api, lambda s: all(s.work[i]["status"] == "completed" for i in ids))
        finally:
            await rescuer.close()
        events = await history(api)
        check_work_invariants(events, {"doomed": 4, "rescuer": 4})
        assert all(e.data["attempt"] <= 3 for e in events if e.type == "work.assigned")
        assert not [e for e in events if e.type == "work.assigned" and e.seq > lost.seq and e.data["agentGuid"] == "doomed"]


async def test_accept_timeouts_use_up_max_attempts_and_the_item_is_dead_lettered(
    liveness_nats: EmbeddedNats, project: str
) -> None:
    async with own_replica(liveness_nats.url, project, heartbeat_ms=300, accept_timeout_ms=300, lease_ttl_s=2.0) as api:
        assert api.service is not None and api.service.nc is not None
        sleepy = FakeAgent(api.service.nc, project, "sleepy")  # heartbeats every 0.1 s, never accepts
        await sleepy.start()
        try:
            item = await api.ok("POST", "/api/work", {**WORK, "maxAttempts": 2}, status=201)
            got = await until(api, lambda s: s.work[item["id"]]["status"] == "failed" and s.work[item["id"]])
            assert got["deadLetter"]["attempts"] == 2
            assert "not accepted" in got["deadLetter"]["reason"]
            events = await history(api)
            attempts = [e.data["attempt"] for e in events if e.type == "work.assigned"]
            # Offered again once its heartbeat showed it alive after the first timeout; then no more.
            assert attempts == [1, 2]
            assert (await api.ok("GET", "/api/agents/sleepy"))["status"] == "online"  # alive, just slow
        finally:
            await sleepy.close()


async def test_an_agent_that_let_an_assignment_time_out_gets_no_work_until_it_shows_life(
    liveness_nats: EmbeddedNats, project: str
) -> None:
    # Loss after 15 s of silence, accept timeout 0.3 s: the agent is silent but not yet lost.
    async with own_replica(liveness_nats.url, project, heartbeat_ms=5000, accept_timeout_ms=300, lease_ttl_s=2.0) as api:
        assert api.service is not None and api.service.nc is not None and api.service.scheduler is not None
        napper = FakeAgent(api.service.nc, project, "napper", heartbeat_s=3600)  # one heartbeat, then none
        await napper.start()
        try:
            await leading(api)
            item = await api.ok("POST", "/api/work", WORK, status=201)
            wid = item["id"]
            first = await napper.next_push("assignment")
            assert first["work"]["attempts"] == 1
            withdrawn = await until(api, lambda s: s.work[wid]["status"] == "pending" and s.work[wid])
            assert withdrawn["attempts"] == 1 and withdrawn["lastRequeueReason"].startswith("not accepted")

            # The leader's own pass skips it (it has not been heard from since), and says why.
            sched = api.service.scheduler.schedulers[project]
            await sched.tick(datetime.now(UTC))
            assert sched.last_plan is not None and sched.last_plan.assignments == []
            assert "let an assignment time out" in sched.last_plan.waiting[wid]
            assert (await api.ok("GET", "/api/agents/napper"))["status"] == "online"
            got = await api.ok("GET", f"/api/work/{wid}")
            assert got["status"] == "pending" and "let an assignment time out" in got["waitingReason"]

            # A sign of life of its own (it registers again) makes it eligible at once.
            assert (await napper.request("agent.register", napper.decl))["ok"]
            again = await napper.next_push("assignment")
            assert again["work"]["id"] == wid and again["work"]["attempts"] == 2
            assert (await napper.request("work.accept", {"workId": wid}))["ok"]
            assert (await napper.request("work.complete", {"workId": wid, "summary": "awake"}))["ok"]
            assert (await until(api, lambda s: s.work[wid]["status"] == "completed" and s.work[wid]))["attempts"] == 2
        finally:
            await napper.close()


# --- fault 3: a failed spin-up can hold its slot until failover ------------------------------------


class ScriptedMechanism:
    """Stands in for the `local` mechanism: each launch does the next scripted thing (raise the
    exception, or return a handle having started nothing); every call is reported on `launches`."""

    name = "local"

    def __init__(self, *script: BaseException | None) -> None:
        self.script = list(script)
        self.launches: asyncio.Queue[str] = asyncio.Queue()

    async def launch(self, req: SpinUpRequest) -> Launched:
        self.launches.put_nowait(req.spin_up_id)
        outcome = self.script.pop(0) if self.script else None
        if outcome is not None:
            raise outcome
        return Launched({"scripted": req.spin_up_id})

    async def stop(self, target: dict[str, Any], handle: dict[str, Any], graceful: bool) -> None:
        return None

    async def probe(self, target: dict[str, Any]) -> ProbeResult:
        return ProbeResult("healthy", 0.0, None)


def scripted_target(spin_up_timeout_ms: int) -> dict[str, Any]:
    return {
        "name": "scripted", "agentType": "claude-code", "mechanism": "local", "capabilities": ["python"],
        "config": {"command": "true"}, "maxConcurrentAgents": 1, "cooldownMs": 0,
        "spinUpTimeoutMs": spin_up_timeout_ms, "circuitBreakerThreshold": 5, "healthCheck": {"enabled": False},
    }


async def test_a_launch_that_raises_an_unexpected_error_fails_the_spin_up_and_frees_its_slot(
    liveness_nats: EmbeddedNats, project: str
) -> None:
    async with own_replica(liveness_nats.url, project, heartbeat_ms=1000, lease_ttl_s=2.0) as api:
        assert api.service is not None
        mechanism = ScriptedMechanism(RuntimeError("mechanism bug"))
        api.service.mechanisms["local"] = mechanism  # the fleet manager shares this dict
        await api.ok("POST", "/api/targets", scripted_target(spin_up_timeout_ms=60_000), status=201)
        await api.ok("POST", "/api/work", WORK, status=201)
        first = await asyncio.wait_for(mechanism.launches.get(), WAIT)
        # maxConcurrentAgents is 1: a second launch means the first one's slot was given back.
        second = await asyncio.wait_for(mechanism.launches.get(), WAIT)
        assert second != first
        target = next(iter((await until(api, lambda s: s.targets)).values()))
        assert first not in target["activeSpinUps"]
        events = await history(api)
        (failed,) = [e for e in events if e.type == "spinup.failed" and e.data["spinUpId"] == first]
        assert "RuntimeError" in failed.data["error"] and "mechanism bug" in failed.data["error"]


async def test_a_spin_up_whose_failure_cannot_be_recorded_is_failed_later_and_frees_its_slot(
    liveness_nats: EmbeddedNats, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with own_replica(liveness_nats.url, project, heartbeat_ms=1000, lease_ttl_s=2.0) as api:
        assert api.service is not None and api.service.commands is not None
        commands = api.service.commands
        mechanism = ScriptedMechanism(SpinUpError("no capacity"))
        api.service.mechanisms["local"] = mechanism
        record = commands.record_spin_up
        refused: list[str] = []

        async def store_down_once(*args: Any, **kw: Any) -> Any:
            if args[3] == "spinup.failed" and not refused:
                refused.append(args[2])
                raise Unavailable("event store unavailable")
            return await record(*args, **kw)

        monkeypatch.setattr(commands, "record_spin_up", store_down_once)
        await api.ok("POST", "/api/targets", scripted_target(spin_up_timeout_ms=500), status=201)
        await api.ok("POST", "/api/work", WORK, status=201)
        first = await asyncio.wait_for(mechanism.launches.get(), WAIT)
        second = await asyncio.wait_for(mechanism.launches.get(), WAIT)
        assert refused == [first] and second != first
        events = await history(api)
        (failed,) = [e for e in events if e.type == "spinup.failed" and e.data["spinUpId"] == first]
        assert "no agent registered" in failed.data["error"]  # the overdue check failed it
