"""The WebSocket text frames the live hub writes straight to sockets (weft.api.ws.frame_writer),
received by aiohttp's own client over a real socket on 127.0.0.1: every length encoding of
RFC 6455 §5.2, interleaved with aiohttp's own frames, in order."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from weft.api.ws import frame_writer

SIZES = [0, 1, 125, 126, 65535, 65536, 300_000]


async def test_frames_written_directly_arrive_whole_and_in_order() -> None:
    texts = [("é" * n)[: n // 2] + "x" * (n - 2 * (n // 2)) for n in SIZES]  # multi-byte UTF-8 too

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        write = frame_writer(ws, request.transport)
        assert write is not None
        for i, text in enumerate(texts):
            if i % 2:
                await ws.send_str(text)  # aiohttp's own framing, between ours
            else:
                assert write(text.encode()) or (await ws.send_str(text)) is None
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            got = [msg.data async for msg in ws if msg.type == aiohttp.WSMsgType.TEXT]
    finally:
        await runner.cleanup()
    assert got == texts
