"""/api/channels: read Warp's channel streams (`{project}_{CHANNEL}`) without creating consumers.

Warp creates a channel's stream on its first message, so a valid channel name without a stream is
an empty channel (200, no messages). 404 (naming the field `name`) is for a name no channel can
have; a bad `limit` or project id is a 400.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import nats.js.errors
import orjson
from aiohttp import web

from weft.api.common import json_response, project_of, services
from weft.core.errors import InvalidInput, NotFound

MAX_MESSAGES = 1000
CHANNEL_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def stream_for(project: str, channel: str) -> str:
    return f"{project}_{re.sub(r'[^A-Za-z0-9]', '_', channel).upper()}"


async def list_channels(request: web.Request) -> web.Response:
    project = project_of(request)
    js = services(request).readmodel.store.js
    prefix = f"{project}_"
    channels = []
    for info in await js.streams_info():
        name = info.config.name or ""
        if name.startswith(prefix) and not name.startswith("WEFT_"):
            channels.append(
                {
                    "name": name[len(prefix) :].lower().replace("_", "-"),
                    "description": info.config.description or "",
                    "stream": name,
                    "messageCount": info.state.messages,
                }
            )
    return json_response({"channels": channels, "count": len(channels), "projectId": project})


async def messages(request: web.Request) -> web.Response:
    project = project_of(request)
    channel = request.match_info["name"]
    if not CHANNEL_RE.match(channel):
        raise NotFound("no such channel: a channel name matches [A-Za-z0-9_-]{1,64}", field="name")
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise InvalidInput("limit must be an integer", field="limit") from None
    if not 1 <= limit <= MAX_MESSAGES:
        raise InvalidInput(f"limit must be between 1 and {MAX_MESSAGES}", field="limit")
    js = services(request).readmodel.store.js
    stream = stream_for(project, channel)
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        # Not used yet: Warp creates the stream with the first message. Read lazily, create nothing.
        return json_response({"channel": channel, "messages": [], "count": 0, "projectId": project})
    first, last = info.state.first_seq, info.state.last_seq
    seqs = list(range(max(first, last - limit + 1), last + 1)) if last else []
    sem = asyncio.Semaphore(32)

    async def get(seq: int) -> dict[str, Any] | None:
        async with sem:
            try:
                msg = await js.get_msg(stream, seq=seq, direct=bool(info.config.allow_direct))
            except nats.js.errors.NotFoundError:
                return None  # deleted or expired between info and read
        try:
            body = orjson.loads(msg.data or b"{}")
        except orjson.JSONDecodeError:
            body = {"message": (msg.data or b"").decode(errors="replace")}
        if not isinstance(body, dict):
            body = {"message": body}
        return {"timestamp": body.get("timestamp"), "handle": body.get("handle"), "message": body.get("message"),
                "seq": seq}

    found = [m for m in await asyncio.gather(*(get(s) for s in seqs)) if m is not None]
    return json_response({"channel": channel, "messages": found, "count": len(found), "projectId": project})


def routes() -> list[web.RouteDef]:
    return [web.get("/api/channels", list_channels), web.get("/api/channels/{name}/messages", messages)]
