"""Raw JetStream floors: pipelined and awaited publish, ordered-consumer replay (no weft code)."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api


class BenchError(RuntimeError):
    pass


@dataclass
class Timed:
    count: int
    seconds: float
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


async def publish_pipelined(
    js: JetStreamContext,
    messages: Iterable[tuple[str, bytes, dict[str, str] | None]],
    *,
    time_limit_s: float,
    in_flight: int | None = None,
) -> Timed:
    """publish_async every message, then publish_async_completed; failed acks are counted. With
    `in_flight`, at most that many await their acks (the oldest is awaited before the next send).

    nats-py 2.16 raises (instead of setting the future's exception) when an ack carries an API
    error, so a rejected message leaves its future pending forever: that surfaces here as the
    time limit, never as a hang."""
    errors = 0
    first_error: list[BaseException] = []

    def on_done(fut: asyncio.Future[api.PubAck]) -> None:
        nonlocal errors
        if fut.cancelled():
            errors += 1
        elif (exc := fut.exception()) is not None:
            errors += 1
            if not first_error:
                first_error.append(exc)

    count = 0
    start = time.perf_counter()
    try:
        # No wait_stall: with one, every publish_async awaits a timed semaphore acquire, yielding to
        # the flusher, which then writes one message per socket send (~10x slower client side).
        async with asyncio.timeout(time_limit_s):
            window: collections.deque[asyncio.Future[api.PubAck]] = collections.deque()
            for subject, payload, headers in messages:
                if in_flight is not None and len(window) >= in_flight:
                    await asyncio.wait([window.popleft()])
                fut = await js.publish_async(subject, payload, headers=headers)
                fut.add_done_callback(on_done)
                if in_flight is not None:
                    window.append(fut)
                count += 1
            await js.publish_async_completed()
    except TimeoutError:
        raise BenchError(
            f"publishing {count} messages took longer than {time_limit_s:.0f}s "
            f"({js.publish_async_pending()} acks pending)"
        ) from None
    elapsed = time.perf_counter() - start
    if errors and errors == count:
        raise BenchError(f"every publish failed: {first_error[0]!r}")
    return Timed(count, elapsed, errors)


async def publish_core(
    nc: NATS,
    js: JetStreamContext,
    stream: str,
    messages: Iterable[tuple[str, bytes, dict[str, str] | None]],
    *,
    expect_last_seq: int,
    time_limit_s: float,
) -> Timed:
    """Bulk load: core NATS publishes (no reply subject, so no acks and no futures), then wait until
    the stream's last sequence reaches `expect_last_seq`. About 3x faster than publish_async from
    Python; a message the stream rejected (an OCC header, say) shows up as a short count."""
    count = 0
    start = time.perf_counter()
    try:
        async with asyncio.timeout(time_limit_s):
            for subject, payload, headers in messages:
                await nc.publish(subject, payload, headers=headers)
                count += 1
                if not count % 2_000:
                    # A PING/PONG: the server has read all of it. Small bursts keep JetStream's
                    # ingest queue from overflowing (it drops core publishes it cannot queue).
                    await nc.flush(timeout=30)
            await nc.flush(timeout=30)
            last, stalled_since = -1, time.perf_counter()
            while True:
                now_last = int((await js.stream_info(stream)).state.last_seq)
                if now_last >= expect_last_seq:
                    break
                if now_last != last:
                    last, stalled_since = now_last, time.perf_counter()
                elif time.perf_counter() - stalled_since > 5.0:
                    raise BenchError(f"stream {stream} stopped at {now_last}, expected {expect_last_seq}")
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise BenchError(f"bulk load of {stream} took longer than {time_limit_s:.0f}s") from None
    return Timed(count, time.perf_counter() - start)


async def publish_awaited(js: JetStreamContext, subject: str, payload: bytes, n: int) -> Timed:
    start = time.perf_counter()
    for _ in range(n):
        await js.publish(subject, payload, timeout=10.0)
    return Timed(n, time.perf_counter() - start)


def _replay_config() -> dict[str, object]:
    return {
        "ordered_consumer": True,
        "config": api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
        "pending_msgs_limit": 1_000_000,
        "pending_bytes_limit": 512 * 1024 * 1024,
    }


async def replay_ordered(
    js: JetStreamContext, stream: str, subject: str, n: int, *, time_limit_s: float
) -> Timed:
    """The first n messages of `stream` through one ordered push consumer and a callback (the
    cheapest way nats-py delivers: no task per message). Touches data and headers."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    count = 0
    nbytes = 0

    async def on_msg(msg: Msg) -> None:
        nonlocal count, nbytes
        nbytes += len(msg.data)
        _ = msg.headers
        count += 1
        if count >= n and not done.done():
            done.set_result(None)

    start = time.perf_counter()
    sub = await js.subscribe(subject, stream=stream, cb=on_msg, **_replay_config())  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(done, time_limit_s)
    except TimeoutError:
        raise BenchError(f"replay read {count}/{n} messages in {time_limit_s:.0f}s") from None
    finally:
        elapsed = time.perf_counter() - start
        await sub.unsubscribe()
    return Timed(count, elapsed)


async def replay_ordered_iter(
    js: JetStreamContext, stream: str, subject: str, n: int, *, time_limit_s: float
) -> Timed:
    """The same through `async for msg in sub.messages`, as weft's `Tail` reads. nats-py's iterator
    creates a task and runs asyncio.wait for every message."""
    start = time.perf_counter()
    sub = await js.subscribe(subject, stream=stream, **_replay_config())  # type: ignore[arg-type]
    count = 0
    nbytes = 0
    try:
        async with asyncio.timeout(time_limit_s):
            async for msg in sub.messages:
                nbytes += len(msg.data)
                _ = msg.headers
                count += 1
                if count >= n:
                    break
    except TimeoutError:
        raise BenchError(f"replay read {count}/{n} messages in {time_limit_s:.0f}s") from None
    finally:
        elapsed = time.perf_counter() - start
        await sub.unsubscribe()
    return Timed(count, elapsed)


async def publish_batched(
    nc: NATS, subjects: list[str], payload: bytes, n: int, *, batch: int = 64, in_flight: int = 4,
    time_limit_s: float,
) -> Timed:
    """n messages as JetStream atomic batches (ADR-50, what weft's group commit sends) of `batch`,
    `in_flight` batches at a time: each batch is its messages published with the batch headers
    and a request on the last (the commit), answered once the whole batch is stored. The stream
    must allow atomic publishes (`fresh_stream(..., atomic=True)`)."""
    errors = 0
    sent = 0
    ids = iter(range(1 << 62))

    async def one(size: int) -> None:
        nonlocal errors
        batch_id = f"b{next(ids):x}"
        for i in range(1, size + 1):
            headers = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i)}
            subject = subjects[i % len(subjects)]
            if i < size:
                await nc.publish(subject, payload, headers=headers)
            else:
                headers["Nats-Batch-Commit"] = "1"
                reply = await nc.request(subject, payload, timeout=10, headers=headers)
                if b'"error"' in reply.data or b'"seq"' not in reply.data:
                    errors += 1

    async def worker() -> None:
        nonlocal sent
        while sent < n:
            size = min(batch, n - sent)
            sent += size
            await one(size)

    start = time.perf_counter()
    async with asyncio.timeout(time_limit_s):
        await asyncio.gather(*(worker() for _ in range(in_flight)))
    return Timed(n, time.perf_counter() - start, errors)


async def fresh_stream(js: JetStreamContext, name: str, subjects: list[str], *, atomic: bool = False) -> None:
    try:
        await js.delete_stream(name)
    except Exception:
        pass
    await js.add_stream(
        api.StreamConfig(
            name=name,
            subjects=subjects,
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=1,
            allow_atomic=atomic or None,
        )
    )
