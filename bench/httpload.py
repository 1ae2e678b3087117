"""A lean HTTP/1.1 keep-alive load generator for the REST row: prebuilt request bytes, one asyncio
Protocol per connection, responses framed by Content-Length.

The bench runs the load generator, `weft serve` and nats-server on one small machine. aiohttp's
client spent about a third of a core on 2,500 req/s, CPU taken from the process being measured;
this one spends a fraction of that. It speaks only what the REST row needs: a fixed request, and
responses with a Content-Length (aiohttp's `web.Response` always sends one).
"""

from __future__ import annotations

import asyncio
import base64
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson


class HttpLoadError(RuntimeError):
    pass


@dataclass
class Outcome:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    first_error: str = ""
    done: int = 0


def build_request(method: str, host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Connection(asyncio.Protocol):
    """Sends the request, waits for the whole response, repeats; one request in flight."""

    def __init__(self, request: bytes, on_response: Callable[[int, bytes], None]) -> None:
        self.request = request
        self.on_response = on_response
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.waiter: asyncio.Future[None] | None = None
        self.closed: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = exc or HttpLoadError("server closed the connection")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.closed)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end]
        status = int(head[9:12])
        length = _content_length(head)
        if length is None:
            self._fail(HttpLoadError(f"response without Content-Length: {head[:200]!r}"))
            return
        total = end + 4 + length
        if len(self.buf) < total:
            return
        body = self.buf[end + 4 : total]
        self.buf = self.buf[total:]
        self.on_response(status, body)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, err: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(err)
        if self.transport is not None:
            self.transport.close()

    async def roundtrip(self) -> None:
        if self.closed is not None:
            raise self.closed
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(self.request)
        await self.waiter


def _content_length(head: bytes) -> int | None:
    lower = head.lower()
    i = lower.find(b"\r\ncontent-length:")
    if i < 0:
        return None
    j = lower.find(b"\r\n", i + 2)
    return int(lower[i + 17 : j if j >= 0 else len(lower)].strip())


async def run(
    host: str,
    port: int,
    request: bytes,
    n: int,
    concurrency: int,
    *,
    time_limit_s: float,
    request_timeout_s: float = 30.0,
    warmup: int = 0,
) -> tuple[Outcome, float, bool]:
    """`n` requests over `concurrency` keep-alive connections. Returns (outcome, seconds, time_bounded):
    workers stop taking new requests after `time_limit_s`; the rate is over what finished."""
    loop = asyncio.get_running_loop()
    out = Outcome()

    def record(status: int, body: bytes) -> None:
        out.statuses[status] = out.statuses.get(status, 0) + 1
        if status >= 300 and not out.first_error:
            out.first_error = f"HTTP {status}: {body[:200].decode(errors='replace')}"

    conns: list[_Connection] = []
    try:
        for _ in range(concurrency):
            _, proto = await loop.create_connection(lambda: _Connection(request, record), host, port)
            conns.append(proto)
        for _ in range(warmup):  # project attach, stream creation: not measured
            await asyncio.wait_for(conns[0].roundtrip(), request_timeout_s)
        if out.first_error:
            raise HttpLoadError(f"warm-up failed: {out.first_error}")
        out.statuses.clear()

        remaining = n
        time_bounded = False
        t0 = time.perf_counter()
        deadline = t0 + time_limit_s

        async def worker(conn: _Connection) -> None:
            nonlocal remaining, time_bounded
            while remaining > 0:
                if time.perf_counter() > deadline:
                    time_bounded = True
                    return
                remaining -= 1
                t = time.perf_counter()
                try:
                    await asyncio.wait_for(conn.roundtrip(), request_timeout_s)
                except (OSError, HttpLoadError, TimeoutError) as err:
                    out.statuses[0] = out.statuses.get(0, 0) + 1
                    out.first_error = out.first_error or repr(err)
                    return  # this connection is unusable; the others carry on
                out.latencies_ms.append((time.perf_counter() - t) * 1000)
                out.done += 1

        await asyncio.gather(*(worker(c) for c in conns))
        return out, time.perf_counter() - t0, time_bounded
    finally:
        for c in conns:
            if c.transport is not None:
                c.transport.close()


async def run_in_process(
    host: str, port: int, request: bytes, n: int, concurrency: int, *, time_limit_s: float, warmup: int = 0,
) -> tuple[Outcome, float, bool]:
    """`run` in a process of its own (`python -m bench.httpload`), so the load generator takes no
    time from the event loop of the process that measures (nor shares its GIL)."""
    job = {"host": host, "port": port, "request": base64.b64encode(request).decode(), "n": n,
           "concurrency": concurrency, "time_limit_s": time_limit_s, "warmup": warmup}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.httpload", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out_b, err_b = await asyncio.wait_for(proc.communicate(orjson.dumps(job)), time_limit_s + 120)
    if proc.returncode != 0:
        raise HttpLoadError(f"load generator exited with {proc.returncode}: {err_b.decode(errors='replace')[-300:]}")
    res = orjson.loads(out_b)
    outcome = Outcome(res["latencies_ms"], {int(k): v for k, v in res["statuses"].items()}, res["first_error"],
                      res["done"])
    return outcome, res["seconds"], res["time_bounded"]


def main() -> int:
    job = orjson.loads(sys.stdin.buffer.read())
    try:
        out, seconds, bounded = asyncio.run(run(
            job["host"], job["port"], base64.b64decode(job["request"]), job["n"], job["concurrency"],
            time_limit_s=job["time_limit_s"], warmup=job["warmup"],
        ))
    except (OSError, HttpLoadError) as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(orjson.dumps({
        "latencies_ms": out.latencies_ms, "statuses": {str(k): v for k, v in out.statuses.items()},
        "first_error": out.first_error, "done": out.done, "seconds": seconds, "time_bounded": bounded,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
