"""A TCP proxy on 127.0.0.1 that misbehaves on command, for fault tests (lost replies, cuts, stalls).

Put it between a client and its server (`NetProxy(server_port)`, then connect to `proxy.port`) and
tell it what the network should do next:

- `pause(direction)` / `resume(direction)`: hold bytes (in order, bounded) and let them go;
- `blackhole(direction)` / `restore(direction)`: discard bytes from now on, and stop doing so;
- `delay(seconds, direction)`: forward each chunk `seconds` after it arrived;
- `drop_replies_to(request, count)`: drop the answers to the next `count` NATS requests that
  `request` matches (a `PUB`/`HPUB` frame, or a subject prefix): the request reaches the server,
  its reply (a publish ack, a batch commit's answer) never reaches the client, and the protocol
  stream stays well framed;
- `drop_replies(contains, count)`: drop reply frames (`MSG`/`HMSG` without a reply subject) by
  their payload;
- `hold(match)`: keep back the server-to-client frames `match` accepts (a consumer's deliveries,
  say) while everything else flows; `release()` sends them on, in order;
- `cut()`: close every connection now (a client that reconnects comes back through the proxy);
- `seen(pattern, direction)`: await bytes matching `pattern` passing (or being held) — the way a
  test learns that a request was sent without sleeping.

"up" is client to server, "down" server to client. It is an async context manager, and it stops by
itself after `lifetime_s` (a forgotten proxy cannot hang a test run); held bytes beyond
`max_held_bytes` per direction close the connection rather than grow without bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

log = logging.getLogger("tests.netproxy")

Direction = Literal["up", "down"]
Which = Literal["up", "down", "both"]
CHUNK = 64 * 1024


def _dirs(which: Which) -> tuple[Direction, ...]:
    return ("up", "down") if which == "both" else (which,)


@dataclass(frozen=True, slots=True)
class Frame:
    """One NATS protocol operation (`MSG`/`HMSG` down, `PUB`/`HPUB` up, or any other line). `reply`
    is the message's reply subject (None for a reply itself); `payload` excludes the headers."""

    op: bytes
    raw: bytes
    subject: str = ""
    reply: str | None = None
    headers: bytes = b""
    payload: bytes = b""


# op -> (tokens before the reply subject, sizes at the end): `MSG <subject> <sid> [reply] <#bytes>`,
# `HMSG <subject> <sid> [reply] <#hdr> <#total>`, `PUB <subject> [reply] <#bytes>`, `HPUB ... <#hdr> <#total>`
_WITH_PAYLOAD = {b"MSG": (3, 1), b"HMSG": (3, 2), b"PUB": (2, 1), b"HPUB": (2, 2)}


class _NatsFramer:
    """Splits one direction's byte stream into whole protocol operations."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while True:
            end = self._buf.find(b"\r\n")
            if end < 0:
                return frames
            line = bytes(self._buf[:end])
            op = line.split(b" ", 1)[0].upper()
            if op not in _WITH_PAYLOAD:
                frames.append(Frame(op, bytes(self._buf[: end + 2])))
                del self._buf[: end + 2]
                continue
            parts = line.split()
            before, sizes = _WITH_PAYLOAD[op]
            total = int(parts[-1])
            hdr = int(parts[-2]) if sizes == 2 else 0
            reply = parts[before].decode() if len(parts) == before + 1 + sizes else None
            need = end + 2 + total + 2
            if len(self._buf) < need:
                return frames
            body = bytes(self._buf[end + 2 : end + 2 + total])
            frames.append(Frame(op, bytes(self._buf[:need]), parts[1].decode(), reply, body[:hdr], body[hdr:]))
            del self._buf[:need]


@dataclass(slots=True)
class DropRule:
    """Drops `count` reply frames: the answers to requests `request` accepts, or else replies
    `reply` accepts. `dropped` is set once all of them were."""

    count: int
    request: Callable[[Frame], bool] | None = None
    reply: Callable[[Frame], bool] | None = None
    inboxes: set[str] = field(default_factory=set)  # reply subjects of the requests picked
    requests: list[Frame] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    dropped: asyncio.Event = field(default_factory=asyncio.Event)

    def see_request(self, frame: Frame) -> None:
        if self.request is None or frame.reply is None or frame.op not in (b"PUB", b"HPUB"):
            return
        if len(self.requests) < self.count and self.request(frame):
            self.requests.append(frame)
            self.inboxes.add(frame.reply)

    def take(self, frame: Frame) -> bool:
        if len(self.frames) >= self.count or frame.op not in (b"MSG", b"HMSG") or frame.reply is not None:
            return False
        if self.request is not None:
            if frame.subject not in self.inboxes:
                return False
            self.inboxes.discard(frame.subject)
        elif self.reply is None or not self.reply(frame):
            return False
        self.frames.append(frame)
        if len(self.frames) >= self.count:
            self.dropped.set()
        return True

    async def wait(self, timeout: float = 30.0) -> list[Frame]:
        async with asyncio.timeout(timeout):
            await self.dropped.wait()
        return self.frames


class Hold:
    """Server-to-client frames kept back while everything else flows (see `NetProxy.hold`)."""

    def __init__(self, proxy: NetProxy, match: Callable[[Frame], bool]) -> None:
        self.proxy = proxy
        self.match = match
        self.held: list[tuple[_Pipe, bytes]] = []
        self.count = 0
        self.some = asyncio.Event()  # set once a frame was held

    def take(self, pipe: _Pipe, frame: Frame) -> bool:
        if not self.match(frame):
            return False
        self.held.append((pipe, frame.raw))
        self.count += 1
        self.some.set()
        return True

    def release(self) -> None:
        """Send the held frames on (in order) and hold no more."""
        if self in self.proxy._holds:
            self.proxy._holds.remove(self)
        for pipe, raw in self.held:
            pipe.send(raw)
        self.held.clear()


@dataclass(slots=True)
class _Watch:
    pattern: bytes
    direction: Direction
    hit: asyncio.Event = field(default_factory=asyncio.Event)


class _Gate:
    """What the network does to one direction (shared by every connection)."""

    def __init__(self) -> None:
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.blackholed = False
        self.delay_s = 0.0


class _Pipe:
    """One direction of one connection: read, filter, queue, write in order."""

    def __init__(self, proxy: NetProxy, conn: _Conn, direction: Direction, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.conn = conn
        self.direction = direction
        self.reader = reader
        self.writer = writer
        self.queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        self.held = 0
        self.framer = _NatsFramer() if proxy.nats_frames else None
        self._tail = b""  # the last bytes read, so a watched pattern split across reads matches

    async def pump(self) -> None:
        try:
            while data := await self.reader.read(CHUNK):
                self._watch(data)
                if self.framer is not None:
                    data = b"".join(f.raw for f in self.framer.feed(data) if self.proxy._passes(self, f))
                if not self.send(data):
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            self.queue.put_nowait(None)

    def send(self, data: bytes) -> bool:
        """Queue bytes for the server or client, through the direction's gate. False: too much held."""
        gate = self.proxy.gates[self.direction]
        if gate.blackholed or not data:
            return True
        self.held += len(data)
        if self.held > self.proxy.max_held_bytes:
            log.warning("netproxy: more than %d bytes held %s; closing the connection",
                        self.proxy.max_held_bytes, self.direction)
            return False
        self.queue.put_nowait((asyncio.get_running_loop().time() + gate.delay_s, data))
        return True

    async def drain(self) -> None:
        loop = asyncio.get_running_loop()
        gate = self.proxy.gates[self.direction]
        try:
            while (item := await self.queue.get()) is not None:
                due, data = item
                await gate.flowing.wait()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)  # `delay`: the network is slow, not a test's sync
                await gate.flowing.wait()
                if gate.blackholed:
                    self.held -= len(data)
                    continue
                self.writer.write(data)
                self.held -= len(data)
                await self.writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.conn.close()

    def _watch(self, data: bytes) -> None:
        window = self._tail + data
        for w in self.proxy._watches:
            if w.direction == self.direction and not w.hit.is_set() and w.pattern in window:
                w.hit.set()
        self._tail = window[-256:]


class _Conn:
    def __init__(self, proxy: NetProxy, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 server: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.writers = (client[1], server[1])
        self.pipes = (_Pipe(proxy, self, "up", client[0], server[1]), _Pipe(proxy, self, "down", server[0], client[1]))
        self.tasks = [asyncio.create_task(coro, name=f"netproxy {p.direction}")
                      for p in self.pipes for coro in (p.pump(), p.drain())]
        self.closed = asyncio.Event()

    def close(self) -> None:
        for w in self.writers:
            w.close()
        self.closed.set()

    async def stop(self) -> None:
        self.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class NetProxy:
    """Listens on 127.0.0.1:0 and forwards each connection to `upstream_host:upstream_port`."""

    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1", nats_frames: bool = True,
                 lifetime_s: float = 120.0, max_held_bytes: int = 64 * 1024 * 1024) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.nats_frames = nats_frames  # parse server-to-client NATS frames (needed by drop_replies)
        self.lifetime_s = lifetime_s
        self.max_held_bytes = max_held_bytes
        self.gates: dict[Direction, _Gate] = {"up": _Gate(), "down": _Gate()}
        self.connections = 0  # accepted so far
        self._conns: set[_Conn] = set()
        self._rules: list[DropRule] = []
        self._holds: list[Hold] = []
        self._watches: list[_Watch] = []
        self._server: asyncio.Server | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._closing: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> NetProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(self.lifetime_s, self._expire)
        return self

    async def __aenter__(self) -> NetProxy:
        return await self.start()

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # --- what the network does next ---------------------------------------------------------------

    def pause(self, which: Which = "both") -> None:
        for d in _dirs(which):
            self.gates[d].flowing.clear()

    def resume(self, which: Which = "both") -> None:
        for d in _dirs(which):
            self.gates[d].flowing.set()

    def blackhole(self, which: Which = "both") -> None:
        for d in _dirs(which):
            self.gates[d].blackholed = True

    def restore(self, which: Which = "both") -> None:
        """Undo `blackhole`, `delay` and `pause` for `which`."""
        for d in _dirs(which):
            gate = self.gates[d]
            gate.blackholed = False
            gate.delay_s = 0.0
            gate.flowing.set()

    def delay(self, seconds: float, which: Which = "both") -> None:
        for d in _dirs(which):
            self.gates[d].delay_s = seconds

    def drop_replies_to(self, request: str | Callable[[Frame], bool], *, count: int = 1) -> DropRule:
        """Let the next `count` requests `request` accepts (a subject prefix, or a predicate on the
        `PUB`/`HPUB` frame) reach the server, and drop their answers. Await `rule.wait()`."""
        if not self.nats_frames:
            raise RuntimeError("drop_replies_to needs nats_frames=True")
        pick = (lambda f: f.subject.startswith(request)) if isinstance(request, str) else request
        rule = DropRule(count, request=pick)
        self._rules.append(rule)
        return rule

    def drop_replies(self, contains: bytes = b"", *, count: int = 1,
                     match: Callable[[Frame], bool] | None = None) -> DropRule:
        """Drop the next `count` reply frames (server to client) whose payload contains `contains`
        (or that `match` accepts). Await `rule.wait()` to know they were dropped."""
        if not self.nats_frames:
            raise RuntimeError("drop_replies needs nats_frames=True")
        rule = DropRule(count, reply=match or (lambda f: contains in f.payload))
        self._rules.append(rule)
        return rule

    def hold(self, match: Callable[[Frame], bool]) -> Hold:
        """Keep back server-to-client frames `match` accepts until `hold.release()`."""
        if not self.nats_frames:
            raise RuntimeError("hold needs nats_frames=True")
        h = Hold(self, match)
        self._holds.append(h)
        return h

    async def seen(self, pattern: bytes, which: Direction = "up", timeout: float = 30.0) -> None:
        """Return once bytes containing `pattern` arrived at the proxy in that direction (from now
        on; held or discarded bytes count: they reached the network)."""
        w = _Watch(pattern, which)
        self._watches.append(w)
        try:
            async with asyncio.timeout(timeout):
                await w.hit.wait()
        finally:
            self._watches.remove(w)

    async def cut(self) -> None:
        """Close every open connection (new ones are still accepted)."""
        conns, self._conns = list(self._conns), set()
        await asyncio.gather(*(c.stop() for c in conns))

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
        self.restore()
        for h in list(self._holds):
            h.release()
        await self.cut()

    # --- internals ------------------------------------------------------------------------------

    def _passes(self, pipe: _Pipe, frame: Frame) -> bool:
        """Whether a whole frame goes on now (False: dropped, or kept by a hold)."""
        if pipe.direction == "up":
            for rule in self._rules:
                rule.see_request(frame)
            return True
        if any(rule.take(frame) for rule in self._rules):
            return False
        return not any(h.take(pipe, frame) for h in self._holds)

    def _expire(self) -> None:
        log.warning("netproxy: lifetime of %.0f s over; closing", self.lifetime_s)
        self._closing = asyncio.create_task(self.close())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 10)
        except (OSError, TimeoutError):
            writer.close()
            return
        self.connections += 1
        conn = _Conn(self, (reader, writer), upstream)
        self._conns.add(conn)
        await conn.closed.wait()
        self._conns.discard(conn)
        await conn.stop()
