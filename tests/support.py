"""Test helpers shared across suites: an HTTP client bound to a project, an in-process app."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from weft.api import create_app
from weft.api.common import Services
from weft.service import WeftService


class Api:
    """An HTTP client bound to one project (sent as X-Weft-Project on every request)."""

    def __init__(self, client: TestClient, project: str) -> None:
        self.client = client
        self.project = project

    async def call(self, method: str, path: str, json: Any = None, **kw: Any) -> ClientResponse:
        headers = {"X-Weft-Project": self.project, **kw.pop("headers", {})}
        return await self.client.request(method, path, json=json, headers=headers, **kw)

    async def ok(self, method: str, path: str, json: Any = None, status: int = 200, **kw: Any) -> Any:
        resp = await self.call(method, path, json, **kw)
        body = await resp.json()
        assert resp.status == status, body
        return body


async def make_client(service: WeftService, **overrides: Any) -> TestClient:
    assert service.replica is not None and service.commands is not None
    settings = replace(service.settings, **overrides)
    app = create_app(Services(settings, service.replica, service.commands))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client
