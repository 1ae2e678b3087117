"""Group commit: under load, appends to one stream go out as JetStream atomic batches (ADR-50).

With `sync_interval: always` the stream fsyncs every message it stores, and nats-server answers a
burst of publishes only after it has stored all of them; a writer that also spends CPU per command
then alternates with the server instead of overlapping it (REST submit ran at about half the raw
publish rate). An atomic batch is stored with its own commit, so many appends share the cost.

Below `after` appends in flight, each append is its own publish (lowest latency). Above it,
appends wait for whichever comes first: a free single slot (the oldest waiter takes it) or enough
peers for a batch of at least `min_batch` (a commit costs ~4 ms against ~0.25 ms for one fsync'd
publish, so smaller batches cost more than they save), sent as one batch of up to `max_batch`.
Every message keeps its own `Nats-Msg-Id` and `Nats-Expected-Last-Subject-Sequence`, and a batch
is all or nothing: when the server refuses one (a stale expectation, a duplicate, a lost commit
reply), each of its appends is published alone, where the usual conflict and duplicate handling
applies; when the batch may have been stored (no answer), the append is told so (`Alone.maybe_stored`)
so that finding its own event there is not mistaken for someone else's earlier request.
nats-py has no atomic-batch API, so the three batch headers are set here; the stream must
have `allow_atomic` (nats-server 2.12+).

A single slot, once handed to a waiter, is that waiter's to give back, also when its task is
cancelled before it resumes (a scheduler stopping, a request abandoned); a waiter cancelled while
still queued leaves the queue, so no batch publishes it after its caller gave up.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass

import orjson
from nats.aio.client import Client as NATS

from weft.metrics import NOOP, Metrics
from weft.stamps import new_id

log = logging.getLogger("weft.store.groupcommit")

BATCH_ID = "Nats-Batch-Id"
BATCH_SEQUENCE = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"


class BatchRejected(Exception):
    """The server refused the batch as a whole; nothing of it was stored."""


@dataclass(frozen=True, slots=True)
class Alone:
    """Publish the append alone; its single slot is counted in `inflight`. `maybe_stored`: it was
    in a batch whose outcome is unknown (no commit reply), so it may be in the stream already."""

    maybe_stored: bool = False


ALONE = Alone()
ALONE_AFTER_LOST_BATCH = Alone(maybe_stored=True)


@dataclass(slots=True)
class _Pending:
    subject: str
    payload: bytes
    headers: dict[str, str]
    done: asyncio.Future[int | Alone]


class GroupCommit:
    """The batcher of one stream. The store counts its single publishes in `inflight`."""

    def __init__(
        self, nc: NATS, stream: str, *, after: int, min_batch: int = 16, max_batch: int = 256, timeout_s: float = 5.0,
        metrics: Metrics = NOOP,
    ) -> None:
        self.metrics = metrics
        self.nc = nc
        self.stream = stream
        self.after = after
        self.min_batch = min_batch
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self.inflight = 0
        self.batches = 0  # committed, for tests and the bench
        self.batched = 0
        self._queue: list[_Pending] = []
        self._task: asyncio.Task[None] | None = None
        # Batch ids only need to differ among the stream's batches in flight, but the stream keeps
        # them in every batched message's headers: a random prefix per batcher and a counter.
        self._id_prefix = new_id()[:8]
        self._ids = itertools.count(1)

    def crowded(self) -> bool:
        return self.inflight >= self.after

    async def append(self, subject: str, payload: bytes, headers: dict[str, str]) -> int | Alone:
        """Wait for a batch or a free single slot. Returns the stream sequence the batch stored the
        append at, or `Alone`: publish it alone, already counted in `inflight` (a slot came free
        first, or its batch was not committed)."""
        done: asyncio.Future[int | Alone] = asyncio.get_running_loop().create_future()
        pending = _Pending(subject, payload, headers, done)
        self._queue.append(pending)
        self.kick()
        try:
            return await done
        except asyncio.CancelledError:
            if done.done() and not done.cancelled() and isinstance(done.result(), Alone):
                # Handed a slot, cancelled before it could use it: nobody else would give it back.
                self.inflight -= 1
                self.kick()
            elif pending in self._queue:
                self._queue.remove(pending)  # never sent: no batch may publish it for a gone caller
            raise

    def kick(self) -> None:
        """After an append queued or a single publish finished: start a batch once enough wait,
        and hand free single slots to the oldest waiting appends."""
        if self._task is None and len(self._queue) >= self.min_batch:
            self._task = asyncio.create_task(self._flush(), name=f"group-commit {self.stream}")
            return
        while self._queue and self.inflight < self.after:
            self._release(self._queue.pop(0))

    def _release(self, p: _Pending, alone: Alone = ALONE) -> None:
        if not p.done.done():
            self.inflight += 1  # the caller publishes it alone and gives the slot back
            p.done.set_result(alone)

    async def _flush(self) -> None:
        batch: list[_Pending] = []
        try:
            while len(self._queue) >= self.min_batch:
                batch = self._queue[: self.max_batch]
                del self._queue[: len(batch)]
                try:
                    last, count = await self._send(batch)
                    if count != len(batch):
                        raise RuntimeError(f"commit reported {count} of {len(batch)} messages")
                except Exception as err:
                    # Stored or not, one by one is safe: OCC read-back and Msg-Id dedupe recognise
                    # an append that did land (a lost commit reply). Only a refusal says it did not.
                    log.info("batch of %d not committed, appending one by one: %s", len(batch), err,
                             extra={"stream": self.stream})
                    alone = ALONE if isinstance(err, BatchRejected) else ALONE_AFTER_LOST_BATCH
                    self.metrics.batch(self.stream, len(batch), committed=False)
                    for p in batch:
                        self._release(p, alone)
                    batch = []
                    continue
                self.batches += 1
                self.batched += len(batch)
                self.metrics.batch(self.stream, len(batch), committed=True)
                # An atomic batch is stored contiguously, ending at `last`.
                for i, p in enumerate(batch):
                    if not p.done.done():
                        p.done.set_result(last - len(batch) + 1 + i)
                batch = []
        except asyncio.CancelledError:
            for p in batch:  # shutting down mid-commit: nobody waits forever
                self._release(p, ALONE_AFTER_LOST_BATCH)
            for p in self._queue:
                self._release(p)
            self._queue.clear()
            raise
        finally:
            self._task = None
        self.kick()

    async def _send(self, batch: list[_Pending]) -> tuple[int, int]:
        batch_id = f"{self._id_prefix}{next(self._ids):x}"
        n = len(batch)
        for i, p in enumerate(batch, 1):
            headers = {**p.headers, BATCH_ID: batch_id, BATCH_SEQUENCE: str(i)}
            if i < n:
                await self.nc.publish(p.subject, p.payload, headers=headers)
                continue
            headers[BATCH_COMMIT] = "1"
            reply = await self.nc.request(p.subject, p.payload, timeout=self.timeout_s, headers=headers)
        body = orjson.loads(reply.data or b"{}")
        if not isinstance(body, dict) or "error" in body or "seq" not in body:
            raise BatchRejected(str(body.get("error") if isinstance(body, dict) else body))
        return int(body["seq"]), int(body.get("count", n))

