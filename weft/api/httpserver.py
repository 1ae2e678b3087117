"""The HTTP server weft's app runs on: aiohttp's, except that a request aiohttp's own parser refuses
(a URL or a header over its 8 KiB limits, a malformed request line) gets weft's JSON error shape
too, not aiohttp's plain text, so every answer a client parses has one form."""

from __future__ import annotations

from http import HTTPStatus

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest


class _JsonErrorsHandler(RequestHandler):
    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)  # logs, and refuses if bytes went out
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        reason = str(exc) if exc is not None and status != 500 else phrase
        body = {"error": "BadRequest" if status == 400 else phrase.replace(" ", ""),
                "message": f"request refused before routing: {reason}"[:500], "details": {"field": "request"}}
        resp = web.Response(status=plain.status, body=orjson.dumps(body), content_type="application/json")
        resp.force_close()
        return resp


class _JsonErrorsServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorsHandler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer parser errors in JSON."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorsServer  # same state, one method different: no copy of aiohttp's setup
        return server
