"""Scoped API tokens (issue 14, found 1-2): a token file gives each token a name, projects and a
role; every route and the WebSocket enforce them; a token never learns of another project; the
token's name is the actor of its events. Real nats-server, real HTTP, a real file reloaded on change.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.support import make_client
from weft.api.auth import TokenRegistry
from weft.api.common import TOKENS
from weft.core.access import Principal, Role, ScryptParams, TokenEntry, TokenFile
from weft.service import WeftService
from weft.store.eventstore import EventStore

WORK = {"capability": "python", "boundary": "personal", "description": "scoped"}
PARAMS = ScryptParams(salt=b"0123456789abcdef", n=2**10)


def entry(name: str, role: Role, projects: set[str] | None) -> tuple[str, TokenEntry]:
    token = "weft_" + secrets.token_urlsafe(24)
    return token, TokenEntry(Principal(name, role, None if projects is None else frozenset(projects)),
                             PARAMS.hash(token))


def write(path: Path, *entries: TokenEntry) -> None:
    path.write_bytes(TokenFile(PARAMS, entries).to_json())


async def work_events(store: EventStore, project: str) -> list[str]:
    """The work events in the stream (the scheduler's leadership events come and go on their own)."""
    return [e.type async for e in store.read_range(project) if e.type.startswith("work.")]


class Tokens:
    """A token file with one token per role for project `mine` (and `alice`, submitter to `secret`)."""

    def __init__(self, path: Path, project: str, secret: str):
        self.path = path
        self.bearer: dict[str, str] = {}
        self.entries: dict[str, TokenEntry] = {}
        for name, role, projects in (("alice", Role.submit, {secret}), ("reader", Role.read, {project}),
                                     ("submitter", Role.submit, {project}), ("operator", Role.operate, {project}),
                                     ("root", Role.admin, None)):
            token, e = entry(name, role, projects)
            self.bearer[name], self.entries[name] = token, e
        write(path, *self.entries.values())

    def headers(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.bearer[name]}"}


@pytest.fixture
def secret_project() -> str:
    return "secret-" + secrets.token_hex(4)


@pytest.fixture
def tokens(tmp_path: Path, project: str, secret_project: str) -> Tokens:
    return Tokens(tmp_path / "tokens.json", project, secret_project)


@pytest.fixture
async def client(weft_service: WeftService, tokens: Tokens) -> AsyncIterator[TestClient]:
    c = await make_client(weft_service, tokens_file=tokens.path)
    yield c
    await c.close()


async def call(client: TestClient, tokens: Tokens, who: str, method: str, path: str, body: Any = None
               ) -> tuple[int, Any]:
    resp = await client.request(method, path, json=body, headers=tokens.headers(who))
    return resp.status, await resp.json()


async def test_a_token_cannot_reach_another_project_s_items(
    client: TestClient, tokens: Tokens, project: str, secret_project: str, store: EventStore
) -> None:
    status, item = await call(client, tokens, "alice", "POST", f"/api/work?projectId={secret_project}", WORK)
    assert status == 201, item
    # The operator of another project, by id and without naming a project (the original searched
    # every project): not found, the same answer as for an id that exists nowhere.
    status, body = await call(client, tokens, "operator", "GET", f"/api/work/{item['id']}")
    assert (status, body["error"]) == (404, "NotFound")
    status, body = await call(client, tokens, "operator", "POST", f"/api/work/{item['id']}/cancel", {})
    assert (status, body["error"]) == (404, "NotFound")
    assert await work_events(store, secret_project) == ["work.submitted"]
    # Naming the project is refused the same way whether it exists or not.
    status, named = await call(client, tokens, "operator", "GET", f"/api/work?projectId={secret_project}")
    status2, unknown = await call(client, tokens, "operator", "GET", "/api/work?projectId=no-such-project")
    assert status == status2 == 403
    assert named["details"] == unknown["details"] == {"field": "projectId"}
    assert named["message"].replace(secret_project, "P") == unknown["message"].replace("no-such-project", "P")


async def test_lists_and_project_stats_show_only_the_token_s_projects(
    client: TestClient, tokens: Tokens, project: str, secret_project: str
) -> None:
    assert (await call(client, tokens, "alice", "POST", f"/api/work?projectId={secret_project}", WORK))[0] == 201
    assert (await call(client, tokens, "submitter", "POST", f"/api/work?projectId={project}", WORK))[0] == 201
    _, stats = await call(client, tokens, "reader", "GET", "/api/stats/projects")
    assert stats["projects"] == [project]
    _, everything = await call(client, tokens, "root", "GET", "/api/stats/projects")
    assert {project, secret_project} <= set(everything["projects"])
    # A token for one project needs no projectId: that project is its default.
    _, work = await call(client, tokens, "reader", "GET", "/api/work")
    assert work["projectId"] == project and len(work["workItems"]) == 1
    _, agents = await call(client, tokens, "reader", "GET", "/api/agents")
    assert all(a["projectId"] == project for a in agents["agents"])


@pytest.mark.parametrize(("who", "method", "path", "needed"), [
    ("reader", "POST", "/api/work", "submit"),
    ("submitter", "POST", "/api/work/{id}/cancel", "operate"),
    ("submitter", "POST", "/api/targets", "operate"),
    ("submitter", "POST", "/api/agents/shutdown-batch", "operate"),
    ("operator", "POST", "/api/dlq/{id}/discard", "admin"),
])
async def test_a_role_below_the_route_s_is_a_403_naming_the_scope(
    client: TestClient, tokens: Tokens, project: str, store: EventStore, who: str, method: str, path: str, needed: str
) -> None:
    status, item = await call(client, tokens, "submitter", "POST", f"/api/work?projectId={project}", WORK)
    assert status == 201
    before = await work_events(store, project)
    status, body = await call(client, tokens, who, method, path.format(id=item["id"]) + f"?projectId={project}", {})
    assert status == 403, body
    assert body["error"] == "Forbidden" and body["details"]["required"] == needed
    assert await work_events(store, project) == before


async def test_the_token_s_name_is_the_actor_of_its_events(
    client: TestClient, tokens: Tokens, project: str, store: EventStore
) -> None:
    status, item = await call(client, tokens, "submitter", "POST", f"/api/work?projectId={project}", WORK)
    assert status == 201
    status, _ = await call(client, tokens, "operator", "POST", f"/api/work/{item['id']}/cancel", {})
    assert status == 200
    actors = {e.type: e.actor async for e in store.read_range(project) if e.type.startswith("work.")}
    assert actors["work.submitted"] == "submitter"
    assert actors["work.cancelled"] == "operator"


async def test_an_api_tokens_actor_id_is_not_a_fast_hash_of_the_token(
    weft_service: WeftService, project: str, store: EventStore
) -> None:
    """Found 2: the actor was `token:` + 12 hex of an unsalted sha256, so a guessable token could be
    recovered offline from any event. Now it is derived with scrypt (and is not a sha256 prefix)."""
    token = "guessable"
    client = await make_client(weft_service, api_tokens=(token,))
    try:
        resp = await client.post(f"/api/work?projectId={project}", json=WORK,
                                 headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 201
    finally:
        await client.close()
    [actor] = [e.actor async for e in store.read_range(project) if e.type == "work.submitted"]
    assert actor.startswith("token:")
    assert actor.removeprefix("token:") not in hashlib.sha256(token.encode()).hexdigest()


async def test_the_file_is_reloaded_when_it_changes_and_a_bad_edit_keeps_the_last_good_one(
    client: TestClient, tokens: Tokens, project: str
) -> None:
    registry = client.app[TOKENS]
    assert isinstance(registry, TokenRegistry)
    newcomer, e = entry("newcomer", Role.read, {project})
    assert (await client.get("/api/work", headers={"Authorization": f"Bearer {newcomer}"})).status == 401
    write(tokens.path, e, tokens.entries["reader"])  # revokes all but reader, adds newcomer
    registry.force_reload_check()
    assert (await client.get("/api/work", headers={"Authorization": f"Bearer {newcomer}"})).status == 200
    assert (await client.get("/api/work", headers=tokens.headers("root"))).status == 401
    tokens.path.write_text("{ not json")
    registry.force_reload_check()
    assert (await client.get("/api/work", headers={"Authorization": f"Bearer {newcomer}"})).status == 200


async def test_the_websocket_refuses_a_project_outside_the_token_s_scope(
    client: TestClient, tokens: Tokens, project: str, secret_project: str
) -> None:
    async with client.ws_connect(f"/api/ws?token={tokens.bearer['reader']}") as ws:
        await ws.send_json({"type": "subscribe", "topic": "work", "projectId": secret_project})
        refused = await ws.receive_json()
        assert refused["type"] == "error" and "may not use project" in refused["error"]
        await ws.send_json({"type": "subscribe", "topic": "work"})
        ack = await ws.receive_json()
        assert (ack["type"], ack["projectId"]) == ("ack", project)
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        async with client.ws_connect("/api/ws?token=wrong"):
            pass
    assert err.value.status == 401


async def weft_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    import asyncio
    import os
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "weft.cli", *args, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_weft_serve_refuses_an_open_api_on_a_reachable_address(tmp_path: Path) -> None:
    """Issue 14 item 6: without tokens, binding beyond loopback needs --insecure. The refusal comes
    before anything starts (no nats-server is launched)."""
    env = {"API_HOST": "0.0.0.0", "API_TOKENS": "", "WEFT_TOKENS_FILE": "", "WEFT_DATA_DIR": str(tmp_path)}
    code, _, err = await weft_cli("serve", "--embedded", env=env)
    assert code == 2
    assert "refusing to start" in err and "--insecure" in err
    assert not (tmp_path / "nats").exists()


async def test_weft_serve_refuses_a_malformed_token_file(tmp_path: Path) -> None:
    bad = tmp_path / "tokens.json"
    bad.write_text('{"scrypt": {"salt": "00112233445566778899aabbccddeeff"}, "tokens": [{"name": "x"}]}')
    code, _, err = await weft_cli("serve", "--embedded", env={"WEFT_TOKENS_FILE": str(bad),
                                                              "WEFT_DATA_DIR": str(tmp_path)})
    assert code == 2
    assert "tokens[0].role" in err


async def test_weft_tokens_add_list_remove_round_trip(weft_service: WeftService, tmp_path: Path, project: str) -> None:
    path = tmp_path / "tokens.json"
    code, out, _ = await weft_cli("tokens", "add", "--file", str(path), "--name", "ci", "--role", "submit",
                                  "--projects", project)
    assert code == 0
    token = out.strip()
    assert token.startswith("weft_") and token not in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    code, out, _ = await weft_cli("tokens", "list", "--file", str(path))
    assert out.split() == ["ci", "submit", project]
    client = await make_client(weft_service, tokens_file=path)
    try:
        resp = await client.post("/api/work", json=WORK, headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 201, await resp.text()
        assert (await resp.json())["projectId"] == project
        code, _, _ = await weft_cli("tokens", "remove", "--file", str(path), "--name", "ci")
        assert code == 0
        client.app[TOKENS].force_reload_check()  # type: ignore[attr-defined]
        resp = await client.get("/api/work", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 401
    finally:
        await client.close()
