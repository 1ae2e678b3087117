"""The elastic fleet end to end through weft: real spin-ups, real agents, real scale-down.

Each test runs its own weft replica (in-process, short timings) on the session's nats-server and
drives it only through REST; agents are real `weft agent` processes launched by the mechanisms.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import nats
import pytest
from aiohttp import web

from tests.servers import Recorded, RecordingServer, own_nats_server, run_sshd
from tests.support import Api, own_replica, until
from weft.store.embedded import EmbeddedNats, die_with_parent
from weft.store.eventstore import EventStore

pytestmark = pytest.mark.slow

WEFT = str(Path(sys.executable).parent / "weft")
WORK = {"capability": "python", "boundary": "personal", "description": "build it"}


@pytest.fixture(scope="module")
async def fleet_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedNats]:
    """A server of this module's own: a replica attaches every project on its server, and must not
    compete for (or be slowed by) the projects of every other test."""
    async with own_nats_server(tmp_path_factory, "fleet") as server:
        yield server


@pytest.fixture
async def fleet_store(fleet_nats: EmbeddedNats) -> AsyncIterator[EventStore]:
    nc = await nats.connect(fleet_nats.url)
    yield EventStore(nc.jetstream())
    await nc.close()


@pytest.fixture
async def fleet_api(fleet_nats: EmbeddedNats, project: str) -> AsyncIterator[Api]:
    """A replica of this test's own, so its scheduler leads the test's project with fleet timings
    short enough to watch an idle agent being scaled down."""
    mechanisms: dict[str, Any] = {}
    try:
        async with own_replica(
            fleet_nats.url, project, heartbeat_ms=500, accept_timeout_ms=10_000, idle_timeout_ms=1_500, lease_ttl_s=2.0
        ) as api:
            assert api.service is not None
            mechanisms = api.service.mechanisms
            yield api
    finally:
        # Local agents run in their own session on purpose (they outlive a weft restart): a test
        # must end the ones its replica launched itself, once the replica has stopped.
        local = mechanisms.get("local")
        for pid in local.children() if local is not None else []:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            await local.wait(pid)




def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent may be init in a container without --init).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


async def test_local_spin_up_runs_the_work_then_idle_scale_down_stops_the_process(
    fleet_api: Api, fleet_store: EventStore
) -> None:
    target = {
        "name": "laptop", "agentType": "claude-code", "mechanism": "local", "capabilities": ["python"],
        "config": {"command": WEFT, "args": ["agent", "--command", "echo built: $(cat)"]},
        "maxConcurrentAgents": 2, "cooldownMs": 0, "spinUpTimeoutMs": 30_000,
    }
    await fleet_api.ok("POST", "/api/targets", target, status=201)
    item = await fleet_api.ok("POST", "/api/work", WORK, status=201)

    done = await until(fleet_api, lambda s: s.work[item["id"]]["status"] == "completed" and s.work[item["id"]])
    assert done["result"]["summary"] == "built: build it"
    agent_guid = done["assignedTo"]
    state = fleet_api.service.readmodel.views[fleet_api.project].state  # type: ignore[union-attr]
    await until(fleet_api, lambda s: s.agents[agent_guid]["launch"])  # spinup.completed may trail the work
    agent = state.agents[agent_guid]
    assert agent["spinUpId"] and agent["targetId"] == state.targets[agent["targetId"]]["id"]
    pid = agent["launch"]["handle"]["pid"]

    # Idle past IDLE_TIMEOUT_MS (1.5 s here): asked to stop, deregisters, and its process is gone.
    await until(fleet_api, lambda s: s.agents[agent_guid]["status"] == "offline")
    assert state.agents[agent_guid]["shutdownRequested"]["reason"] == "idle-timeout"
    # The local mechanism spawned it and reaps it: await its exit status (awaited, not polled).
    local = fleet_api.service.mechanisms["local"]  # type: ignore[union-attr]
    status = await asyncio.wait_for(local.wait(pid), 30)  # type: ignore[attr-defined]
    assert status == 0
    assert not pid_alive(pid)
    t = await fleet_api.ok("GET", "/api/targets/laptop")
    assert t["lastSpinUp"]["outcome"] == "success" and t["lastSpinUp"]["durationMs"] > 0
    types = [e.type async for e in fleet_store.read_range(fleet_api.project)]
    assert types.count("spinup.requested") == 1 and types.count("spinup.completed") == 1


async def test_twenty_waiting_items_never_more_than_three_live_spin_ups(fleet_api: Api, fleet_store: EventStore) -> None:
    target = {
        "name": "pool", "agentType": "claude-code", "mechanism": "local", "capabilities": ["python"],
        "config": {"command": WEFT, "args": ["agent", "--command", "echo ok"]},
        "maxConcurrentAgents": 3, "cooldownMs": 0, "spinUpTimeoutMs": 30_000,
    }
    await fleet_api.ok("POST", "/api/targets", target, status=201)
    ids = [(await fleet_api.ok("POST", "/api/work", WORK, status=201))["id"] for _ in range(20)]
    await until(fleet_api, lambda s: all(s.work[i]["status"] == "completed" for i in ids), timeout=120)
    # From the stream: at no point more than 3 agents of the target alive or starting.
    live: set[str] = set()
    starting: set[str] = set()
    peak = 0
    async for ev in fleet_store.read_range(fleet_api.project):
        if ev.type == "spinup.requested":
            starting.add(ev.data["spinUpId"])
        elif ev.type in ("spinup.completed", "spinup.failed"):
            starting.discard(ev.data["spinUpId"])
        elif ev.type == "agent.registered" and ev.data.get("spinUpId"):
            starting.discard(ev.data["spinUpId"])  # from here on it counts as a live agent
            live.add(ev.entity_id)
        elif ev.type in ("agent.deregistered", "agent.lost"):
            live.discard(ev.entity_id)
        peak = max(peak, len(live) + len(starting))
    assert 1 <= peak <= 3


async def test_a_failing_launch_is_recorded_and_the_breaker_opens(fleet_api: Api) -> None:
    target = {
        "name": "broken", "agentType": "claude-code", "mechanism": "local", "capabilities": ["python"],
        "config": {"command": "sh", "args": ["-c", "exit 3"]}, "cooldownMs": 0,
        "circuitBreakerThreshold": 2, "healthCheck": {"enabled": False},
    }
    await fleet_api.ok("POST", "/api/targets", target, status=201)
    item = await fleet_api.ok("POST", "/api/work", WORK, status=201)
    await until(fleet_api, lambda s: next(iter(s.targets.values()))["status"] == "error")
    t = await fleet_api.ok("GET", "/api/targets/broken")
    assert t["lastSpinUp"]["outcome"] == "failed" and "3" in t["lastSpinUp"]["error"]
    got = await fleet_api.ok("GET", f"/api/work/{item['id']}")
    assert got["status"] == "pending"
    assert "no agent with capability python" in got["waitingReason"]
    assert "target broken is error" in got["waitingReason"]


async def test_secret_values_never_appear_in_events_or_responses(fleet_api: Api, fleet_store: EventStore) -> None:
    secret = "tok-" + os.urandom(8).hex()
    os.environ["WEFT_TEST_SECRET"] = secret
    try:
        target = {
            "name": "secretive", "agentType": "claude-code", "mechanism": "local", "capabilities": ["python"],
            "config": {"command": WEFT, "args": ["agent", "--command", "echo ok"],
                       "env": {"API_TOKEN": "env:WEFT_TEST_SECRET"}},
            "cooldownMs": 0,
        }
        await fleet_api.ok("POST", "/api/targets", target, status=201)
        item = await fleet_api.ok("POST", "/api/work", WORK, status=201)
        await until(fleet_api, lambda s: s.work[item["id"]]["status"] == "completed")
        await fleet_api.ok("POST", "/api/targets/secretive/test")
        bodies = [
            await (await fleet_api.call("GET", path)).text()
            for path in ("/api/targets", "/api/targets/secretive", "/api/agents", f"/api/work/{item['id']}",
                         "/api/work", "/api/stats")
        ]
        dump = b"".join([e.encode() async for e in fleet_store.read_range(fleet_api.project)])
        assert secret not in "".join(bodies)
        assert secret.encode() not in dump
        assert b"env:WEFT_TEST_SECRET" in dump  # the reference is what is stored
    finally:
        del os.environ["WEFT_TEST_SECRET"]


async def test_ssh_spin_up_runs_the_agent_remotely_and_a_wrong_key_fails_clearly(
    fleet_api: Api, tmp_path: Path
) -> None:
    """Real SSH: an asyncssh server on 127.0.0.1 (public-key auth, commands run by /bin/sh)."""
    async with run_sshd(tmp_path) as sshd:
        ssh = {"host": "127.0.0.1", "port": sshd.port, "user": "agent", "command": WEFT,
               "args": ["agent", "--command", "echo via ssh"], "privateKeyPath": str(sshd.client_key_path),
               "knownHosts": str(sshd.known_hosts)}
        await fleet_api.ok("POST", "/api/targets", {
            "name": "box", "agentType": "claude-code", "mechanism": "ssh", "capabilities": ["python"],
            "config": {"ssh": ssh}, "cooldownMs": 0}, status=201)
        probe = await fleet_api.ok("POST", "/api/targets/box/test")
        assert probe["healthy"] is True, probe
        item = await fleet_api.ok("POST", "/api/work", WORK, status=201)
        done = await until(fleet_api, lambda s: s.work[item["id"]]["status"] == "completed" and s.work[item["id"]])
        assert done["result"]["summary"] == "via ssh"
        assert any("nohup" in c or "/bin/sh" in c for c in sshd.commands)

        other = asyncssh.generate_private_key("ssh-ed25519")
        wrong = tmp_path / "wrong_key"
        other.write_private_key(wrong)
        wrong.chmod(0o600)
        await fleet_api.ok("POST", "/api/targets", {
            "name": "badkey", "agentType": "claude-code", "mechanism": "ssh", "capabilities": ["go"],
            "config": {"ssh": {**ssh, "privateKeyPath": str(wrong)}}, "healthCheck": {"enabled": False}},
            status=201)
        bad = await fleet_api.ok("POST", "/api/targets/badkey/test")
        assert bad["healthy"] is False and "permission denied" in bad["error"]
        await fleet_api.ok("POST", "/api/targets/badkey/spin-up")
        state = fleet_api.service.readmodel.views[fleet_api.project].state  # type: ignore[union-attr]
        await until(fleet_api, lambda s: (t := next(t for t in s.targets.values() if t["name"] == "badkey"))
                    ["lastSpinUp"] is not None and t)
        last = next(t for t in state.targets.values() if t["name"] == "badkey")["lastSpinUp"]
        assert last["outcome"] == "failed" and "permission denied (publickey)" in last["error"]
        # Shut the remote agent down before its server goes away.
        for guid in [g for g, a in state.agents.items() if a["status"] != "offline"]:
            await fleet_api.ok("POST", f"/api/agents/{guid}/shutdown", {"graceful": False})


async def test_kubernetes_job_runs_the_agent_and_scale_down_deletes_the_job(
    fleet_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Kubernetes API server can run here: a local HTTP stand-in receives the exact requests the
    real one would (POST/DELETE batch/v1 Jobs with a bearer token) and, like a kubelet, runs the Job's
    container command as a real `weft agent` process with the Job's env. weft must create the Job,
    see its agent register and finish the work, and delete the Job when the agent is scaled down."""
    monkeypatch.setenv("WEFT_TEST_K8S_TOKEN", "k8s-fleet-token")
    api = RecordingServer()
    pods: dict[str, asyncio.subprocess.Process] = {}
    jobs = "/apis/batch/v1/namespaces/agents/jobs"

    async def create(rec: Recorded) -> web.Response:
        job = rec.json()
        container = job["spec"]["template"]["spec"]["containers"][0]
        env = {**os.environ, **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
        pods[job["metadata"]["name"]] = await asyncio.create_subprocess_exec(
            *container["command"], *container.get("args", []), env=env, preexec_fn=die_with_parent)
        job["metadata"]["uid"] = "uid-" + job["metadata"]["name"]
        return web.json_response(job, status=201)

    async def delete(rec: Recorded) -> web.Response:
        return web.json_response({"kind": "Status", "status": "Success"})

    api.on("POST", jobs, create)
    await api.server.start_server()
    try:
        await fleet_api.ok("POST", "/api/targets", {
            "name": "cluster", "agentType": "claude-code", "mechanism": "kubernetes", "capabilities": ["python"],
            "config": {"kubernetes": {"apiServer": api.url, "tokenRef": "env:WEFT_TEST_K8S_TOKEN",
                                      "namespace": "agents", "image": "weft:dev", "command": [WEFT, "agent"],
                                      "args": ["--command", "echo from a pod"]}},
            "cooldownMs": 0, "healthCheck": {"enabled": False}}, status=201)
        item = await fleet_api.ok("POST", "/api/work", WORK, status=201)
        done = await until(fleet_api, lambda s: s.work[item["id"]]["status"] == "completed" and s.work[item["id"]])
        assert done["result"]["summary"] == "from a pod"
        (name, pod), = pods.items()
        api.on("DELETE", f"{jobs}/{name}", delete)
        created = api.of("POST", jobs)[0]
        assert created.headers["Authorization"] == "Bearer k8s-fleet-token"
        labels = created.json()["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "weft"
        # Idle past the timeout: the agent is asked to stop, exits, and weft deletes its Job.
        assert await asyncio.wait_for(pod.wait(), 30) == 0
        await until(fleet_api, lambda s: api.of("DELETE", f"{jobs}/{name}"))
        deleted = api.of("DELETE", f"{jobs}/{name}")[0]
        assert "Background" in (deleted.query.get("propagationPolicy", "") + deleted.body.decode())
    finally:
        for pod in pods.values():
            if pod.returncode is None:
                pod.kill()
                await pod.wait()
        await api.server.close()


async def test_a_spun_up_agent_that_dies_holding_work_is_replaced_and_the_work_completes(fleet_api: Api) -> None:
    # The first attempt hangs (as if the model stalled); kill -9 of its agent must not lose the item.
    command = 'if [ "$WEFT_WORK_ATTEMPT" = 1 ]; then exec sleep 600; fi; echo "finished on attempt $WEFT_WORK_ATTEMPT"'
    target = {
        "name": "flaky", "agentType": "claude-code", "mechanism": "local", "capabilities": ["python"],
        "config": {"command": WEFT, "args": ["agent", "--command", command]},
        "maxConcurrentAgents": 1, "cooldownMs": 100, "healthCheck": {"enabled": False},
    }
    await fleet_api.ok("POST", "/api/targets", target, status=201)
    item = await fleet_api.ok("POST", "/api/work", WORK, status=201)
    first = await until(fleet_api, lambda s: (w := s.work[item["id"]])["status"] == "in-progress" and
                        s.agents[w["assignedTo"]]["launch"] and s.agents[w["assignedTo"]])
    os.kill(first["launch"]["handle"]["pid"], 9)
    done = await until(fleet_api, lambda s: s.work[item["id"]]["status"] == "completed" and s.work[item["id"]])
    assert done["result"]["summary"] == "finished on attempt 2"
    assert done["assignedTo"] != first["guid"]
    state = fleet_api.service.readmodel.views[fleet_api.project].state  # type: ignore[union-attr]
    assert state.agents[first["guid"]]["offlineReason"] == "lost"
    flaky = next(iter(state.targets.values()))
    assert flaky["crashes"] == 0  # reset once a replacement completed work
    assert flaky["useCount"] == 2
