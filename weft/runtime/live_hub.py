"""The live hub: fans the read model's folded events out to WebSocket clients.

One listener per project view (`ProjectView.listeners`, as the scheduler listens), never a NATS
consumer per client. Each event is translated once per project (`weft.core.live_events`), encoded
once, and offered to every matching subscription; each client has a bounded send queue drained by
its own writer task, so a slow client never blocks the fold or the others: when its queue is full it
is closed (1008, "slow consumer: N messages queued").

A subscription with `fromSeq` first replays the project's history from that sequence
(`EventStore.read_range`) while live events are buffered; then the buffered events above the last
replayed sequence follow, so the client sees every event once, in order. The hub knows nothing of
HTTP: a client is a `send(text)` and a `close(code, reason)`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from projections import ProjectState, apply
from projections.events import Event
from weft.aio import TaskSet, cancel_and_wait
from weft.core.live_events import Translator, matches, stats_message
from weft.stamps import utc_now
from weft.store.readmodel import ProjectView, ReadModel

log = logging.getLogger("weft.runtime.live_hub")

SLOW_CONSUMER_CODE = 1008  # policy violation
GOING_AWAY_CODE = 1001
INTERNAL_ERROR_CODE = 1011
# A replay whose stream read fails (a NATS node lost mid-read) is resumed where it stopped, after
# these pauses; then the client is closed, so it reconnects with its own fromSeq: never a gap.
REPLAY_RETRY_S = (0.2, 0.5, 1.0, 2.0)

Send = Callable[[str], Awaitable[None]]
Close = Callable[[int, str], Awaitable[None]]
# Writes one encoded text message now if the connection can take it (False: it cannot, use `Send`).
WriteNow = Callable[[bytes], bool]


@dataclass(slots=True)
class Subscription:
    topic: str
    project: str
    filter: dict[str, Any] | None
    replaying: bool = False
    cutoff: int = 0  # events at or below this seq were (or will be) sent by the replay
    buffer: list[tuple[int, str]] = field(default_factory=list)  # live events held during the replay
    pending_from: int | None = None  # waiting for the project to exist: replay from here on attach
    task: asyncio.Task[None] | None = None


class Client:
    _ids = itertools.count(1)

    def __init__(self, hub: LiveHub, send: Send, close: Close, write_now: WriteNow | None = None) -> None:
        self.id = next(self._ids)
        self.hub = hub
        self._send = send
        self._close = close
        self._write_now = write_now
        self._sending = False
        self.queue: asyncio.Queue[str] = asyncio.Queue(hub.queue_max)
        self.subs: dict[str, Subscription] = {}
        self.closed = False
        self.writer = asyncio.create_task(self._write(), name=f"ws-writer:{self.id}")

    def offer(self, text: str) -> bool:
        """Queue a message without waiting; a full queue closes the client as a slow consumer."""
        if self.closed:
            return False
        try:
            self.queue.put_nowait(text)
            return True
        except asyncio.QueueFull:
            self.hub.drop(self, f"slow consumer: {self.queue.qsize()} messages queued")
            return False

    def offer_encoded(self, data: bytes) -> bool:
        """`offer`, but written at once when nothing is queued or being sent before it (order is
        kept) and the connection takes it: no task switch per client and event, which is what
        fanning one event out to hundreds of clients costs."""
        if self._write_now is not None and not self.closed and not self._sending and self.queue.empty():
            try:
                if self._write_now(data):
                    return True
            except Exception as err:  # the connection went away: the handler's loop ends it
                log.debug("websocket write failed: %s", err)
                self.closed = True
                return False
        return self.offer(data.decode())

    def send_json(self, body: dict[str, Any]) -> bool:
        return self.offer(orjson.dumps(body).decode())

    async def put(self, text: str) -> None:
        """Queue a message, waiting for room (replays apply backpressure instead of dropping)."""
        if not self.closed:
            await self.queue.put(text)

    async def _write(self) -> None:
        try:
            while True:
                text = await self.queue.get()
                self._sending = True
                await self._send(text)
                self._sending = False
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the connection went away: the handler's loop ends it
            log.debug("websocket send failed: %s", err)
            self.closed = True

    async def close(self, code: int, reason: str) -> None:
        self.closed = True
        await cancel_and_wait(self.writer)
        for sub in self.subs.values():
            await cancel_and_wait(sub.task)
        try:
            await self._close(code, reason)
        except Exception as err:
            log.debug("websocket close failed: %s", err)


class LiveHub:
    def __init__(
        self,
        readmodel: ReadModel,
        *,
        queue_max: int = 1000,
        replay_buffer_max: int = 100_000,
        stats_interval_s: float = 30.0,
    ) -> None:
        self.readmodel = readmodel
        self.queue_max = queue_max
        self.replay_buffer_max = replay_buffer_max
        self.stats_interval_s = stats_interval_s
        self.clients: set[Client] = set()
        self.dropped = 0  # clients closed as slow consumers
        self._views: dict[str, tuple[ProjectView, Callable[[Event, ProjectState], None]]] = {}
        self._translators: dict[str, Translator] = {}  # projects with subscribers
        self._tasks = TaskSet()
        self._stats_task: asyncio.Task[None] | None = None
        self._started = False

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._started = True
        self.readmodel.on_attach.append(self._on_attach)
        for view in list(self.readmodel.views.values()):
            self._listen(view)
        if self.stats_interval_s > 0:
            self._stats_task = asyncio.create_task(self._stats_loop(), name="ws-stats")

    async def stop(self, code: int = GOING_AWAY_CODE, reason: str = "server shutting down") -> None:
        """Close every client (1001) and stop listening."""
        await self.close_all(code, reason)
        await cancel_and_wait(self._stats_task)
        if self._on_attach in self.readmodel.on_attach:
            self.readmodel.on_attach.remove(self._on_attach)
        for view, listener in self._views.values():
            if listener in view.listeners:
                view.listeners.remove(listener)
        self._views.clear()
        await self._tasks.wait()

    async def close_all(self, code: int = GOING_AWAY_CODE, reason: str = "server shutting down") -> None:
        clients = list(self.clients)
        self.clients.clear()
        if clients:
            await asyncio.gather(*(c.close(code, reason) for c in clients), return_exceptions=True)

    # --- counts ---------------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        return len(self.clients)

    @property
    def subscriptions(self) -> int:
        return sum(len(c.subs) for c in self.clients)

    def health(self) -> dict[str, Any]:
        return {"connections": self.connections, "status": "enabled", "subscriptions": self.subscriptions}

    # --- clients --------------------------------------------------------------------------------

    def connect(self, send: Send, close: Close, write_now: WriteNow | None = None) -> Client:
        client = Client(self, send, close, write_now)
        self.clients.add(client)
        return client

    async def disconnect(self, client: Client) -> None:
        self.clients.discard(client)
        projects = {s.project for s in client.subs.values()}
        client.closed = True
        await cancel_and_wait(client.writer)
        for sub in list(client.subs.values()):
            await cancel_and_wait(sub.task)
        client.subs.clear()
        for p in projects:
            self._forget_if_unused(p)

    def drop(self, client: Client, reason: str, code: int = SLOW_CONSUMER_CODE) -> None:
        """Close a client that cannot keep up (or be served), without waiting for it."""
        if client.closed:
            return
        client.closed = True
        self.dropped += code == SLOW_CONSUMER_CODE
        self.clients.discard(client)
        log.warning("websocket client dropped: %s", reason, extra={"client": client.id})
        self._tasks.spawn(client.close(code, reason))

    def subscribe(self, client: Client, topic: str, project: str, filter_: dict[str, Any] | None,
                  from_seq: int | None) -> None:
        old = client.subs.pop(topic, None)
        if old is not None:
            if old.task is not None:
                old.task.cancel()
            if old.project != project:
                self._forget_if_unused(old.project)
        sub = Subscription(topic, project, filter_)
        client.subs[topic] = sub
        if topic == "stats":
            return
        view = self.readmodel.views.get(project)
        if view is not None:
            self._ensure_translator(project, view)
            if from_seq is not None:
                self._start_replay(client, sub, from_seq)
        else:
            sub.pending_from = from_seq or 1  # every event of a project yet to come is new to the client

    def unsubscribe(self, client: Client, topic: str) -> bool:
        sub = client.subs.pop(topic, None)
        if sub is None:
            return False
        if sub.task is not None:
            sub.task.cancel()
        self._forget_if_unused(sub.project)
        return True

    # --- the read model side --------------------------------------------------------------------

    def _listen(self, view: ProjectView) -> None:
        if view.project in self._views:
            return
        project = view.project

        def listener(ev: Event, state: ProjectState) -> None:
            self._on_event(project, ev, state)

        view.listeners.append(listener)
        self._views[project] = (view, listener)

    def _on_attach(self, view: ProjectView) -> None:
        self._listen(view)
        # Subscriptions made before the project existed: what the view folded before this hook ran
        # is replayed from the stream, then live events follow (the same gapless hand-over).
        waiting = [(c, s) for c in self.clients for s in c.subs.values()
                   if s.project == view.project and s.pending_from is not None]
        if waiting:
            self._ensure_translator(view.project, view)
        for client, sub in waiting:
            start, sub.pending_from = sub.pending_from or 1, None
            self._start_replay(client, sub, start)

    def _ensure_translator(self, project: str, view: ProjectView) -> Translator:
        tr = self._translators.get(project)
        if tr is None:
            tr = Translator(project)
            tr.seed(view.state)
            self._translators[project] = tr
        return tr

    def _forget_if_unused(self, project: str) -> None:
        if not any(s.project == project for c in self.clients for s in c.subs.values()):
            self._translators.pop(project, None)

    def _on_event(self, project: str, ev: Event, state: ProjectState) -> None:
        tr = self._translators.get(project)
        if tr is None:
            return  # nobody listens to this project: no translation at all
        live = tr.translate(ev, state)
        if not live:
            return
        encoded = [(le, orjson.dumps(le.message())) for le in live]
        for client in list(self.clients):
            for sub in list(client.subs.values()):
                if sub.project != project or client.closed:
                    continue
                for le, data in encoded:
                    if le.topic != sub.topic or not matches(sub.filter, le.facets):
                        continue
                    if sub.replaying or sub.pending_from is not None:
                        sub.buffer.append((le.seq, data.decode()))
                        if len(sub.buffer) > self.replay_buffer_max:
                            self.drop(client, f"slow consumer: {len(sub.buffer)} messages queued during replay")
                    elif le.seq > sub.cutoff:
                        client.offer_encoded(data)

    # --- replay -----------------------------------------------------------------------------------

    def _start_replay(self, client: Client, sub: Subscription, from_seq: int) -> None:
        sub.replaying = True  # from now on live events are buffered: none is missed
        sub.task = asyncio.create_task(self._replay(client, sub, from_seq), name=f"ws-replay:{client.id}")

    async def _replay(self, client: Client, sub: Subscription, from_seq: int) -> None:
        project = sub.project
        last = from_seq - 1  # every matching event up to here has been sent
        for pause in (*REPLAY_RETRY_S, None):
            try:
                end = await self.readmodel.store.last_seq(project)
                if end > last and project in self.readmodel.views:
                    # Each old event is translated against the state right after it, as it was live
                    # (an agent summary shows the agent as it was then, not as it is now).
                    state = await self.readmodel.state_before(project, last + 1)
                    tr = Translator(project)
                    tr.seed(state)
                    async for ev in self.readmodel.store.read_range(project, last + 1, end):
                        apply(state, ev)
                        for le in tr.translate(ev, state):
                            if le.topic == sub.topic and matches(sub.filter, le.facets):
                                await client.put(orjson.dumps(le.message()).decode())
                        if client.closed or client.subs.get(sub.topic) is not sub:
                            return
                        last = ev.seq
                    last = end
                break
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if pause is None:
                    self.drop(client, f"replay of {project} failed from seq {last + 1}: {err}"[:120],
                              INTERNAL_ERROR_CODE)
                    return
                log.warning("websocket replay failed at seq %s (%s); resuming in %.1f s", last + 1, err, pause,
                            extra={"project": project})
                await asyncio.sleep(pause)  # a bounded back-off before reading again, not synchronisation
        # Hand over to live, synchronously (no event can slip in between): buffered events above the
        # last replayed sequence, then live ones as they come.
        sub.cutoff = last
        held, sub.buffer = sub.buffer, []
        sub.replaying = False
        for seq, text in held:
            if seq > last and not client.offer(text):
                return

    def _stats_text(self, project: str) -> str:
        view = self.readmodel.views.get(project)
        return orjson.dumps(stats_message(project, view.state if view else None, self.connections,
                                          self.subscriptions, utc_now())).decode()

    def send_stats(self) -> int:
        """One `stats` message to every `stats` subscriber (of its project); how many were sent."""
        sent = 0
        cache: dict[str, str] = {}
        for client in list(self.clients):
            sub = client.subs.get("stats")
            if sub is None:
                continue
            text = cache.get(sub.project)
            if text is None:
                text = cache[sub.project] = self._stats_text(sub.project)
            sent += client.offer(text)
        return sent

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.stats_interval_s)
            try:
                self.send_stats()
            except Exception:
                log.exception("websocket stats failed")

