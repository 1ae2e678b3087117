"""The agent work loop end to end: protocol over a real nats-server, scheduler, REST, event stream.

Agents here are protocol-level doubles (tests.support.FakeAgent) so each test controls exactly
what the agent does; the reference `weft agent` has its own process-level tests.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import orjson
from nats.aio.client import Client as NATS

from tests.support import Api, FakeAgent, check_work_invariants
from weft.store.eventstore import EventStore

WORK = {"capability": "python", "boundary": "personal", "description": "write the parser"}


async def wait_status(api: Api, work_id: str, status: str, timeout: float = 15.0) -> dict[str, Any]:
    """Await a status by waiting on the projection's own sequence, not by sleeping."""
    assert api.service is not None and api.service.readmodel is not None
    project_view = api.service.readmodel.views[api.project]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        item = project_view.state.work[work_id]
        if item["status"] == status:
            return await api.ok("GET", f"/api/work/{work_id}")
        remaining = deadline - loop.time()
        assert remaining > 0, f"{work_id} stuck in {item['status']}, wanted {status}"
        await project_view.wait_for(project_view.state.seq + 1, remaining)


async def test_submit_reaches_idle_agent_then_progress_and_completion_are_visible(api: Api, nc: NATS) -> None:
    agent = FakeAgent(nc, api.project, "agent-1", max_tasks=2)
    reg = await agent.start()
    assert reg["inbox"] == f"weft.{api.project}.agent.agent-1.inbox" and reg["assignments"] == []
    item = await api.ok("POST", "/api/work", WORK, status=201)
    push = await agent.next_push("assignment")
    assert push["work"]["id"] == item["id"] and push["work"]["description"] == "write the parser"
    assert (await agent.request("work.accept", {"workId": item["id"]}))["ok"]
    assert (await agent.request("work.progress", {"workId": item["id"], "progress": 40, "message": "half"}))["ok"]
    mid = await api.ok("GET", f"/api/work/{item['id']}")
    assert mid["status"] == "in-progress" and mid["progress"] == 40 and mid["progressMessage"] == "half"
    done = await agent.request("work.complete", {"workId": item["id"], "summary": "parsed", "output": {"lines": 3},
                                                 "artifacts": ["parser.py"]})
    assert done["ok"]
    got = await api.ok("GET", f"/api/work/{item['id']}?min_seq={done['seq']}")
    assert got["status"] == "completed"
    assert got["result"]["summary"] == "parsed" and got["result"]["output"] == {"lines": 3}
    assert got["assignedToAgent"] == {"guid": "agent-1", "handle": None, "agentType": "claude-code",
                                      "hostname": "test"}
    agent_view = await api.ok("GET", "/api/agents/agent-1")
    assert agent_view["currentTaskCount"] == 0 and agent_view["status"] == "online"
    await agent.close()


async def test_corporate_work_never_reaches_claude_code_agent(api: Api, nc: NATS) -> None:
    claude = FakeAgent(nc, api.project, "claude", agent_type="claude-code")
    await claude.start()
    item = await api.ok("POST", "/api/work", {**WORK, "boundary": "corporate"}, status=201)
    assert item["waitingReason"] == "boundary corporate allows only copilot-cli"
    got = await api.ok("GET", f"/api/work/{item['id']}")
    assert got["status"] == "pending" and got["waitingReason"] == "boundary corporate allows only copilot-cli"
    copilot = FakeAgent(nc, api.project, "copilot", agent_type="copilot-cli")
    await copilot.start()
    push = await copilot.next_push("assignment")
    assert push["work"]["id"] == item["id"]
    assert claude.pushes.empty()
    forbidden = await api.call("POST", "/api/work", {**WORK, "boundary": "corporate", "requiredAgentType": "claude-code"})
    assert forbidden.status == 400 and (await forbidden.json())["details"]["field"] == "requiredAgentType"
    await claude.close()
    await copilot.close()


async def test_waiting_reasons_name_the_missing_capability_and_busy_agents(api: Api, nc: NATS) -> None:
    item = await api.ok("POST", "/api/work", {**WORK, "capability": "rust"}, status=201)
    assert item["waitingReason"] == "no agent with capability rust"
    agent = FakeAgent(nc, api.project, "solo", max_tasks=1)
    await agent.start()
    first = await api.ok("POST", "/api/work", WORK, status=201)
    await agent.next_push("assignment")
    second = await api.ok("POST", "/api/work", WORK, status=201)
    got = await api.ok("GET", f"/api/work/{second['id']}")
    assert got["status"] == "pending" and got["waitingReason"] == "all eligible agents busy"
    assert first["id"] != second["id"]
    await agent.close()


async def test_200_items_over_5_agents_never_double_assigned_never_over_capacity(
    api: Api, nc: NATS, store: EventStore
) -> None:
    agents = [FakeAgent(nc, api.project, f"w{i}", max_tasks=2, auto=True) for i in range(5)]
    for a in agents:
        await a.start()
    ids = [r["id"] for r in await asyncio.gather(*(api.ok("POST", "/api/work", WORK, status=201) for _ in range(200)))]
    for work_id in ids:
        await wait_status(api, work_id, "completed", timeout=60)
    # Check the invariants from the event stream itself, not from logs or the projection.
    events = [e async for e in store.read_range(api.project)]
    completions = check_work_invariants(events, {a.guid: 2 for a in agents})
    assert set(completions) == set(ids)
    assert sum(len(a.completed) for a in agents) == 200
    for a in agents:
        await a.close()


async def test_recoverable_failure_is_retried_then_dead_lettered_and_dlq_retry_completes(api: Api, nc: NATS) -> None:
    agent = FakeAgent(nc, api.project, "flaky")
    await agent.start()
    item = await api.ok("POST", "/api/work", {**WORK, "maxAttempts": 2}, status=201)
    outcomes = []
    for _ in range(2):
        push = await agent.next_push("assignment")
        assert push["work"]["id"] == item["id"]
        await agent.request("work.accept", {"workId": item["id"]})
        reply = await agent.request("work.fail", {"workId": item["id"], "message": "network flake", "recoverable": True})
        outcomes.append(reply["outcome"])
    assert outcomes == ["retry", "dead-letter"]
    got = await api.ok("GET", f"/api/work/{item['id']}")
    assert got["status"] == "failed" and got["deadLetter"]["attempts"] == 2 and len(got["errors"]) == 2
    dlq = await api.ok("GET", "/api/dlq")
    assert [d["id"] for d in dlq["items"]] == [item["id"]] and dlq["items"][0]["reason"] == "network flake"
    await api.ok("POST", f"/api/dlq/{item['id']}/retry")
    push = await agent.next_push("assignment")
    await agent.request("work.accept", {"workId": item["id"]})
    await agent.request("work.complete", {"workId": item["id"], "summary": "third time lucky"})
    await wait_status(api, item["id"], "completed")
    assert (await api.ok("GET", "/api/dlq"))["count"] == 0
    assert (await api.call("POST", f"/api/dlq/{item['id']}/retry")).status == 409
    await agent.close()


async def test_non_recoverable_failure_dead_letters_at_once_and_discard_empties_the_dlq(api: Api, nc: NATS) -> None:
    agent = FakeAgent(nc, api.project, "strict")
    await agent.start()
    item = await api.ok("POST", "/api/work", WORK, status=201)
    await agent.next_push("assignment")
    reply = await agent.request("work.fail", {"workId": item["id"], "message": "syntax error", "code": "E1"})
    assert reply["outcome"] == "dead-letter"
    await api.ok("POST", f"/api/dlq/{item['id']}/discard")
    assert (await api.ok("GET", "/api/dlq"))["count"] == 0
    assert (await api.ok("GET", f"/api/work/{item['id']}"))["status"] == "failed"
    await agent.close()


async def test_lost_agent_work_is_requeued_and_completed_by_another(api: Api, nc: NATS) -> None:
    doomed = FakeAgent(nc, api.project, "doomed")
    await doomed.start()
    item = await api.ok("POST", "/api/work", WORK, status=201)
    await doomed.next_push("assignment")
    await doomed.request("work.accept", {"workId": item["id"]})
    doomed.stop_heartbeat()  # as good as kill -9 from weft's point of view
    rescuer = FakeAgent(nc, api.project, "rescuer", auto=True)
    await rescuer.start()
    done = await wait_status(api, item["id"], "completed")
    assert done["assignedTo"] == "rescuer" and done["attempts"] == 2
    lost = await api.ok("GET", "/api/agents/doomed")
    assert lost["status"] == "offline" and lost["offlineReason"] == "lost"
    await doomed.close()
    await rescuer.close()


async def test_assignment_not_accepted_in_time_returns_to_pending(api: Api, nc: NATS) -> None:
    sleepy = FakeAgent(nc, api.project, "sleepy")
    await sleepy.start()
    item = await api.ok("POST", "/api/work", WORK, status=201)
    await sleepy.next_push("assignment")
    # Never accepts: the scheduler withdraws it (accept timeout 3 s in the test service) and,
    # as sleepy is the only agent, offers it again.
    again = await sleepy.next_push("assignment", timeout=15)
    assert again["work"]["id"] == item["id"] and again["work"]["attempts"] == 2
    got = await api.ok("GET", f"/api/work/{item['id']}")
    assert got["lastRequeueReason"].startswith("not accepted")
    await sleepy.close()


async def test_cancel_of_in_progress_work_notifies_the_agent(api: Api, nc: NATS) -> None:
    agent = FakeAgent(nc, api.project, "busy")
    await agent.start()
    item = await api.ok("POST", "/api/work", WORK, status=201)
    await agent.next_push("assignment")
    await agent.request("work.accept", {"workId": item["id"]})
    await api.ok("POST", f"/api/work/{item['id']}/cancel", {"reason": "changed my mind"})
    push = await agent.next_push("cancel")
    assert push == {"type": "cancel", "workId": item["id"], "reason": "changed my mind"}
    late = await agent.request("work.complete", {"workId": item["id"]})
    assert late["ok"] is False and late["error"] == "Conflict"
    await agent.close()


async def test_shutdown_request_reaches_the_agent_and_it_gets_no_new_work(api: Api, nc: NATS) -> None:
    agent = FakeAgent(nc, api.project, "leaving")
    await agent.start()
    await api.ok("POST", "/api/agents/leaving/shutdown", {"graceful": True, "reason": "idle"})
    push = await agent.next_push("shutdown")
    assert push["graceful"] is True and push["reason"] == "idle"
    item = await api.ok("POST", "/api/work", WORK, status=201)
    assert item["waitingReason"] is not None
    dereg = await agent.request("agent.deregister", {"reason": "shutdown"})
    assert dereg["ok"]
    assert (await api.ok("GET", "/api/agents/leaving"))["status"] == "offline"
    await agent.close()


async def test_sync_returns_what_the_agent_holds_after_a_missed_push(api: Api, nc: NATS) -> None:
    agent = FakeAgent(nc, api.project, "forgetful")
    await agent.start()
    item = await api.ok("POST", "/api/work", WORK, status=201)
    await agent.next_push("assignment")
    synced = await agent.request("agent.sync", {})
    assert [w["id"] for w in synced["assignments"]] == [item["id"]]
    again = await agent.request("agent.register", agent.decl)
    assert [w["id"] for w in again["assignments"]] == [item["id"]]
    await agent.close()


async def test_rest_endpoints_for_agents_without_nats(api: Api, nc: NATS) -> None:
    agent = FakeAgent(nc, api.project, "resty")
    await agent.start()
    item = await api.ok("POST", "/api/work", WORK, status=201)
    await agent.next_push("assignment")
    wid = item["id"]
    assert (await api.call("POST", f"/api/work/{wid}/accept", {"guid": "someone-else"})).status == 409
    await api.ok("POST", f"/api/work/{wid}/accept", {"guid": "resty"})
    await api.ok("POST", f"/api/work/{wid}/progress", {"guid": "resty", "progress": 50})
    bad = await api.call("POST", f"/api/work/{wid}/progress", {"guid": "resty", "progress": 101})
    assert bad.status == 400 and (await bad.json())["details"]["field"] == "progress"
    await api.ok("POST", f"/api/work/{wid}/complete", {"guid": "resty", "summary": "via REST"})
    assert (await api.ok("GET", f"/api/work/{wid}"))["result"]["summary"] == "via REST"
    await agent.close()


async def test_protocol_errors_name_the_field(api: Api, nc: NATS) -> None:
    msg = await nc.request(f"weft.{api.project}.agent.register", orjson.dumps({"guid": "x"}), timeout=5)
    reply = orjson.loads(msg.data)
    assert reply["ok"] is False and reply["error"] == "ValidationError" and reply["field"] == "agentType"
    msg = await nc.request(f"weft.{api.project}.work.accept", b"{nope", timeout=5)
    assert orjson.loads(msg.data)["field"] == "body"


async def test_an_agent_joining_a_long_running_replica_is_not_lost_before_its_first_heartbeat(
    api: Api, nc: NATS
) -> None:
    """Regression: silence used to be measured from the replica's start when no heartbeat was on
    record, so the tick woken by a registration declared the new agent lost at once."""
    assert api.service is not None and api.service.scheduler is not None and api.service.liveness is not None
    liveness = api.service.liveness
    old_start = liveness.started
    liveness.started -= 3600  # this replica has been up for an hour
    try:
        agent = FakeAgent(nc, api.project, "newcomer", heartbeat_s=3600)  # one heartbeat, then silence
        await agent.start()
        liveness.seen.pop((api.project, "newcomer"), None)  # as if no sign of life were on record
        sched = await api.service.scheduler.wait_scheduling(api.project, timeout=10)
        await sched.tick(datetime.now(UTC))
        assert (await api.ok("GET", "/api/agents/newcomer"))["status"] == "online"
        await agent.close()
    finally:
        liveness.started = old_start
