"""The spin-up allow-list (WEFT_SPINUP_POLICY_FILE) on a real replica: refused at registration and
update with a 403 naming the field and no event appended, and checked again at launch and probe, so
a policy tightened after registration stops a real process from starting and a real peer from
being contacted."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

import weft.watched_file
from tests.servers import RecordingServer, own_nats_server
from tests.support import Api, own_replica, until
from weft.service import WeftService
from weft.settings import Settings, SettingsError

PY = sys.executable


def write(path: Path, **projects: Any) -> None:
    path.write_bytes(orjson.dumps({"projects": projects}))


def local(name: str, command: str) -> dict[str, Any]:
    return {"name": name, "agentType": "claude-code", "mechanism": "local", "capabilities": ["python"],
            "healthCheck": {"enabled": False}, "cooldownMs": 0, "config": {"local": {"command": command}}}


async def seq(api: Api) -> int:
    assert api.service is not None and api.service.readmodel is not None
    return await api.service.readmodel.store.last_seq(api.project)


async def refused(api: Api, method: str, path: str, body: Any, field: str) -> None:
    before = await seq(api)
    resp = await api.call(method, path, body)
    answer = await resp.json()
    assert resp.status == 403, answer
    assert answer["details"]["field"] == field and answer["details"]["setting"] == "WEFT_SPINUP_POLICY_FILE"
    assert await seq(api) == before  # nothing appended


async def test_registration_update_launch_and_probe_obey_the_policy(
    tmp_path_factory: pytest.TempPathFactory, project: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a nats-server of its own: the session's replica, which has no policy, must not be the one
    that leads the project and launches."""
    monkeypatch.setattr(weft.watched_file, "CHECK_S", 0.0)  # re-read on every use, not once a second
    policy = tmp_path / "policy.json"
    write(policy, **{"*": {"mechanisms": ["local", "webhook"], "commands": [PY], "hosts": ["127.0.0.1"]}})
    marker = tmp_path / "started"
    peer = RecordingServer()
    await peer.server.start_server()
    async with own_nats_server(tmp_path_factory, "policy") as server, \
            own_replica(server.url, project, spinup_policy_file=policy) as api:
        await api.ok("POST", "/api/targets", local("laptop", shlex.join([PY, "-c", f"open({str(marker)!r}, 'w')"])),
                     status=201)
        await until(api, lambda s: s.leader)  # the scheduler's own first event is not a refused request's
        await refused(api, "POST", "/api/targets", {
            "name": "box", "agentType": "claude-code", "mechanism": "ssh", "capabilities": ["python"],
            "config": {"ssh": {"host": "127.0.0.1", "user": "ci", "command": PY}}}, "mechanism")
        await refused(api, "POST", "/api/targets", local("sh", "/bin/sh -c true"), "config.local.command")
        await refused(api, "PUT", "/api/targets/laptop", {"config": {"command": "/bin/sh -c true"}},
                      "config.local.command")
        await api.ok("POST", "/api/targets", {
            "name": "hook", "agentType": "claude-code", "mechanism": "webhook", "capabilities": ["python"],
            "healthCheck": {"enabled": False}, "config": {"webhook": {"url": f"{peer.url}/spin"}}}, status=201)

        # Tightened after registration: the launch and the probe are refused, nothing runs or is called.
        write(policy, **{"*": {"mechanisms": ["local", "webhook"], "commands": ["weft"], "hosts": ["*.example"]}})
        await api.ok("POST", "/api/targets/laptop/spin-up")
        last = await until(api, lambda s: next(t for t in s.targets.values() if t["name"] == "laptop")["lastSpinUp"])
        assert last["outcome"] == "failed" and "denied" in last["error"] and "config.local.command" in last["error"]
        assert not marker.exists()
        probe = await api.ok("POST", "/api/targets/hook/test")
        assert probe["healthy"] is False and "config.webhook.url" in probe["error"]
        assert peer.requests == []

        # A file that no longer parses leaves the last good policy in force.
        policy.write_text("{not json")
        await refused(api, "POST", "/api/targets", local("again", PY), "config.local.command")
        await api.ok("POST", "/api/targets", local("allowed", "weft agent"), status=201)
    await peer.server.close()


async def test_a_policy_file_that_does_not_parse_stops_the_replica_from_starting(
    nats_server: Any, tmp_path: Path
) -> None:
    bad = tmp_path / "policy.json"
    bad.write_text('{"projects": {"p": {"hosts": "x"}}}')
    service = WeftService(Settings.from_env({"WEFT_SPINUP_POLICY_FILE": str(bad)}))
    with pytest.raises(SettingsError, match=r"WEFT_SPINUP_POLICY_FILE.*projects\.p\.hosts"):
        await service.start(nats_server.url, serve_http=False)
    await service.stop()
