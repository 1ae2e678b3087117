"""JetStream persistence: one stream per project, OCC + dedupe appends, ordered tails.

Everything weft knows is in these streams. Appends carry `Nats-Msg-Id` (the event id: the server
drops a repeat inside its duplicate window) and `Nats-Expected-Last-Subject-Sequence` (the entity's
last sequence as the writer saw it: a stale writer is rejected, never applied). Under load, appends
share JetStream atomic batches with the same checks (`weft.store.groupcommit`).

An append resolves its own uncertainty before it answers: a publish without a reply is sent again
with the same Msg-Id and expectation (both make a repeat harmless), a bounded number of times, and
finding the event already stored after such an attempt is told apart from an earlier request's
event with the same id by its payload (every request encodes its own ids and timestamp). Only when
no attempt got an answer does it give up with `AppendOutcomeUnknown`. Streams are declared
through `weft.store.resources`; snapshots live in `weft.store.snapshots`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from projections.events import Event, decode, stream_name
from weft.metrics import NOOP, Metrics, monotonic
from weft.stamps import stamp
from weft.store.groupcommit import ALONE, Alone, GroupCommit
from weft.store.resources import JetStreamResources, resources_of

log = logging.getLogger("weft.store.eventstore")

WRONG_LAST_SEQUENCE = 10071
# Publishes of one append before its outcome is declared unknown: the first and two repeats.
PUBLISH_ATTEMPTS = 3
# Attempts that failed before anything was sent (or was taken by a stream): they stored nothing.
NOT_SENT = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.NoStreamResponseError,
)

# A message of the stream that did not decode: (seq, subject, the decoding error).
Skip = Callable[[int, str, Exception], None]

ORDERED_HEARTBEAT_S = 1.0


class ConcurrencyConflict(Exception):
    """Another writer appended to the entity since our projection last saw it."""

    def __init__(self, subject: str, expected: int) -> None:
        super().__init__(f"{subject}: expected last sequence {expected} is stale")
        self.subject = subject
        self.expected = expected


class AppendOutcomeUnknown(Exception):
    """No attempt of the append was answered: the event may or may not be in the stream."""

    def __init__(self, ev: Event, attempts: int) -> None:
        super().__init__(f"{ev.subject}: no answer to {attempts} publishes of event {ev.id}")
        self.event = ev
        self.attempts = attempts


@dataclass(frozen=True, slots=True)
class Appended:
    """Where the event is. `duplicate`: an earlier request with the same event id stored it (a
    client's retry with its Idempotency-Key), not this call."""

    seq: int
    duplicate: bool


class EventStore:
    def __init__(
        self,
        js: JetStreamContext | JetStreamResources,
        *,
        replicas: int = 1,
        duplicate_window_s: float = 120.0,
        publish_timeout_s: float = 5.0,
        group_commit_after: int = 16,
        metrics: Metrics = NOOP,
    ) -> None:
        self.metrics = metrics
        self.resources = resources_of(js)  # declares (and caches) the project streams
        self.js = self.resources.js
        self.replicas = replicas
        self.duplicate_window_s = duplicate_window_s
        self.publish_timeout_s = publish_timeout_s
        # Appends in flight to one stream before more wait for a shared atomic batch (0: never).
        self.group_commit_after = group_commit_after
        self._groups: dict[str, GroupCommit | None] = {}
        self._stream_lock = asyncio.Lock()

    # --- streams ---------------------------------------------------------------------------

    async def ensure_stream(self, project: str) -> None:
        name = stream_name(project)
        if self.resources.knows_stream(name):  # every append asks: no config built then
            return
        await self.resources.stream(self.stream_config(project))

    def stream_config(self, project: str) -> api.StreamConfig:
        return api.StreamConfig(
            name=stream_name(project),
            subjects=[self.stream_subject(project)],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window_s,
            allow_direct=True,
            discard=api.DiscardPolicy.NEW,
            allow_atomic=True,  # group commit (weft.store.groupcommit); ignored by servers before 2.12
        )

    @staticmethod
    def stream_subject(project: str) -> str:
        return f"weft.{project}.ev.>"

    async def stream_exists(self, project: str) -> bool:
        return await self.resources.stream_exists(stream_name(project))

    async def last_seq(self, project: str) -> int:
        """The sequence of the stream's last message: the point a reader of the whole stream reaches.
        A deleted message is never delivered, so the stream's `last_seq` is no such point when the
        last one was deleted (`nats stream rmm`) or all were (a purge): a view waiting for it would
        never catch up. In those cases the last message still there counts (0 if none)."""
        name = stream_name(project)
        try:
            info = await self.js.stream_info(name)
        except nats.js.errors.NotFoundError:
            return 0
        state = info.state
        if not state.messages:
            return 0
        if not state.num_deleted:
            return int(state.last_seq)
        try:
            return int((await self.js.get_last_msg(name, self.stream_subject(project))).seq or 0)
        except nats.js.errors.NotFoundError:  # deleted meanwhile
            return 0

    async def msg_id_at(self, project: str, seq: int) -> str | None:
        """The Nats-Msg-Id (event id) of the message at `seq`, or None if there is none."""
        msg = await self._msg_at(project, seq)
        return None if msg is None else (msg.headers or {}).get(api.Header.MSG_ID.value)

    async def _msg_at(self, project: str, seq: int) -> api.RawStreamMsg | None:
        try:
            return await self.js.get_msg(stream_name(project), seq)
        except nats.js.errors.NotFoundError:
            return None

    async def list_projects(self) -> list[str]:
        projects = []
        for info in await self.js.streams_info():
            name = info.config.name or ""
            if name.startswith("WEFT_"):
                projects.append(name[len("WEFT_") :])
                self.resources.stream_seen(name)
        return sorted(projects)

    # --- append ----------------------------------------------------------------------------

    async def append(self, ev: Event, expected_seq: int | None) -> Appended:
        """Append one event. `expected_seq` is the entity's last subject sequence (0 = new entity);
        None skips the check (only for events that cannot conflict). Under load the append may
        share an atomic batch with others (`weft.store.groupcommit`); its checks are the same."""
        started = monotonic()
        appended = await self._append(ev, expected_seq)
        self.metrics.appended(ev, monotonic() - started)
        return appended

    async def _append(self, ev: Event, expected_seq: int | None) -> Appended:
        await self.ensure_stream(ev.project)
        stamp(ev)
        payload, headers = ev.encode(), append_headers(ev, expected_seq)
        group = await self._group(ev.project)
        if group is None:
            return await self._publish(ev, payload, headers, expected_seq)
        alone: Alone = ALONE
        if group.crowded():
            got = await group.append(ev.subject, payload, headers)  # Alone: publish alone, slot counted
            if not isinstance(got, Alone):
                ev.seq = got
                return Appended(seq=got, duplicate=False)
            alone = got
        else:
            group.inflight += 1
        try:
            return await self._publish(ev, payload, headers, expected_seq, maybe_stored=alone.maybe_stored)
        finally:
            group.inflight -= 1
            group.kick()

    async def _publish(
        self, ev: Event, payload: bytes, headers: dict[str, str], expected_seq: int | None, *, maybe_stored: bool = False
    ) -> Appended:
        """Publish until an answer says where the event is. `maybe_stored`: an earlier attempt of
        this call (a batch without a commit reply) may have stored it."""
        for attempt in range(1, PUBLISH_ATTEMPTS + 1):
            try:
                return await self._publish_once(ev, payload, headers, expected_seq, maybe_stored)
            except NOT_SENT:
                if not maybe_stored:
                    raise  # nothing of this append can be in the stream: the caller may say so
            except (nats.errors.TimeoutError, nats.js.errors.APIError) as err:
                if isinstance(err, nats.js.errors.APIError) and not maybe_stored:
                    raise  # the stream refused it, and no earlier attempt may have landed
                # No answer (the request or its reply lost): stored or not, nobody can tell.
                maybe_stored = True
            log.warning("append of %s not confirmed (attempt %d of %d); publishing it again", ev.id, attempt,
                        PUBLISH_ATTEMPTS, extra={"project": ev.project, "subject": ev.subject})
        raise AppendOutcomeUnknown(ev, PUBLISH_ATTEMPTS)

    async def _publish_once(
        self, ev: Event, payload: bytes, headers: dict[str, str], expected_seq: int | None, maybe_stored: bool
    ) -> Appended:
        nc = self.js._nc
        if not nc.is_connected:
            # nats-py would buffer it to send after a reconnect: sent or not, nobody could tell.
            raise nats.errors.ConnectionClosedError if nc.is_closed else nats.errors.ConnectionReconnectingError
        try:
            ack = await self.js.publish(ev.subject, payload, timeout=self.publish_timeout_s, headers=headers)
        except nats.js.errors.APIError as err:
            if err.err_code != WRONG_LAST_SEQUENCE:
                raise
            # The server checks the expected sequence before Msg-Id dedupe, so a retry of an append
            # that already landed (a lost ack, say) looks like a conflict: recognise our own event.
            own = await self._own_msg_after(ev, expected_seq or 0)
            if own is None:
                self.metrics.conflict(ev.project)
                raise ConcurrencyConflict(ev.subject, expected_seq or 0) from err
            ev.seq = own[0]
            return Appended(seq=own[0], duplicate=not (maybe_stored and own[1] == payload))
        ev.seq = ack.seq
        if ack.duplicate and maybe_stored:
            # Ours (an earlier attempt of this call) or an earlier request's with this id? Only on
            # this rare path is the stored message read back; the normal path costs nothing more.
            stored = await self._payload_at(ev.project, ack.seq)
            return Appended(seq=ack.seq, duplicate=stored != payload)
        return Appended(seq=ack.seq, duplicate=bool(ack.duplicate))

    async def _group(self, project: str) -> GroupCommit | None:
        """The project's batcher; None when group commit is off or the stream cannot take atomic
        batches (a server before 2.12, or a stream whose config cannot be updated)."""
        if not self.group_commit_after:
            return None
        name = stream_name(project)
        if name in self._groups:
            return self._groups[name]
        async with self._stream_lock:  # one batcher per stream, however many appends ask at once
            if name in self._groups:
                return self._groups[name]
            self._groups[name] = group = await self._new_group(project, name)
        return group

    async def _new_group(self, project: str, name: str) -> GroupCommit | None:
        group: GroupCommit | None = None
        try:
            info = await self.js.stream_info(name)
            if not info.config.allow_atomic:  # a stream created by an earlier weft
                info.config.allow_atomic = True
                info = await self.js.update_stream(info.config)
            if info.config.allow_atomic:
                group = GroupCommit(self.js._nc, name, after=self.group_commit_after, timeout_s=self.publish_timeout_s,
                                    metrics=self.metrics)
            else:
                log.warning("stream %s takes no atomic batches (nats-server before 2.12?): group commit off",
                            name, extra={"project": project})
        except nats.js.errors.Error as err:
            log.warning("no group commit for %s: %s", name, err, extra={"project": project})
        return group

    async def _own_msg_after(self, ev: Event, expected: int) -> tuple[int, bytes] | None:
        """(sequence, stored payload) of the event with `ev`'s id if an append of it landed with
        `expected`, else None.

        An append that landed with `expected` was the first event on its subject after `expected`,
        so that one message decides it, even when later events on the entity followed it (the last
        message would not). Not a direct get: a follower may not have our event yet."""
        try:
            first = await self.js.get_msg(stream_name(ev.project), seq=expected + 1, subject=ev.subject, next=True)
        except nats.js.errors.NotFoundError:
            return None
        if (first.headers or {}).get(api.Header.MSG_ID.value) == ev.id and first.seq:
            return int(first.seq), bytes(first.data or b"")
        return None

    async def _payload_at(self, project: str, seq: int) -> bytes | None:
        msg = await self._msg_at(project, seq)
        return None if msg is None else bytes(msg.data or b"")

    # --- read ------------------------------------------------------------------------------

    async def tail(
        self,
        project: str,
        from_seq: int,
        on_event: Callable[[Event], Awaitable[None] | None],
        on_skip: Skip | None = None,
    ) -> Tail:
        """Deliver every event from `from_seq` on, in order, forever (one ordered consumer).
        A message that does not decode is passed to `on_skip(seq, subject, error)` instead."""
        await self.ensure_stream(project)
        tail = Tail(self, project, from_seq, on_event, on_skip)
        await tail.start()
        return tail

    async def read_range(self, project: str, start: int = 1, end: int | None = None) -> AsyncIterator[Event]:
        """Events with start <= seq <= end (end defaults to the stream's last sequence now)."""
        last = await self.last_seq(project)
        end = last if end is None else min(end, last)
        if end < start:
            return
        sub = await self._ordered_sub(project, start)
        try:
            while True:
                msg = await sub.next_msg(timeout=10)
                seq = msg.metadata.sequence.stream
                if seq > end:
                    break
                yield decode(msg.data, seq)
                if seq >= end:
                    break
        finally:
            await sub.unsubscribe()

    async def _ordered_sub(
        self, project: str, start: int, cb: Callable[[Msg], Awaitable[None]] | None = None
    ) -> JetStreamContext.PushSubscription:
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start)
        )
        return await self.js.subscribe(
            f"weft.{project}.ev.>",
            stream=stream_name(project),
            cb=cb,
            ordered_consumer=True,
            # nats-py recreates an ordered consumer after two missed heartbeats: its 5 s default
            # left a replica folding nothing for 10-20 s after a cluster node died
            # (tests/integration/test_cluster.py); 1 s costs one small message a second per stream.
            idle_heartbeat=ORDERED_HEARTBEAT_S,
            config=config,
            pending_msgs_limit=1_000_000,
            pending_bytes_limit=512 * 1024 * 1024,
        )


def append_headers(ev: Event, expected_seq: int | None) -> dict[str, str]:
    """The headers an append carries (and the stream keeps). No Nats-Expected-Stream: the subject
    can only land in the project's stream, and every stored header is parsed again on every replay."""
    headers = {api.Header.MSG_ID.value: ev.id}
    if expected_seq is not None:
        headers[api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value] = str(expected_seq)
    return headers


class Tail:
    """An ordered consumer feeding a callback; one per project per replica (never per request)."""

    def __init__(
        self,
        store: EventStore,
        project: str,
        from_seq: int,
        on_event: Callable[[Event], Awaitable[None] | None],
        on_skip: Skip | None = None,
    ) -> None:
        self.store = store
        self.project = project
        self.from_seq = from_seq
        self.on_event = on_event
        self.on_skip = on_skip
        self._sub: JetStreamContext.PushSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self.pending = 0  # messages the server had left to deliver after the last one (projection lag)

    async def start(self) -> None:
        # A subscription callback, not `async for sub.messages`: nats-py's iterator costs a task and
        # an asyncio.wait per message, which made replay 3-5x slower (make bench). Callbacks of one
        # subscription run one at a time, in order, which is exactly what a fold needs.
        self._sub = await self.store._ordered_sub(self.project, self.from_seq, cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        seq = _stream_seq(msg)
        self.pending = _pending(msg)
        try:
            ev = decode(msg.data, seq)
        except Exception as err:
            # Corrupt, or from a newer weft (rolling upgrade): the reader decides (`on_skip`); a
            # reader waiting for this sequence must hear of it, or it would wait for the next one.
            if self.on_skip is not None:
                try:
                    self.on_skip(seq, msg.subject, err)
                except Exception:
                    log.exception("skip callback failed", extra={"project": self.project, "seq": seq})
            else:
                log.error("undecodable event skipped: %s", err, extra={"project": self.project, "seq": seq})
            return
        try:
            result = self.on_event(ev)
            if result is not None:
                await result
        except Exception:
            # A failing callback must not end the tail: every later event would be lost to it.
            log.exception("event callback failed", extra={"project": self.project, "seq": ev.seq})

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass


def _stream_seq(msg: Msg) -> int:
    # v1 "$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>" (9 tokens), or v2
    # "$JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>..." (12+). Parsed by hand:
    # msg.metadata builds several objects per message on the replay hot path.
    tokens = msg.reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


def _pending(msg: Msg) -> int:
    # The ack subject's last token (v1, 9 tokens) or its 11th (v2): messages left after this one.
    tokens = msg.reply.split(".")
    try:
        return int(tokens[8] if len(tokens) == 9 else tokens[10])
    except (IndexError, ValueError):
        return 0
