"""`/api/ws`: the original Weft's WebSocket API (protocol reference §4), served from the live hub.

Client -> server: `subscribe {topic, filter?, projectId?, fromSeq?}`, `unsubscribe {topic}`, `ping`.
Server -> client: `ack`, `pong`, `error`, `event` (with `seq`), `stats`. `setup(app)` registers the
route and the hub's start-up and shutdown (every socket is closed with 1001 on shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from projections.events import is_valid_project_id
from weft.api.auth import BEARER, offered_protocols
from weft.api.common import SERVICES, principal_of
from weft.core.access import ANONYMOUS, Principal
from weft.core.limits import TokenBucket
from weft.core.live_events import TOPICS, filter_errors
from weft.runtime.live_hub import Client, LiveHub
from weft.stamps import utc_now

HUB = web.AppKey("live_hub", LiveHub)
WS_CONFIG = web.AppKey("live_hub_config", dict)


def setup(
    app: web.Application,
    *,
    heartbeat_s: float = 30.0,
    stats_interval_s: float = 30.0,
    queue_max: int = 1000,
    close_timeout_s: float = 5.0,
) -> None:
    """Register `/api/ws` and the hub's lifecycle on `app` (before it starts)."""
    app[WS_CONFIG] = {"heartbeat_s": heartbeat_s, "close_timeout_s": close_timeout_s}
    app.router.add_get("/api/ws", websocket_handler)

    async def start(app: web.Application) -> None:
        hub = LiveHub(app[SERVICES].readmodel, queue_max=queue_max, stats_interval_s=stats_interval_s)
        await hub.start()
        app[HUB] = hub
        app[SERVICES].metrics.watch_hub(hub)

    async def shutdown(app: web.Application) -> None:
        hub = app.get(HUB)
        if hub is not None:
            await hub.stop()

    app.on_startup.append(start)
    app.on_shutdown.append(shutdown)


def health(app: web.Application) -> dict[str, Any]:
    """The `websocket` block of /health."""
    hub = app.get(HUB)
    if hub is None:
        return {"connections": 0, "status": "disabled", "subscriptions": 0}
    return hub.health()


WRITE_NOW_MAX_BUFFER = 64 * 1024  # above this, messages wait in the client's queue (and may drop it)


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked (server-to-client) WebSocket text frame (RFC 6455 §5.2)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x81, n))
    elif n < 1 << 16:
        head = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return head + payload


def frame_writer(ws: web.WebSocketResponse, transport: Any) -> Callable[[bytes], bool] | None:
    """Writes a text message straight to the socket while the connection is open and its write
    buffer is small; the hub falls back to `ws.send_str` (its queue) otherwise. Frames are whole,
    so they interleave safely with aiohttp's own (pings, close)."""
    # Duck-typed: uvloop's transports are not asyncio.WriteTransport subclasses.
    if not all(hasattr(transport, name) for name in ("write", "is_closing", "get_write_buffer_size")):
        return None

    def write(payload: bytes) -> bool:
        if ws.closed or transport.is_closing() or transport.get_write_buffer_size() > WRITE_NOW_MAX_BUFFER:
            return False
        transport.write(text_frame(payload))
        return True

    return write


def _error(text: str) -> dict[str, Any]:
    return {"type": "error", "error": text, "timestamp": utc_now()}


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB]
    config = request.app[WS_CONFIG]
    limits = request.app[SERVICES].settings.limits
    protocols = (BEARER,) if BEARER in [p.lower() for p in offered_protocols(request)] else ()
    # No permessage-deflate: it would compress every event once per client (small JSON, many
    # clients: CPU for little), and an uncompressed frame can be written to every client as is.
    ws = web.WebSocketResponse(
        heartbeat=config["heartbeat_s"] or None, protocols=protocols, timeout=config["close_timeout_s"],
        max_msg_size=limits.ws_message_bytes,  # above it aiohttp closes with 1009 (message too big)
        compress=False,
    )
    await ws.prepare(request)

    async def close(code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(config["close_timeout_s"]):
                await ws.close(code=code, message=reason.encode()[:123])
        except TimeoutError:
            if request.transport is not None:
                request.transport.abort()  # a client that reads nothing cannot take the close frame

    client = hub.connect(ws.send_str, close, frame_writer(ws, request.transport))
    principal = principal_of(request)
    default_project = principal.default_project(request.app[SERVICES].settings.default_project)
    # A client's messages cost work here (a subscribe with fromSeq reads the stream): at most
    # `ws_messages_per_s` of them, with a burst of twice that; the rest are refused, not queued.
    bucket = TokenBucket(limits.ws_messages_per_s, max(1.0, 2 * limits.ws_messages_per_s))
    loop = asyncio.get_running_loop()
    try:
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY) and bucket.take(loop.time()) > 0:
                client.send_json(_error(f"Rate limit: at most {limits.ws_messages_per_s:g} messages/s "
                                        f"(WEFT_WS_MAX_MESSAGES_PER_S); message ignored"))
            elif msg.type == WSMsgType.TEXT:
                await handle_message(hub, client, msg.data, default_project, principal)
            elif msg.type == WSMsgType.BINARY:
                client.send_json(_error("Invalid message format"))
            elif msg.type == WSMsgType.ERROR:
                break
            if client.closed:
                break
    finally:
        await hub.disconnect(client)
        with contextlib.suppress(Exception):
            if not ws.closed:
                await close(1000, "")
    return ws


async def handle_message(
    hub: LiveHub, client: Client, raw: str, default_project: str, principal: Principal = ANONYMOUS
) -> None:
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError:
        client.send_json(_error("Invalid message format"))
        return
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        client.send_json(_error("Invalid message format"))
        return
    kind = msg["type"]
    if kind == "ping":
        client.send_json({"type": "pong", "timestamp": utc_now()})
    elif kind == "subscribe":
        await _subscribe(hub, client, msg, default_project, principal)
    elif kind == "unsubscribe":
        topic = msg.get("topic")
        if not isinstance(topic, str):
            client.send_json(_error("Invalid message format"))
        elif hub.unsubscribe(client, topic):
            client.send_json({"type": "ack", "unsubscribed": topic, "timestamp": utc_now()})
        else:
            client.send_json(_error(f"Not subscribed to topic: {topic}"))
    else:
        client.send_json(_error(f"Unknown message type: {kind}"))


async def _subscribe(
    hub: LiveHub, client: Client, msg: dict[str, Any], default_project: str, principal: Principal
) -> None:
    topic = msg.get("topic")
    if not isinstance(topic, str):
        client.send_json(_error("Invalid message format"))
        return
    if topic not in TOPICS:
        client.send_json(_error(f"Unknown topic: {topic} (topics: {', '.join(TOPICS)})"))
        return
    filter_ = msg.get("filter")
    errors = filter_errors(topic, filter_)
    if errors:
        client.send_json(_error(f"Invalid filter: {'; '.join(errors)}"))
        return
    project = msg.get("projectId") or default_project
    if not isinstance(project, str) or not is_valid_project_id(project):
        client.send_json(_error(f"Invalid projectId: {project} (must match [A-Za-z0-9_-]{{1,64}})"))
        return
    if not principal.may_use(project):
        client.send_json(_error(f"Forbidden: token {principal.name!r} may not use project {project!r}"))
        return
    from_seq = msg.get("fromSeq")
    if from_seq is not None and (not isinstance(from_seq, int) or isinstance(from_seq, bool) or from_seq < 1):
        client.send_json(_error("Invalid fromSeq: must be an integer >= 1"))
        return
    if project not in hub.readmodel.views:
        # A project another replica created and this one has not attached yet: attach now.
        with contextlib.suppress(Exception):
            await hub.readmodel.view(project)
    ack: dict[str, Any] = {"type": "ack", "subscribed": topic, "timestamp": utc_now(), "projectId": project}
    if from_seq is not None:
        ack["fromSeq"] = from_seq
    if client.send_json(ack):
        hub.subscribe(client, topic, project, filter_ or None, from_seq)
