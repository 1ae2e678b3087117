"""`python -m bench.wsclients URL NATS_URL PROJECT N EXPECTED OUT`: N WebSocket clients subscribed
to the `work` topic of PROJECT; each notes the wall-clock time it received each `work:submitted`
event. A plain NATS subscriber on the project's work events notes when each event's publish reached
NATS: the reference the WebSocket latency is taken against. Prints `ready` once every client is
subscribed, writes `{"nats": {workId: t}, "clients": [[[workId, t], ...], ...]}` to OUT once every
client saw EXPECTED such events (or after 120 s), then exits.

A process of its own so that the clients' CPU is not the measuring process's; the receive path is
kept lean (a bare protocol: a substring search per chunk, no frame parsing, no JSON) so it measures the server's fan-out, not ours."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import nats
import orjson
from nats.aio.msg import Msg

MARK = b'"event":"work:submitted"'
WORK_ID = b'"workId":"'


def masked_text_frame(payload: bytes) -> bytes:
    """A client-to-server text frame (clients must mask; RFC 6455 §5.3), payloads < 126 bytes."""
    key = os.urandom(4)
    return bytes((0x81, 0x80 | len(payload))) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class Client(asyncio.Protocol):
    """A bare WebSocket client: the upgrade by hand, then every received chunk is only scanned for
    the event marker (no frame parsing, no JSON), so 500 of them cost little CPU. A chunk may hold
    several frames; a marker cut across two chunks is caught by keeping the tail of the last one."""

    def __init__(self, host: str, path: str, subscribe: bytes, expected: int, ready: Callable[[], None]) -> None:
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                        "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        self.subscribe = subscribe
        self.expected = expected
        self.ready = ready
        self.upgraded = False
        self.acked = False
        self.tail = b""
        self.seen: list[tuple[str, float]] = []
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if not self.upgraded:
            head, _sep, data = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head[:100]
            self.upgraded = True
            self.transport.write(self.subscribe)
            if not data:
                return
        if not self.acked and b'"type":"ack"' in data:
            self.acked = True
            self.ready()
        chunk = self.tail + data
        i = chunk.find(MARK)
        while i >= 0:
            j = chunk.find(WORK_ID, i)
            end = chunk.find(b'"', j + len(WORK_ID)) if j >= 0 else -1
            if end < 0:
                break  # the rest comes in the next chunk
            self.seen.append((chunk[j + len(WORK_ID):end].decode(), now))
            i = chunk.find(MARK, end)
        self.tail = chunk[-200:] if i < 0 else chunk[i:]
        if len(self.seen) >= self.expected and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def main(url: str, nats_url: str, project: str, n: int, expected: int, out: str) -> None:
    published: dict[str, float] = {}

    async def on_event(msg: Msg) -> None:
        if msg.subject.startswith(prefix):
            published.setdefault(msg.subject.rsplit(".", 1)[1], time.time())

    prefix = f"weft.{project}.ev.work."
    nc = await nats.connect(nats_url)
    await nc.subscribe(prefix + "*", cb=on_event)
    ready = asyncio.Event()
    acked = [0]

    def one_ready() -> None:
        acked[0] += 1
        if acked[0] == n:
            ready.set()

    parts = urlsplit(url)
    subscribe = masked_text_frame(orjson.dumps({"type": "subscribe", "topic": "work", "projectId": project}))
    loop = asyncio.get_running_loop()
    clients = []
    for _ in range(n):
        _, c = await loop.create_connection(
            lambda: Client(parts.netloc, parts.path, subscribe, expected, one_ready), parts.hostname or "127.0.0.1",
            parts.port or 80)
        clients.append(c)
    await asyncio.wait_for(ready.wait(), 60)
    print("ready", flush=True)
    await asyncio.wait([c.done for c in clients], timeout=120)
    for c in clients:
        c.transport.close()
    results = [c.seen for c in clients]
    await nc.close()
    await asyncio.to_thread(Path(out).write_bytes, orjson.dumps({"nats": published, "clients": results}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]))
